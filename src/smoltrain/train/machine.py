"""What this machine can do and what smoltrain will pick on it (`smoltrain env`): versions,
devices, the CPU's vector extensions and measured matmul speeds, the precision and kernels
`auto` chooses, the installed extras, and the memory a training run of a preset needs.

The memory estimate counts what a training step keeps (docs/performance.md has the
measurements it was checked against):
- weights, gradients and AdamW's two moments in fp32 (16 bytes a parameter), plus the 16-bit
  copy of the layers' weights that autocast keeps for backward;
- the activations kept for backward, per token and layer: the residual stream twice (it
  enters both norms), both norms' outputs, q, k, v and the attention output, the MLP's gate
  and up (the `mlp` kernel recomputes their product; without it, the product too), and the
  attention probabilities where attention keeps them (SDPA's math path, the CPU bf16 kernel);
  with gradient checkpointing, only each layer's input and one layer's worth;
- the loss: one chunk of logits and its gradient with `chunked_loss`, else the full
  (tokens x vocab) logits, their softmax and gradient;
- the runtime itself (torch's libraries and allocator, or the CUDA context).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
from dataclasses import asdict, dataclass

import torch

from smoltrain.device import (
    ISA_SETTINGS,
    choose_precision,
    cpu_info,
    cpu_matmul_speeds,
    format_flops,
    native_flags,
)
from smoltrain.model.config import ModelConfig
from smoltrain.model.kernels import choose_kernels
from smoltrain.model.kernels.chunked_loss import default_chunk_size

GB = 1e9
# The process before the model: torch, its libraries and the Python objects (CPU, resident
# set measured at about 0.45 GB), or the CUDA context and cuBLAS workspace (about 0.6 GB).
RUNTIME_BYTES = {"cpu": 0.45e9, "cuda": 0.6e9, "mps": 0.3e9}
# Optional parts and the module that shows each is installed (found, not imported).
EXTRAS = {
    "eval (lm-eval)": "lm_eval",
    "app (gradio)": "gradio",
    "tracking (wandb)": "wandb",
    "tracking (tensorboard)": "tensorboard",
    "llama.cpp (llama-cpp-python)": "llama_cpp",
    "lora (peft)": "peft",
}


@dataclass(frozen=True)
class MemoryEstimate:
    weights: float  # bytes: fp32 weights, and autocast's 16-bit copies
    gradients: float
    optimizer: float  # AdamW's two moments
    activations: float  # kept for backward at the end of the forward
    loss: float  # the loss's logits and their gradient
    runtime: float  # the process before the model (libraries, CUDA context)

    @property
    def total(self) -> float:
        return sum(asdict(self).values())


def estimate_training_memory(
    config: ModelConfig,
    micro_batch: int,
    context: int,
    device_type: str,
    precision: str,
    kernels: tuple[str, ...],
    gradient_checkpointing: bool = False,
    lora_rank: int = 0,
) -> MemoryEstimate:
    """Peak memory of one training step of `config` at `micro_batch` x `context` tokens with
    AdamW on one process (see the module's docstring for what is counted). `lora_rank`:
    adapters of that rank on every linear layer train, the model's own weights are frozen
    (no gradients, no optimizer state for them)."""
    params = config.num_params()
    trained = lora_parameters(config, lora_rank) if lora_rank else params
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * config.head_dim
    tokens = micro_batch * context
    half = precision in ("bf16", "fp16")
    act = 2 if half else 4  # bytes of a matmul's output under autocast
    residual = 2 * h * 4  # the fp32 residual stream, kept by both norms
    per_token = residual + (2 * h + h + 2 * kv + h) * act + 2 * i * act
    if "mlp" not in kernels:
        per_token += i * act  # silu(gate) * up, kept for the down projection
    keeps_probabilities = device_type != "cuda" and (not half or "attention" in kernels)
    if keeps_probabilities:  # SDPA's math path on CPU; the CPU bf16 kernel keeps them up to 512
        per_token += config.num_attention_heads * min(context, 512 if half else context) * act
    if gradient_checkpointing:
        activations = tokens * (layers * h * 4 + per_token)
    else:
        activations = tokens * layers * per_token
    vocab = config.vocab_size
    if "chunked_loss" in kernels:
        chunk = min(tokens, default_chunk_size(vocab, device_type))
        loss = 2 * chunk * vocab * 4  # one chunk's logits and their softmax/gradient, fp32
    else:
        loss = 3 * tokens * vocab * 4  # logits, fp32 log-softmax, their gradient
    return MemoryEstimate(
        # under autocast the layers' weights are kept cast for backward; the head's per chunk
        weights=(params + (trained if lora_rank else 0)) * 4
        + (params - vocab * config.hidden_size) * (2 if half else 0),
        gradients=trained * 4,
        optimizer=trained * 8,
        activations=activations,
        loss=loss,
        runtime=RUNTIME_BYTES.get(device_type, 0.0),
    )


def lora_parameters(config: ModelConfig, rank: int) -> int:
    """The parameters of rank-`rank` adapters (A: rank x in, B: out x rank) on every linear
    layer of every decoder layer."""
    h, i, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    q = config.num_attention_heads * config.head_dim
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]  # (in, out): q k v o gate up down
    return config.num_hidden_layers * sum(rank * (n_in + n_out) for n_in, n_out in shapes)


def device_memory(device: torch.device) -> float:
    """Bytes a training process on `device` can have at most: the GPU's memory, or the
    machine's (or its container's) RAM."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    if device.type == "mps":
        return float(torch.mps.recommended_max_memory())
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:  # a container's limit (cgroup v2), when it has one
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        total = min(total, int(limit)) if limit.isdigit() else total
    except OSError:
        pass
    return float(total)


