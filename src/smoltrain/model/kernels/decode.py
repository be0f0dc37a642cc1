"""Inference-only modules for fast decoding: the linears repacked (q/k/v and gate/up merged,
oneDNN's inner product on CPU, or a one-row form that torch.compile vectorizes) and a
one-query attention for the compiled decode step. `pack` turns a `CustomLLM` into a
`PackedLLM` in place; `smoltrain.generate.prepare_for_generation` is the way in."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from smoltrain.model.kernels.swap import swap_class
from smoltrain.model.model import MLP, Attention, CustomLLM, KVCache

MakeLinear = Callable[[torch.Tensor], nn.Module]


class OneDNNLinear(nn.Module):
    """A frozen linear computed by oneDNN's inner product, the kernel torch.compile's
    freezing pass picks on CPU. Decoding multiplies one row by each weight, and there this
    reads the weights about twice as fast as `F.linear`'s default (MKL gemv) on x86.
    The weight is reordered once into oneDNN's blocked layout for a batch of 8 rows: as fast
    as the plain layout for one row, 1.7x faster for 8 (a copy, so a tied head no longer
    shares the embedding's storage)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # a plain attribute: not a parameter, not in the state dict
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def onednn_linear_works(dtype: torch.dtype) -> bool:
    """oneDNN's CPU ops exist and agree with F.linear for this dtype (a build without them,
    or one that changed their signature, keeps the plain path)."""
    if not torch.backends.mkldnn.is_available() or dtype not in (torch.float32, torch.bfloat16):
        return False
    try:
        probe = nn.Linear(64, 48, bias=False).to(dtype)
        x = torch.randn(2, 3, 64, dtype=dtype)
        with torch.inference_mode():
            return torch.allclose(OneDNNLinear(probe.weight)(x), probe(x), rtol=1e-2, atol=1e-2)
    except (RuntimeError, AttributeError):
        return False


def qkv_weight(attn: Attention) -> torch.Tensor:
    """q, k and v's weights as one (out, in) matrix: one matmul reads them all."""
    return torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach()


def gate_up_weight(mlp: MLP) -> torch.Tensor:
    return torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()


def layer_weights(model: CustomLLM) -> list[torch.Tensor]:
    """The first layer's weights as `pack` merges them: what one decode step reads per layer."""
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    return [qkv_weight(attn), attn.o_proj.weight, gate_up_weight(mlp), mlp.down_proj.weight]


def onednn_linear_pays(weights: list[torch.Tensor]) -> bool:
    """Whether `OneDNNLinear` multiplies one row by these weights (one layer's, as packed)
    at least 10% faster than `F.linear` on this machine, timed here in a few ms: which one
    wins at one row differs between CPUs and hosts (oneDNN was 1.6x faster on one AVX-512
    host, 0.7x on another and on AVX2; docs/performance.md)."""
    rows = [torch.ones(1, 1, w.shape[1], dtype=w.dtype) for w in weights]
    plain = [functools.partial(F.linear, weight=w.detach()) for w in weights]
    onednn = [OneDNNLinear(w) for w in weights]
    return 1.1 * seconds_per_pass(onednn, rows) < seconds_per_pass(plain, rows)


def seconds_per_pass(linears: list[Callable], rows: list[torch.Tensor], repeats: int = 30) -> float:
    """The fastest of `repeats` passes of each row through its linear, after a warm-up."""
    best = float("inf")
    with torch.inference_mode():
        for i in range(repeats + 1):
            start = time.perf_counter()
            for linear, row in zip(linears, rows, strict=True):
                linear(row)
            if i:
                best = min(best, time.perf_counter() - start)
    return best


class ReductionLinear(nn.Module):
    """A frozen linear layer for a compiled decode step. On CPU, for a single row and with
    `reduce`, it writes x @ W.T as a product and a sum, which torch.compile turns into one
    vectorized pass over the weights on every core: on one host that read them at 33 GB/s,
    where MKL's gemv reached 11; on another MKL was 1.45x faster (`reduction_pays` times
    both). Otherwise, and in eager mode (the product would be materialized), `F.linear`."""

    def __init__(self, weight: torch.Tensor, reduce: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)  # shares a tied weight
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        one_row = x.device.type == "cpu" and x.shape[:-1].numel() == 1
        if self.reduce and one_row and torch.compiler.is_compiling():
            return one_row_product(x, self.weight)
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}"


