"""Writing GGUF, the file llama.cpp, Ollama and LM Studio run, with the `gguf` package's
writer: llama-architecture metadata, the weights (q/k rows reordered for llama.cpp's rotary)
and the tokenizer. Reading GGUF back is `smoltrain.formats.model_io` (through transformers).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from smoltrain.atomic import write_atomic
from smoltrain.formats.hf import hf_state_dict
from smoltrain.model.config import ModelConfig
from smoltrain.model.model import CustomLLM

# --dtype: the type of the 2-D weights; 1-D norms stay float32 in every file (as llama.cpp's own
# converter writes them: they are tiny and their precision matters).
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
_ALIASES = {"float32": "f32", "fp32": "f32", "float16": "f16", "fp16": "f16", "bfloat16": "bf16"}
Q8_BLOCK = 32  # q8_0 and q4_* quantize rows in blocks of 32 values (f16 scales, q4_1 a minimum too)

# llama.cpp's pre-tokenizer names for the HF pre-tokenizers it implements (llama-vocab.cpp):
# plain GPT-2 byte-level splitting, and SmolLM2's, which splits off every digit first.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
_DIGITS = {"type": "Digits", "individual_digits": True}


def gguf_dtype(name: str) -> str:
    """The GGUF weight type a user asked for (f32, f16, bf16, q8_0, q4_0, q4_1; torch's names too)."""
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in GGUF_DTYPES:
        raise ValueError(
            f"unknown GGUF dtype '{name}'; use one of {', '.join(GGUF_DTYPES)} "
            "(q8_0: 8-bit, about a quarter of f32's size; q4_0/q4_1: 4-bit, about an eighth)"
        )
    return key


def check_exportable(config: ModelConfig) -> None:
    """Refuse what llama.cpp's llama architecture cannot represent, before any work is done."""
    if config.sliding_window is not None:
        raise ValueError(
            f"this model uses sliding-window attention (window {config.sliding_window}), which "
            "llama.cpp's llama architecture does not have: the GGUF would run as full attention, "
            "a different model. Export it as a Hugging Face folder instead (`smoltrain convert "
            "SRC DIR`), or train without model.overrides.sliding_window"
        )


def _pre_tokenizer_name(spec: dict) -> str:
    pre = spec.get("pre_tokenizer") or {}

    def same(step: dict, expected: dict) -> bool:
        return all(step.get(k) == v for k, v in expected.items())

    if same(pre, _BYTE_LEVEL):
        return "gpt-2"
    steps = pre.get("pretokenizers") or []
    if len(steps) == 2 and same(steps[0], _DIGITS) and same(steps[1], _BYTE_LEVEL):  # a Sequence
        return "smollm"
    raise ValueError(
        f"llama.cpp has no pre-tokenizer matching this tokenizer's ({json.dumps(pre)}): it would "
        "split text differently and the GGUF would not be the model you trained. Use a byte-level "
        "BPE tokenizer as GPT-2's or SmolLM2's (`smoltrain tokenizer train` makes one)"
    )


def check_tokenizer_exportable(tokenizer, vocab_size: int) -> dict:
    """The tokenizer's definition (tokenizer.json) once checked: byte-level BPE, no normalizer,
    a pre-tokenizer llama.cpp implements, no more tokens than the model's vocabulary."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    kind = spec["model"]["type"]
    if kind != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(
            f"this tokenizer is {kind} without a byte-level decoder; GGUF export writes byte-level "
            "BPE tokenizers (GPT-2's and SmolLM2's kind). Use such a tokenizer, or export an HF folder"
        )
    if spec.get("normalizer"):
        raise ValueError(
            f"this tokenizer has a normalizer ({spec['normalizer'].get('type')}), which llama.cpp's "
            "byte-level BPE does not apply; export an HF folder instead (`smoltrain convert SRC DIR`)"
        )
    _pre_tokenizer_name(spec)
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer):,} tokens but the model's vocabulary is "
            f"{vocab_size:,}; pass the tokenizer the model was trained with (--tokenizer)"
        )
    return spec


def _add_tokenizer(writer, tokenizer, config: ModelConfig) -> None:
    import gguf

    spec = check_tokenizer_exportable(tokenizer, config.vocab_size)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(config.vocab_size):  # rows the tokenizer leaves unused get llama.cpp's placeholder
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            kind = gguf.TokenType.NORMAL
            if i in added:
                kind = gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
            types.append(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    # The model's own ids (what it was trained to start and stop with) over the tokenizer's;
    # a padding id only when the model has one, so the config reads back as written.
    ids = {
        "bos": config.bos_token_id if config.bos_token_id is not None else tokenizer.bos_token_id,
        "eos": config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": config.pad_token_id,
    }
    for name, token_id in ids.items():
        if token_id is not None:
            getattr(writer, f"add_{name}_token_id")(token_id)
    with_specials = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    writer.add_add_bos_token(len(with_specials) > len(plain) and with_specials[0] != plain[0])
    writer.add_add_eos_token(len(with_specials) > len(plain) and with_specials[-1] != plain[-1])
    writer.add_add_space_prefix(False)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)
    # GGUF's own key for the whole tokenizer.json: readers that know it (ours) rebuild the exact
    # tokenizer; llama.cpp reads the ggml keys above.
    writer.add_string(gguf.Keys.Tokenizer.HF_JSON, tokenizer.backend_tokenizer.to_str())


def llama_cpp_order(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows as llama.cpp's rotary expects: HF rotates each head's first half against its
    second half, llama.cpp adjacent pairs, so each head's two halves are interleaved."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).transpose(1, 2).reshape(weight.shape)


def _gguf_tensor(tensor: torch.Tensor, dtype: str):
    """(numpy array, ggml type) for one weight in the file's dtype."""
    import gguf

    array = tensor.detach().to(torch.float32).cpu().numpy()
    kind = gguf.GGMLQuantizationType
    if array.ndim == 1 or dtype == "f32":
        return array, kind.F32
    if dtype in ("q8_0", "q4_0", "q4_1") and array.shape[-1] % Q8_BLOCK == 0:
        block_kind = kind[dtype.upper()]
        return gguf.quants.quantize(array, block_kind), block_kind
    if dtype == "bf16":
        return gguf.quants.quantize(array, kind.BF16), kind.BF16
    return array.astype(np.float16), kind.F16  # f16, and quantized rows that are not whole blocks


def write_gguf(
    model: CustomLLM, path: str | Path, tokenizer, dtype: str = "f16", name: str | None = None
) -> None:
    """Write `model` and `tokenizer` as one GGUF file llama.cpp runs. The file appears whole
    or not at all (written beside and renamed over)."""
    import gguf

    dtype = gguf_dtype(dtype)
    config = model.config
    check_exportable(config)
    check_tokenizer_exportable(tokenizer, config.vocab_size)
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    }

    def write(target: Path) -> None:
        writer = gguf.GGUFWriter(target, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        writer.add_name(name or "smoltrain model")
        writer.add_file_type(file_types[dtype])
        if dtype != "f32" and dtype != "f16":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_vocab_size(config.vocab_size)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        _add_tokenizer(writer, tokenizer, config)
        # A tied head is written once, as token_embd; llama.cpp uses it for the output when
        # output.weight is absent.
        for hf_key, tensor in hf_state_dict(model).items():
            if hf_key.endswith("q_proj.weight"):
                tensor = llama_cpp_order(tensor, config.num_attention_heads)
            elif hf_key.endswith("k_proj.weight"):
                tensor = llama_cpp_order(tensor, config.num_key_value_heads)
            # q4 files keep the embedding and the head in q8_0, as llama.cpp's quantizer keeps the
            # output tensor at more bits: in 4 bits they cost a 135M model 5% of its perplexity
            head = hf_key in ("model.embed_tokens.weight", "lm_head.weight")
            array, kind = _gguf_tensor(tensor, "q8_0" if head and dtype.startswith("q4") else dtype)
            writer.add_tensor(names.get_name(hf_key, try_suffixes=(".weight",)), array, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, write)
