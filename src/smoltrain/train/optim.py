"""Optimizers (AdamW, Muon) and the learning-rate schedules (cosine, WSD)."""

from __future__ import annotations

import math

import torch

from smoltrain.train.config import ScheduleConfig, TrainConfig


def wsd_decay_start(s: ScheduleConfig) -> int:
    """The last step at the peak learning rate of a warmup-stable-decay schedule."""
    if s.decay_start is not None:
        return s.decay_start
    return s.max_steps - int(s.decay_fraction * (s.max_steps - s.warmup_steps))


def lr_at(step: int, peak: float, s: ScheduleConfig) -> float:
    """Learning rate of optimizer step `step` (1-based). Linear warmup to `peak`, then the
    chosen decay to `peak * min_lr_ratio` at `max_steps`; past it, `past_end_lr`."""
    if step > s.max_steps:
        return s.past_end_lr
    if step <= s.warmup_steps:
        return peak * step / max(1, s.warmup_steps)
    floor = peak * s.min_lr_ratio
    if s.kind == "constant":
        return peak
    if s.kind == "wsd":
        decay_start = wsd_decay_start(s)
        if step <= decay_start:
            return peak
        progress = (step - decay_start) / max(1, s.max_steps - decay_start)
        return floor + (peak - floor) * (1 - progress)
    progress = (step - s.warmup_steps) / max(1, s.max_steps - s.warmup_steps)
    if s.kind == "linear":
        return floor + (peak - floor) * (1 - progress)
    # cosine: the one kind left (schedule.kind is checked when the config is loaded)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizers(
    model: torch.nn.Module, cfg: TrainConfig, device_type: str
) -> list[torch.optim.Optimizer]:
    """AdamW (`optim.name: adamw`), or Muon for the hidden layers' matrices beside AdamW for
    the rest (`muon`): Muon orthogonalizes whole 2-D updates, which suits neither an embedding
    row lookup nor a norm's vector. By default norms, biases and embeddings get no weight
    decay (they are not matrices that decay regularizes, nanoGPT's and litgpt's choice).
    Their peak learning rates, in the same order: `peak_lrs`."""
    o = cfg.optim
    decay, no_decay, hidden = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.dim() < 2 or "embed_tokens" in name
        if o.name == "muon" and not exempt and "lm_head" not in name:
            hidden.append(p)
        else:
            (no_decay if exempt and not o.decay_norms_and_embeddings else decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]  # torch's checkpointing of two optimizers refuses empty ones
    # the fused kernel: one pass over the parameters, no foreach temporaries (+3% on CPU)
    fused = o.fused if o.fused is not None else device_type in ("cuda", "cpu")
    adamw = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused or None)
    if o.name == "adamw":
        return [adamw]
    muon = torch.optim.Muon(hidden, lr=o.muon_lr, weight_decay=o.weight_decay, momentum=o.muon_momentum)
    return [adamw, muon]


def peak_lrs(cfg: TrainConfig) -> list[float]:
    """The peak learning rate of each optimizer `build_optimizers` returns."""
    return [cfg.optim.lr] + ([cfg.optim.muon_lr] if cfg.optim.name == "muon" else [])


def torch_optimizers(optimizers: list) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside Accelerate's wrappers (FSDP runs use them unwrapped)."""
    return [getattr(o, "optimizer", o) for o in optimizers]
