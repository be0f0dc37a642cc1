"""Low-rank adapters (LoRA) through peft: the model's weights stay frozen and only the
adapters train, are checkpointed and restored; at the end they are merged into final/ (and
the GGUF), and written as a peft adapter folder for the Hugging Face model on request."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from smoltrain.errors import MissingExtra, TrainingError
from smoltrain.model.model import CustomLLM
from smoltrain.train.config import LoraConfig

ADAPTER = "final-adapter"  # the peft adapter folder a run writes beside final/ (lora.save_adapter)
_HF_PREFIX = "base_model.model.model."  # where peft finds our layers in transformers' LlamaForCausalLM


def require_peft():
    try:
        import peft
    except ImportError:
        raise MissingExtra(
            "train.lora needs peft, which is not installed: pip install 'smoltrain[lora]' (or peft)"
        ) from None
    return peft


def add_adapters(model: CustomLLM, lora: LoraConfig) -> CustomLLM:
    """Adapters of `lora.rank` on the linear layers `lora.targets` names (our module names,
    which are transformers' too); every other weight frozen. In place."""
    peft = require_peft()
    linears = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if type(m) is nn.Linear})
    unknown = sorted(set(lora.targets) - set(linears))
    if unknown or not lora.targets:
        raise TrainingError(
            f"train.lora.targets {unknown or '[]'} match no linear layer of the model; its linear "
            f"layers are {', '.join(linears)}: name some of those"
        )
    config = peft.LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.targets)
    )
    model = peft.inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    return model


def has_adapters(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def merge_adapters(model: CustomLLM) -> CustomLLM:
    """The model with each adapter merged into its layer's weight and the adapter removed
    (peft's own merge), in place: a plain model again, as transformers and llama.cpp read it."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            with torch.no_grad():
                module.merge(safe_merge=True)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    for p in model.parameters():
        p.requires_grad = True
    return model


def save_adapter(model: CustomLLM, lora: LoraConfig, folder: Path, base: str | None) -> None:
    """A peft adapter folder (adapter_config.json, adapter_model.safetensors) that
    `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)` loads."""
    import peft
    from safetensors.torch import save_file

    state = peft.get_peft_model_state_dict(model)
    state = {_HF_PREFIX + k: v.detach().contiguous().cpu() for k, v in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = peft.LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=sorted(lora.targets),
        task_type="CAUSAL_LM",
        base_model_name_or_path=base,
        inference_mode=True,
    )
    config.save_pretrained(folder)
