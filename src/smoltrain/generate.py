"""Text generation with a KV cache: batched prompts with left padding, greedy or sampled,
stopping at EOS per row, as a stream of tokens or all at once. `prepare_for_generation`
makes a model faster for inference (the modules of `smoltrain.model.kernels.decode`): oneDNN
linears on CPU where they pay, or, with compile=True, a decode step of fixed shapes (a cache
of fixed capacity) that torch.compile captures once."""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Iterator

import torch
from torch import nn

from smoltrain.model.kernels.decode import (
    OneDNNLinear,
    PackedLLM,
    ReductionLinear,
    layer_weights,
    onednn_linear_pays,
    onednn_linear_works,
    pack,
    reduction_pays,
)
from smoltrain.model.kernels.quantized import QUANTIZE_KINDS, QUANTIZED_LINEARS, Int8Linear, quantizable
from smoltrain.model.model import CustomLLM, KVCache


def decode_step(
    model: CustomLLM,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    cache_position: torch.Tensor,
    mask: torch.Tensor,
    cache: KVCache,
) -> torch.Tensor:
    """Logits (B, V) after one new token per row (B, 1), written to the cache slot
    `cache_position` (1,); `mask` (B, 1, 1, S) says which of the cache's first S slots each
    row sees: S is the capacity where CUDA graphs replay the step (every shape fixed), else
    the slots filled so far (a dynamic dimension). The position is a tensor, so
    torch.compile captures the step once per batch size and capacity."""
    out = model(
        input_ids,
        attention_mask=mask,
        position_ids=position_ids,
        past_key_values=cache,
        cache_position=cache_position,
    )
    return out.logits[:, -1]


def prepare_for_generation(model: CustomLLM, compile: bool = False, quantize: str | None = None) -> CustomLLM:
    """Turn a model into an inference-only one, in place (a `PackedLLM`, see
    `smoltrain.model.kernels.decode`): eval mode, no gradients, q/k/v and gate/up each merged into
    one matmul, and
    - by default, on CPU, every linear computed by oneDNN (`OneDNNLinear`) where a short
      timing of one layer's weights shows it faster at one row than `F.linear` (on some
      hosts batch-1 decoding is then 1.6x transformers' speed, on others it would be 0.7x:
      there the model stays as it is);
    - with `compile=True` (CPU or CUDA), every decode step after the prompt run by
      `torch.compile` on a fixed-capacity cache (`decode_step`, `ReductionLinear`: on CPU a
      one-row product where timing every layer's weights shows it beats `F.linear`): about
      6000 ops a token become one call, at the price of compiling (20-100 s on 2 cores, about
      10 s from inductor's cache; once per batch size and cache size); at batch 8 too (after a
      32-token prompt 1.1x the default in f32, 1.16x in int8 on one Xeon; docs/performance.md).
    - with `quantize` ("int8" or "int4", CPU only), every linear, the tied head included,
      replaced by a weight-only quantized one (`smoltrain.model.kernels.quantized`); with
      `compile` too, the quantized step compiled.
    Greedy tokens are those of the plain model (quantized: within the rounding). The model
    cannot be trained or saved afterwards (saving it says so); load it again for that."""
    model.eval().requires_grad_(False)
    if isinstance(model, PackedLLM):
        if compile and model.decode_step is None:
            raise ValueError("this model was prepared without compile=True; load it again to compile it")
        if quantize is not None and quantize != model.quantized:
            raise ValueError(
                f"this model was prepared with quantize={model.quantized}; load it again to change it"
            )
        return model
    if quantize is not None:
        check_quantize(model, quantize)
        step = compile_decode_step(model.device.type) if compile else None
        make_linear = QUANTIZED_LINEARS[quantize].from_weight
        # int4 keeps the head in int8 (kernels/quantized.py says why)
        return pack(model, make_linear, step, quantized=quantize, make_head=Int8Linear.from_weight)
    if compile:
        if model.device.type not in ("cpu", "cuda"):
            raise ValueError(f"compile=True runs on CPU or CUDA, not {model.device.type}; leave it off there")
        step = compile_decode_step(model.device.type)
        reduce = model.device.type == "cpu" and reduction_pays(model)
        return pack(model, functools.partial(ReductionLinear, reduce=reduce), step)
    on_cpu = model.device.type == "cpu"
    if on_cpu and onednn_linear_works(model.dtype) and onednn_linear_pays(layer_weights(model)):
        return pack(model, OneDNNLinear)
    return model


