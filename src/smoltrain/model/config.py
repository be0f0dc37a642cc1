"""Model configuration: one dataclass with every architectural knob, named presets, and the
conversion to and from `transformers.LlamaConfig`."""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class ModelConfig:
    vocab_size: int = 49152  # SmolLM2 BPE vocabulary
    hidden_size: int = 576  # width of the residual stream
    num_hidden_layers: int = 30  # decoder layers
    num_attention_heads: int = 9  # query heads
    num_key_value_heads: int = 3  # key/value heads shared by groups of query heads (GQA)
    intermediate_size: int = 1536  # width of the SiLU-gated MLP
    max_position_embeddings: int = 2048  # longest sequence the rotary table covers
    rope_theta: float = 10000.0  # rotary base; the released SmolLM2 uses 100,000
    rms_norm_eps: float = 1e-5  # epsilon inside every RMSNorm
    tie_word_embeddings: bool = True  # lm_head shares the embedding matrix
    sliding_window: int | None = None  # each token sees only the W most recent positions
    initializer_range: float = 0.041666666666666664  # std of the normal init (SmolLM2's)
    bos_token_id: int | None = 0  # <|endoftext|> in the base SmolLM2 tokenizer
    eos_token_id: int | None = 0
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; pick a head count that divides it"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}; grouped-query attention "
                "needs each key/value head to serve the same number of query heads"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def num_params(self) -> int:
        """Parameter count, counting a tied embedding once."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = self.num_key_value_heads * self.head_dim
        attn = 2 * h * h + 2 * h * kv  # q, o and k, v
        layer = attn + 3 * h * i + 2 * h  # MLP and the two norms
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_hidden_layers * layer + h + head

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), PaLM appendix B:
        6 N for the matmuls plus 12 L H T for attention scores."""
        n = self.num_params() - self.vocab_size * self.hidden_size  # embedding lookup is free
        n += self.vocab_size * self.hidden_size  # ...but the lm_head matmul is not
        return 6 * n + 12 * self.num_hidden_layers * self.hidden_size * seq_len

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from a dict, refusing unknown keys with the nearest valid one named."""
        valid = [f.name for f in fields(cls)]
        for key in values:
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {valid}"
                raise ValueError(f"unknown model config key '{key}'{hint}")
        return cls(**values)

    def to_hf(self):
        """The equivalent `transformers.LlamaConfig`; with a sliding window, a MistralConfig
        (the same architecture and weight names, and transformers honours its window)."""
        from transformers import LlamaConfig, MistralConfig

        if self.sliding_window is not None:
            return MistralConfig(
                **self._hf_kwargs(),
                sliding_window=self.sliding_window,
                architectures=["MistralForCausalLM"],
            )
        return LlamaConfig(**self._hf_kwargs(), mlp_bias=False, architectures=["LlamaForCausalLM"])

    def _hf_kwargs(self) -> dict[str, Any]:
        return dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            hidden_act="silu",
            head_dim=self.head_dim,
        )

    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelConfig:
        """From a `transformers.LlamaConfig` (or its dict), refusing what we do not model."""
        d = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
        model_type = d.get("model_type", "llama")
        if model_type not in ("llama", "mistral"):
            raise ValueError(
                f"model_type '{model_type}' is not supported; smoltrain reads Llama-architecture "
                "checkpoints (LlamaForCausalLM, e.g. SmolLM2)"
            )
        hidden, heads = d["hidden_size"], d["num_attention_heads"]
        if d.get("head_dim") not in (None, hidden // heads):
            raise ValueError(f"head_dim {d['head_dim']} != hidden_size / heads; not supported")
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise ValueError("checkpoints with attention or MLP biases are not supported")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act '{d['hidden_act']}' is not supported; only 'silu'")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope type '{rope_type}' is not supported; only plain RoPE")
        theta = d.get("rope_theta") or rope.get("rope_theta") or 10000.0
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0]
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            intermediate_size=d["intermediate_size"],
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rope_theta=float(theta),
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            tie_word_embeddings=d.get("tie_word_embeddings", True),
            sliding_window=d.get("sliding_window"),
            initializer_range=d.get("initializer_range", 0.02),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=d.get("pad_token_id"),
        )


PRESETS: dict[str, ModelConfig] = {
    # The reference's architecture table (docs/reference-run.md): 134,515,008 parameters.
    "smollm2-135m": ModelConfig(),
    # The released SmolLM2-360M and -1.7B shapes (their config.json): 361,821,120 and
    # 1,711,376,384 parameters, both with tied embeddings and an 8k context.
    "smollm2-360m": ModelConfig(
        hidden_size=960,
        num_hidden_layers=32,
        num_attention_heads=15,
        num_key_value_heads=5,
        intermediate_size=2560,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        initializer_range=0.02,
    ),
    "smollm2-1.7b": ModelConfig(
        hidden_size=2048,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,  # no GQA at this size
        intermediate_size=8192,
        max_position_embeddings=8192,
        rope_theta=130000.0,
        initializer_range=0.02,
    ),
    # The test model: 7.3M parameters with the 49k SmolLM2 vocabulary, most of them the embedding.
    "tiny": ModelConfig(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
        max_position_embeddings=1024,
        initializer_range=0.02,
    ),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset, with optional field overrides (unknown fields are refused)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset '{name}'; choose one of {sorted(PRESETS)}")
    values = {**PRESETS[name].to_dict(), **overrides}
    return ModelConfig.from_dict(values)