def check_step_fits(
    config: ModelConfig,
    micro_batch: int,
    context: int,
    device: torch.device,
    precision: str,
    kernels: tuple[str, ...],
    gradient_checkpointing: bool,
    shards: int = 1,
    lora_rank: int = 0,
) -> None:
    """Refuse, before anything is allocated, a step whose estimated memory exceeds all the
    device has (a micro-batch of 10^9 allocated until the kernel killed the process, with no
    word). The estimate is `smoltrain env`'s, within about 25%: only a step clearly too big
    is refused; one that merely may not fit is left to try."""
    estimate = estimate_training_memory(
        config, micro_batch, context, device.type, precision, kernels, gradient_checkpointing, lora_rank
    )
    sharded = (estimate.weights + estimate.gradients + estimate.optimizer) * (1 - 1 / shards)
    need, have = estimate.total - sharded, device_memory(device)
    if need > 1.5 * have:
        raise ValueError(
            f"one training step of train.micro_batch_size={micro_batch} x data.context_length={context} "
            f"needs about {need / GB:,.1f} GB ({precision}; weights, gradients and AdamW "
            f"{(estimate.weights + estimate.gradients + estimate.optimizer - sharded) / GB:,.1f} GB, "
            f"activations {(estimate.activations + estimate.loss) / GB:,.1f} GB), and this {device.type} "
            f"has {have / GB:,.1f} GB: lower train.micro_batch_size (raising train.grad_accum_steps keeps "
            "the batch) or turn on train.gradient_checkpointing; `smoltrain env --micro-batch B --context T` "
            "estimates a setting before a run"
        )