def check_quantize(model: CustomLLM, quantize: str) -> None:
    """A quantization this model can take here: a known kind, on CPU, weights whose widths fit."""
    if quantize not in QUANTIZE_KINDS:
        raise ValueError(f"quantize '{quantize}' is unknown; choose {' or '.join(QUANTIZE_KINDS)}")
    if model.device.type != "cpu":
        raise ValueError(
            f"quantize={quantize} runs PyTorch's CPU kernels; on {model.device.type} leave it off "
            "(bf16 there is fast), or load the model on the CPU (--device cpu)"
        )
    # every width: the hidden size (q/k/v, gate/up, the head), the attention's and the MLP's
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    for reason in filter(None, (quantizable(linear.weight, quantize) for linear in linears)):
        raise ValueError(f"cannot quantize this model: {reason}")


def compile_decode_step(device_type: str) -> Callable:
    """`decode_step` compiled for one model. Dynamo files graphs under the function's code
    object, so each model gets a copy of the function with a code object of its own: no
    other model's graph is ever tried on it, whatever its guards check."""
    code = decode_step.__code__.replace()  # equal, but a distinct object
    step = types.FunctionType(code, decode_step.__globals__, decode_step.__name__)
    return torch.compile(step, fullgraph=True, dynamic=False, **decode_compile_mode(device_type))


def decode_compile_mode(device_type: str) -> dict:
    """On CUDA the compiled step is replayed as a CUDA graph ("reduce-overhead"): at batch 1
    a 135M step is a few hundred tiny kernels whose launches, not the GPU, set the pace.
    The cache's buffers are then static addresses (`stream_generate` marks them).
    On CPU its guards skip what the model holds (`guards_outside_the_model`), and inductor
    writes the graph's wrapper in C++ (`cpp_wrapper`), which calls its 120 matmuls and as
    many fused loops a token without Python: int4 +11-17%, f32 +6-12%, int8 even, for a first
    compile of 75-100 s instead of 10-50 (135M, 2 cores, Xeon; docs/performance.md)."""
    if device_type == "cuda":
        return {"mode": "reduce-overhead"}
    return {"options": {"guard_filter_fn": guards_outside_the_model, "cpp_wrapper": True}}


def guards_outside_the_model(guards: list) -> list[bool]:
    """Keep the guards on the step's inputs and on the model's type; drop those on the
    model's modules, weights and attributes. Checking these took 4-13% of an int4 decode step
    on CPU (about 14 per weight: its type, shape and strides, five attribute lookups; Xeon,
    native), and a prepared model's never change: it cannot be moved, cast, trained or
    re-prepared, and its step is its own (`compile_decode_step`)."""
    inside = ("model.", "model[", "L['model'].", "L['model'][")  # names as torch 2.13 / older write them
    return [not guard.name.startswith(inside) for guard in guards]


def process_logits(
    logits: torch.Tensor,
    generated: torch.Tensor,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
) -> torch.Tensor:
    """Scores for the next token (B, V), in transformers' order: repetition penalty, then
    (when sampling) temperature, top-k and top-p, each as its LogitsProcessor does."""
    logits = logits.float()
    if repetition_penalty != 1.0:
        seen = logits.gather(1, generated)
        seen = torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty)
        logits = logits.scatter(1, generated, seen)
    if not do_sample:
        return logits
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - top_p
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def _check_sampling(
    temperature: float, top_k: int | None, top_p: float | None, repetition_penalty: float
) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; use do_sample=False for greedy")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 or None: off), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1.0: off), got {repetition_penalty}")


def stop_and_pad_ids(
    model: CustomLLM, eos_token_id: int | list[int] | None, pad_token_id: int | None
) -> tuple[list[int], int]:
    """The ids that end a row (the model's EOS by default; [] for none) and the id a finished
    row yields (the model's pad id, else the first EOS, else 0)."""
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    if pad_token_id is None:
        pad_token_id = model.config.pad_token_id
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0
    return eos_ids, pad_token_id