def one_row_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (x.unsqueeze(-2) * weight).sum(-1)


def reduction_pays(model: CustomLLM) -> bool:
    """Whether torch.compile's one-row product reads every layer's weights (a pass as cold
    to the caches as a decode step's) at least 10% faster than `F.linear` on this machine:
    timed here, after compiling the product for each weight shape (a few seconds)."""
    weights = [m.weight.detach() for m in model.layers.modules() if isinstance(m, nn.Linear)]
    rows = [torch.ones(1, 1, w.shape[1], dtype=w.dtype) for w in weights]
    product = torch.compile(one_row_product, dynamic=False)
    reduced = [functools.partial(product, weight=w) for w in weights]
    plain = [functools.partial(F.linear, weight=w) for w in weights]
    return 1.1 * seconds_per_pass(reduced, rows, repeats=3) < seconds_per_pass(plain, rows, repeats=3)


def one_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Attention of one new token (B, nh, 1, hd) over the cache's first S slots (B, nkv, S, hd) in
    plain ops for torch.compile: at one query SDPA's CPU kernel costs more than its
    arithmetic (compiled bf16 decoding went 50 -> 60 tok/s). Compiled on CPU, both products
    are written as products and sums, which the compiler fuses with the rotary, the cache
    write and the softmax into one loop a layer (two matmul calls a layer fewer: int8
    decoding 5-8% faster on a Sapphire Rapids Xeon, even in its AVX2 setting;
    docs/performance.md); elsewhere they are matmuls. The softmax is in fp32, as in SDPA, and
    the result in q's dtype (the cache's may be narrower)."""
    B, nh, _, hd = q.shape
    n_kv = k.shape[1]
    q = q.view(B, n_kv, nh // n_kv, 1, hd)  # the query heads that share each key/value head
    fused = q.device.type == "cpu" and torch.compiler.is_compiling()
    if fused:  # (B, nkv, group, S, hd), summed in the loop, never stored
        scores = (q.float() * k[:, :, None].float()).sum(-1)
    else:
        k, v = k.to(q.dtype), v.to(q.dtype)  # from a 16-bit cache (`PackedLLM.decode_cache_dtype`)
        scores = (q[..., 0, :] @ k.transpose(-1, -2)).float()
    scores = (scores * hd**-0.5).masked_fill(~mask, float("-inf"))  # mask (B, 1, 1, S)
    weights = scores.softmax(-1)  # (B, nkv, group, S)
    if fused:
        return (weights[..., None] * v[:, :, None].float()).sum(-2).to(q.dtype).view(B, nh, 1, hd)
    return (weights.to(v.dtype) @ v).view(B, nh, 1, hd)


class PackedAttention(Attention):
    """`Attention` for inference with q, k and v as one linear (`qkv_proj`)."""

    def pack(self, make_linear: MakeLinear) -> None:
        """Replace the four projections by `make_linear`'s modules, q/k/v merged."""
        with torch.no_grad():
            self.qkv_proj = make_linear(qkv_weight(self))
            self.o_proj = make_linear(self.o_proj.weight)
        del self.q_proj, self.k_proj, self.v_proj  # free the originals

    def forward(self, x, cos, sin, mask, cache, cache_position=None):
        B, T, _ = x.shape
        kv_size = self.n_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([self.n_heads * self.head_dim, kv_size, kv_size], dim=-1)
        q, k, v = self.heads(q, k, v, cos, sin, cache, cache_position)
        if cache_position is not None and T == 1:  # a compiled decode step
            filled = mask.shape[-1]  # the slots the mask covers: the rest are never read
            y = one_query_attention(q, k[:, :, :filled], v[:, :, :filled], mask)
        else:
            y = self.attention(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class PackedMLP(MLP):
    """`MLP` for inference with gate and up as one linear (`gate_up_proj`)."""

    def pack(self, make_linear: MakeLinear) -> None:
        with torch.no_grad():
            self.gate_up_proj = make_linear(gate_up_weight(self))
            self.down_proj = make_linear(self.down_proj.weight)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class PackedLLM(CustomLLM):
    """A `CustomLLM` repacked for inference: no gradients, no loss, and `save_model` refuses
    it (its weights are no longer the checkpoint's tensors). `decode_step`, when set, is a compiled
    `smoltrain.generate.decode_step` that generation runs after the prompt."""

    decode_step: Callable | None
    quantized: str | None  # "int8" or "int4" when the linears are quantized

    def pack(
        self,
        make_linear: MakeLinear,
        decode_step: Callable | None,
        quantized: str | None,
        make_head: MakeLinear,
    ) -> None:
        for layer in self.layers:
            swap_class(layer.self_attn, PackedAttention).pack(make_linear)
            swap_class(layer.mlp, PackedMLP).pack(make_linear)
        with torch.no_grad():
            self.lm_head = make_head(self.lm_head.weight)
        self.decode_step, self.quantized = decode_step, quantized
        self.decode_caches: dict[tuple[int, int], KVCache] = {}

    def decode_cache(self, batch_size: int, capacity: int, static: bool = False) -> KVCache:
        """An empty KV cache for the compiled decode step at this batch size and capacity:
        one per shape, kept and reused, so that a CUDA graph recorded on its buffers
        (`static`: their addresses marked for it) replays for every later request of that
        shape instead of being recorded again. Stale keys in it are masked by the caller, or
        not read (on CPU its mask ends at the slots filled); its dtype is `decode_cache_dtype`'s.
        A dynamic capacity would spare a compile per capacity, but made int4 decoding 5-8%
        slower (Xeon, native)."""
        cache = self.decode_caches.get((batch_size, capacity))
        if cache is None:
            cache = KVCache(self.config, batch_size, capacity, self.device, self.decode_cache_dtype())
            if static:  # written in place by every replay: the graph must keep their addresses
                for buffer in cache.keys + cache.values:
                    torch._dynamo.mark_static_address(buffer)
            self.decode_caches[(batch_size, capacity)] = cache
        cache.length = 0
        return cache

    def decode_cache_dtype(self) -> torch.dtype:
        """fp16 for an fp32 model on CPU, as llama.cpp's default cache: the compiled step reads
        half the bytes a token, and its attention computes in fp32 from them (after a 512-token
        prompt int4 and int8 +5%, f32 +3%, int8 +8-10% in the AVX2 setting; the same greedy
        tokens; Xeon). Where CUDA graphs replay the step, the model's dtype."""
        if self.device.type == "cpu" and self.dtype == torch.float32:
            return torch.float16
        return self.dtype

    def num_parameters(self) -> int:
        return self.config.num_params()  # the repacked weights are no longer all parameters

    def _apply(self, fn, recurse=True):  # what .to(), .cuda(), .half() and the like call
        raise ValueError(
            "this model went through prepare_for_generation: its weights are repacked for the "
            "device and dtype it was on (and a compiled step checks none of them); load the "
            "model again, move or cast it, then call prepare_for_generation"
        )

    def forward(self, input_ids: torch.Tensor, *args, labels: torch.Tensor | None = None, **kwargs):
        if labels is not None:
            raise ValueError(
                "this model went through prepare_for_generation and computes no loss; "
                "evaluate or train the model as loaded, before that call"
            )
        return super().forward(input_ids, *args, **kwargs)


def pack(
    model: CustomLLM,
    make_linear: MakeLinear,
    decode_step: Callable | None = None,
    quantized: str | None = None,
    make_head: MakeLinear | None = None,
) -> PackedLLM:
    """Turn `model` into a `PackedLLM` in place: every linear replaced by `make_linear(weight)`,
    q/k/v and gate/up each merged into one (fewer, larger weight reads)."""
    packed = swap_class(model, PackedLLM)
    packed.pack(make_linear, decode_step, quantized, make_head or make_linear)
    return packed