def _devices() -> list[dict]:
    found = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        found.append(
            {
                "device": f"cuda:{index}",
                "name": props.name,
                "memory_gb": round(props.total_memory / GB, 1),
                "capability": f"{props.major}.{props.minor}",
                "bf16": torch.cuda.is_bf16_supported(),
            }
        )
    if torch.backends.mps.is_available():
        found.append({"device": "mps", "name": "Apple GPU (MPS)", "bf16": False})
    return found


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return importlib.metadata.version(module.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return "installed"


def machine_report(
    device_type: str, preset: str, micro_batch: int, context: int, precision: str = "auto", lora_rank: int = 0
) -> dict:
    """Everything `smoltrain env` prints, as one JSON-able dict."""
    from smoltrain.model.config import get_preset

    info = cpu_info()
    speeds = cpu_matmul_speeds()
    choice = choose_precision(precision, device_type, speeds if device_type == "cpu" else None)
    kernels = choose_kernels(device_type, choice.precision)
    config = get_preset(preset)
    estimate = estimate_training_memory(
        config, micro_batch, context, device_type, choice.precision, kernels, lora_rank=lora_rank
    )
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "mps": torch.backends.mps.is_available(),
        "devices": _devices(),
        "cpu": {
            "model": info.model,
            "threads": info.threads,
            "torch_kernels": info.capability,
            "isa_settings": {k: os.environ[k] for k in ISA_SETTINGS if k in os.environ},
            "vector_flags": list(info.flags),
            "native_bf16": native_flags(info, "bf16"),
            "native_fp16": native_flags(info, "fp16"),
            "matmul_gflops": {name: round(flops / 1e9, 2) for name, flops in speeds.items()},
        },
        "auto": {
            "device": device_type,
            "precision": choice.precision,
            "why": choice.reason,
            "warning": choice.warning,
            "kernels": list(kernels),
        },
        "extras": {name: _version(module) for name, module in EXTRAS.items()},
        "memory": {
            "preset": preset,
            "parameters": config.num_params(),
            "micro_batch": micro_batch,
            "context": context,
            "precision": choice.precision,
            "lora_rank": lora_rank,
            **{k: round(v / GB, 3) for k, v in asdict(estimate).items()},
            "total_gb": round(estimate.total / GB, 2),
        },
    }


def format_report(report: dict) -> str:
    """`machine_report` as the lines `smoltrain env` prints."""
    cpu, auto, mem = report["cpu"], report["auto"], report["memory"]
    speeds = ", ".join(f"{k} {format_flops(v * 1e9)}" for k, v in cpu["matmul_gflops"].items())
    devices = "; ".join(
        f"{d['device']} {d['name']}" + (f" {d['memory_gb']} GB, bf16 {d['bf16']}" if "memory_gb" in d else "")
        for d in report["devices"]
    )
    extras = ", ".join(f"{k} {v}" if v else f"{k} missing" for k, v in report["extras"].items())
    parts = ", ".join(
        f"{k} {mem[k]:.2f}" for k in ("weights", "gradients", "optimizer", "activations", "loss", "runtime")
    )
    lines = {
        "python / torch": f"{report['python']} / {report['torch']}, CUDA {report['cuda'] or 'none'}, "
        f"MPS {'yes' if report['mps'] else 'no'}",
        "devices": devices or "cpu only",
        "cpu": f"{cpu['model']}, {cpu['threads']} threads, torch kernels {cpu['torch_kernels']}"
        + "".join(f", {k}={v}" for k, v in cpu["isa_settings"].items()),
        "cpu flags": " ".join(cpu["vector_flags"]) or "(not readable here)",
        "native 16-bit flags": f"bf16 {' '.join(cpu['native_bf16']) or 'none'}, "
        f"fp16 {' '.join(cpu['native_fp16']) or 'none'}",
        "matmul (measured)": speeds,
        "auto picks": f"device {auto['device']}, precision {auto['precision']} ({auto['why']})",
        "auto kernels": ", ".join(auto["kernels"]) or "none (the plain model)",
        "extras": extras,
        "training memory": f"{mem['preset']} ({mem['parameters'] / 1e6:,.1f}M parameters), micro-batch "
        f"{mem['micro_batch']} x {mem['context']} tokens, {mem['precision']}, AdamW"
        + (f" on LoRA rank {mem['lora_rank']} adapters" if mem["lora_rank"] else "")
        + ": about "
        f"{mem['total_gb']:.1f} GB ({parts} GB)",
    }
    if auto["warning"]:
        lines["warning"] = auto["warning"]
    width = max(map(len, lines))
    return "\n".join(f"{k + ':':<{width + 1}} {v}" for k, v in lines.items())