@torch.inference_mode()
def stream_generate(
    model: CustomLLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row (B,) as it is produced. Rows that reached EOS yield
    `pad_token_id` until all rows are done. Prompts are left-padded, `attention_mask` 0/1."""
    _check_sampling(temperature, top_k, top_p, repetition_penalty)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    B, T = input_ids.shape
    context = model.config.max_position_embeddings
    if T >= context:
        raise ValueError(
            f"the prompt has {T} tokens but the model's context is {context}; shorten the prompt"
        )
    max_new_tokens = min(max_new_tokens, context - T)  # never run past the rotary table
    eos_ids, pad_token_id = stop_and_pad_ids(model, eos_token_id, pad_token_id)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=model.device)
    generator = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None

    input_ids = input_ids.to(model.device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(model.device)
        if bool(attention_mask.all()):
            attention_mask = None  # no padding: the plain causal kernel is faster
    if attention_mask is not None:
        # Left padding: real tokens count positions from 0, as transformers does.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    else:
        position_ids = torch.arange(T, device=model.device)[None].expand(B, T)

    capacity = T + max_new_tokens
    compiled_step = model.decode_step if isinstance(model, PackedLLM) else None
    if compiled_step is not None:
        # a power of two from 256: a compiled step serves many prompt and output lengths
        capacity = min(max(256, 1 << (capacity - 1).bit_length()), context)
        slots = torch.zeros(B, capacity, dtype=torch.bool, device=model.device)  # cache slots in use
        slots[:, :T] = True if attention_mask is None else attention_mask.bool()
        slot_index = torch.arange(capacity, device=model.device)
    graphs = compiled_step is not None and "mode" in decode_compile_mode(model.device.type)
    if compiled_step is not None:
        cache = model.decode_cache(B, capacity, static=graphs)
    else:
        cache = KVCache(model.config, B, capacity, model.device, model.dtype)
    generated = input_ids
    unfinished = torch.ones(B, dtype=torch.bool, device=model.device)
    step_ids, step_positions = input_ids, position_ids
    for step in range(max_new_tokens):
        if step > 0 and compiled_step is not None:
            slot = cache.length
            slots[:, slot] = True
            mask = slots[:, None, None]
            if model.config.sliding_window is not None:
                mask = mask & (slot_index > slot - model.config.sliding_window)
            if graphs:  # the previous replay's outputs are no longer read
                torch.compiler.cudagraph_mark_step_begin()
            else:  # attention reads the filled slots only (int4 +3-5% after 32 tokens, +20% after 512)
                mask = mask[..., : slot + 1]
                torch._dynamo.mark_dynamic(mask, 3)
            cache_position = torch.tensor([slot], device=model.device)
            logits = compiled_step(model, step_ids, step_positions, cache_position, mask, cache)
            cache.advance(1)
        else:
            logits = model(
                step_ids,
                attention_mask=attention_mask,
                position_ids=step_positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]
        scores = process_logits(logits, generated, do_sample, temperature, top_k, top_p, repetition_penalty)
        if do_sample:
            next_ids = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
        else:
            next_ids = scores.argmax(dim=-1)
        next_ids = torch.where(unfinished, next_ids, pad_token_id)
        yield next_ids
        unfinished &= ~torch.isin(next_ids, eos)
        if not bool(unfinished.any()):
            return
        generated = torch.cat([generated, next_ids[:, None]], dim=1)
        step_ids = next_ids[:, None]
        step_positions = step_positions[:, -1:] + 1
        if attention_mask is not None and compiled_step is None:  # compiled steps use `slots`
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)


def generate(model: CustomLLM, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """The prompt followed by the new tokens (B, T + new), as transformers' `generate`."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    new = list(stream_generate(model, input_ids, **kwargs))
    if not new:
        return input_ids
    return torch.cat([input_ids.to(new[0].device), torch.stack(new, dim=1)], dim=1)


def stream_pieces(model: CustomLLM, tokenizer, input_ids: torch.Tensor, **kwargs) -> Iterator[str]:
    """Yield the new text each generated token completes ("" when it completes none), once per
    token, so a caller counts tokens by what was generated, not by re-tokenizing the text.
    The whole continuation is decoded each time: tokens that only form a character together
    (a byte-level BPE splits emoji and accents) show once complete."""
    new_ids: list[int] = []
    shown = ""
    for token in stream_generate(model, input_ids, **kwargs):
        new_ids.append(int(token[0]))
        text = tokenizer.decode(new_ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or len(text) <= len(shown):
            yield ""  # an incomplete UTF-8 sequence, or a token that prints nothing
            continue
        yield text[len(shown) :]
        shown = text


def stream_text(model: CustomLLM, tokenizer, input_ids: torch.Tensor, **kwargs) -> Iterator[str]:
    """Yield the decoded continuation of one prompt piece by piece (`stream_pieces` without
    its empty pieces)."""
    return (piece for piece in stream_pieces(model, tokenizer, input_ids, **kwargs) if piece)
