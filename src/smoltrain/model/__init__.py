"""The model: its configuration (config.py), the plain PyTorch model (model.py) and the faster
device-specific versions of some of its modules (kernels/, swapped in by
`prepare_for_training`). `from smoltrain.model import CustomLLM, ModelConfig` is the public
way in; the modules of this package import each other by their full names."""

from smoltrain.model.config import PRESETS, ModelConfig, get_preset
from smoltrain.model.model import (
    IGNORE_INDEX,
    MLP,
    Attention,
    CausalLMOutput,
    CustomLLM,
    KVCache,
    LMHead,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    build_attention_mask,
)

__all__ = [
    "IGNORE_INDEX",
    "MLP",
    "PRESETS",
    "Attention",
    "CausalLMOutput",
    "CustomLLM",
    "KVCache",
    "LMHead",
    "ModelConfig",
    "RMSNorm",
    "RotaryEmbedding",
    "apply_rotary",
    "build_attention_mask",
    "get_preset",
]
