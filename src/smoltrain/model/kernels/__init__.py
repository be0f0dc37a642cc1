"""Faster device-specific versions of the model's modules, swapped in by one function.

Each kernel is a subclass of a module of `smoltrain.model` that overrides `forward` only:
the swap changes the object's class and nothing else, so parameters, state-dict names, tied
weights and hooks stay as they were (FSDP2's `fully_shard` swaps classes the same way).
Each one falls back to the plain module's path wherever it does not apply, and each has a
test in tests/kernels/ that bounds its error against the plain op.

    prepare_for_training(model, "cpu", "bf16")   # what `train.kernels: auto` does
    prepare_for_training(model, "cpu", "bf16", kernels="off")   # the plain model
"""

from __future__ import annotations

import torch
from torch import nn

from smoltrain.model.kernels.chunked_loss import ChunkedLossHead
from smoltrain.model.kernels.cpu_attention import TrainingAttention
from smoltrain.model.kernels.flex_attention import FlexMaskLLM
from smoltrain.model.kernels.gated_mlp import TrainingMLP
from smoltrain.model.kernels.rms_norm import LeanRMSNorm
from smoltrain.model.kernels.swap import swap_class
from smoltrain.model.model import MLP, Attention, CustomLLM, LMHead, RMSNorm

# name -> (the plain module it replaces, the kernel, what it does)
KERNELS: dict[str, tuple[type[nn.Module], type[nn.Module], str]] = {
    "chunked_loss": (LMHead, ChunkedLossHead, "linear + cross-entropy in chunks, no logits kept"),
    "mlp": (MLP, TrainingMLP, "gate/up joined under autocast, product recomputed in backward"),
    "attention": (Attention, TrainingAttention, "q/k/v joined under autocast; CPU bf16: batched matmuls"),
    "rms_norm": (RMSNorm, LeanRMSNorm, "fp32 on CPU keeps input and inverse RMS only"),
    "document_mask": (CustomLLM, FlexMaskLLM, "document masks as FlexAttention block masks (CUDA)"),
}

# What `auto` swaps in, by device and precision, and on CPU also by the widest vector kernels
# torch runs there (a three-part key wins over the two-part one). On CPU each was measured to
# pay on that class (python -m bench.worker --kernels NAMES, docs/performance.md): on AVX2
# (fp32, 135M, 4 x 256) every one of the three pays, the fused RMSNorm +8%; on AVX-512 it
# cost 4% for its 120 MB, so it is off there. The joined projections act only under autocast,
# the CPU attention only in bf16 (picked only where bf16 matmuls are native). On CUDA and MPS:
# the kernels with no device-specific code; bench/gpu.sh times auto against off on a GPU.
AUTO: dict[tuple[str, ...], tuple[str, ...]] = {
    ("cpu", "fp32"): ("chunked_loss", "mlp", "rms_norm"),
    ("cpu", "fp32", "AVX512"): ("chunked_loss", "mlp"),
    ("cpu", "bf16"): ("chunked_loss", "mlp", "attention", "rms_norm"),
    # fp16 on CPU is slow (no fp16 matmul units) and is here to prove CUDA's fp16 path: its set
    ("cpu", "fp16"): ("chunked_loss", "mlp", "attention"),
    ("cuda", "fp32"): ("chunked_loss", "mlp", "document_mask"),
    ("cuda", "bf16"): ("chunked_loss", "mlp", "attention", "document_mask"),
    ("cuda", "fp16"): ("chunked_loss", "mlp", "attention", "document_mask"),
    ("mps", "fp32"): ("chunked_loss", "mlp"),
}


def choose_kernels(device_type: str, precision: str, kernels: str = "auto") -> tuple[str, ...]:
    """The kernel names `kernels` means on this device and precision: "auto" (`AUTO`), "off",
    or a comma-separated list of names (to measure one kernel against the plain model)."""
    if kernels == "off":
        return ()
    if kernels == "auto":
        vector = torch.backends.cpu.get_cpu_capability() if device_type == "cpu" else ""
        return AUTO.get((device_type, precision, vector), AUTO.get((device_type, precision), ()))
    names = tuple(n.strip() for n in kernels.split(",") if n.strip())
    unknown = [n for n in names if n not in KERNELS]
    if unknown or not names:
        raise ValueError(
            f"train.kernels '{kernels}' is unknown; use auto, off or a comma-separated list of "
            f"{', '.join(KERNELS)}"
        )
    return names


def prepare_for_training(
    model: CustomLLM, device_type: str, precision: str, kernels: str = "auto"
) -> CustomLLM:
    """Put `model` in training mode with the kernels chosen for `device_type` ("cpu",
    "cuda", "mps") and `precision` ("fp32", "bf16", "fp16") swapped in, in place. Call it
    before wrapping the model (DDP, FSDP, torch.compile). The twin of
    `smoltrain.generate.prepare_for_generation`."""
    chosen = choose_kernels(device_type, precision, kernels)
    for name in chosen:
        plain, kernel, _ = KERNELS[name]
        for module in model.modules():
            if type(module) is plain and not _has_wrapped_projections(module):
                swap_class(module, kernel)
    return model.train()


def _has_wrapped_projections(module: nn.Module) -> bool:
    """The joined-projection kernels compute with their sublayers' weights themselves: a
    sublayer wrapped by something else (a LoRA adapter) would be bypassed, so a module with
    one keeps its plain forward."""
    return any(
        name.endswith("_proj") and type(child) is not nn.Linear for name, child in module.named_children()
    )


def active_kernels(model: nn.Module) -> list[str]:
    """The names of the kernels in `model`, in `KERNELS`' order."""
    classes = {type(m) for m in model.modules()}
    return [name for name, (_, kernel, _) in KERNELS.items() if kernel in classes]
