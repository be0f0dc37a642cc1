"""One optimizer step (accumulation, clipping, loss scaling, the non-finite policy) and the
loss-spike guard."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from smoltrain.device import autocast, to_device
from smoltrain.errors import TrainingError
from smoltrain.train.checkpoint import (
    checkpoint_root,
    resolve_checkpoint_dir,
    roll_back_to,
)
from smoltrain.train.optim import lr_at, peak_lrs
from smoltrain.train.parallel import (
    broadcast_object,
    clip_grad_norm,
    gradient_sync,
)
from smoltrain.train.setup import Run, Window


@dataclass
class StepResult:
    loss: float  # mean over the micro-batches and ranks
    grad_norm: float  # before clipping (0 when clipping is off)
    lr: float
    skipped: bool  # non-finite or a spike: no update was made
    stop: bool = False  # some rank was asked to stop (SIGINT/SIGTERM): all checkpoint and end


def zero_grad(run: Run) -> None:
    for optimizer in run.optimizers:
        optimizer.zero_grad(set_to_none=True)


def train_step(run: Run, stop_requested: bool = False) -> StepResult:
    """One optimizer step: gradients accumulated over `grad_accum_steps` micro-batches (synced
    across ranks on the last), clipped, applied. A non-finite loss or gradient norm, or a
    spike, skips the update and counts the step (`skip_step`). Under
    fp16, gradients that overflow halve the loss scale and the step is retried on the next
    batches, uncounted (GradScaler's search for a scale; Megatron's policy too); overflows at
    a scale below 1 are non-finite steps."""
    cfg, state, accelerator, scaler = run.cfg, run.state, run.accelerator, run.scaler
    lrs = [lr_at(state.step + 1, peak, cfg.schedule) for peak in peak_lrs(cfg)]
    for optimizer, lr in zip(run.optimizers, lrs, strict=True):
        for group in optimizer.param_groups:
            group["lr"] = lr
    lr = lrs[0]  # AdamW's, the one logged
    device = accelerator.device
    step_loss = torch.zeros((), device=device)
    for micro in range(run.grad_accum_steps):
        batch = to_device(next(run.batches), device)
        with gradient_sync(run.model, accelerator, run.fsdp, sync=micro == run.grad_accum_steps - 1):
            with autocast(device.type, run.precision):
                loss = run.forward(**batch, return_logits=False).loss
            scaled = loss / run.grad_accum_steps
            accelerator.backward(scaler.scale(scaled) if scaler else scaled)
        step_loss += loss.detach() / run.grad_accum_steps
    if scaler:
        for optimizer in run.torch_optimizers:  # clipping and the norm see the true gradients
            scaler.unscale_(optimizer)
    if cfg.optim.grad_clip > 0:
        grad_norm = clip_grad_norm(run.model, accelerator, run.fsdp, cfg.optim.grad_clip)
    elif scaler:  # not clipped, but an overflow must still be seen
        grad_norm = torch.nn.utils.get_total_norm(
            [p.grad for p in run.model.parameters() if p.grad is not None]
        )
    else:
        grad_norm = torch.zeros((), device=device)
    # this rank's stop request rides with the loss: every rank learns whether any one had it
    shared = torch.stack([step_loss.float(), torch.full((), float(stop_requested), device=device)])
    step_loss, stops = accelerator.reduce(shared, reduction="mean")
    # the one host sync per step: the figures come back together
    loss_value, grad_norm_value, stop = torch.stack([step_loss, grad_norm.float(), stops]).tolist()
    stop = stop > 0
    finite = math.isfinite(loss_value) and math.isfinite(grad_norm_value)
    result = StepResult(loss_value, grad_norm_value, lr, skipped=True, stop=stop)
    if not finite or run.spike_guard.is_spike(loss_value, grad_norm_value):
        overflow_scale = scaler.get_scale() if scaler else 0.0
        zero_grad(run)
        if scaler:
            scaler.update()  # halves the scale after an overflow; the next unscale_ needs it
        if not finite and math.isfinite(loss_value) and overflow_scale >= 1.0:
            # GradScaler's normal search for a scale: not a step (the schedule waits for it)
            state.overflow_steps += 1
            if accelerator.is_main_process:
                print(
                    f"step {state.step + 1}: fp16 gradients overflowed at loss scale "
                    f"{overflow_scale:g}; skipped, retried at half the scale",
                    file=sys.stderr,
                )
            return result
        return skip_step(run, result, spike=finite)
    run.spike_guard.record_good(loss_value, grad_norm_value)
    # the norm was finite, so are the gradients: step without GradScaler.step's own host sync
    for optimizer in run.optimizers:
        optimizer.step()
    if scaler:
        scaler.update()
    zero_grad(run)
    state.step += 1
    state.bad_steps = 0
    state.tokens += run.tokens_per_step
    run.window.loss += loss_value
    run.window.steps += 1
    result.skipped = False
    return result


def skip_step(run: Run, result: StepResult, spike: bool) -> StepResult:
    """Count a step that made no update: a loss spike (the guard's), or a non-finite loss or
    gradient norm (`train.max_bad_steps` of those in a row stop the run). Both count toward
    the guard's rollback."""
    state, cfg = run.state, run.cfg
    state.step += 1
    run.spike_guard.record_skip(state.step)
    if spike:
        state.spike_steps += 1
        run.metrics.write(
            state.step, event="spike_skipped", spike_loss=result.loss, spike_grad_norm=result.grad_norm
        )
        what = f"loss {result.loss:.3f} / grad norm {result.grad_norm:.3f} spiked"
    else:
        state.bad_steps += 1
        state.skipped_steps += 1
        what = f"loss {result.loss} is not finite"
    if run.accelerator.is_main_process:
        print(f"step {state.step}: {what}; skipped", file=sys.stderr)
    if not spike and state.bad_steps >= cfg.train.max_bad_steps:
        raise TrainingError(
            f"{state.bad_steps} non-finite steps in a row at step {state.step}; stopping. "
            f"The last good checkpoint is in {checkpoint_root(run.out)}; lower optim.lr or "
            "check the data (under fp16, try bf16 or fp32), then resume from it"
        )
    return result


def roll_back_if_spiking(run: Run) -> None:
    """After `train.spike_rollback` skipped spikes within `train.spike_window` steps, load the
    last checkpoint's weights, optimizer and counters, and go on with the data where it is:
    the window that caused the spikes is not read again."""
    t, state = run.cfg.train, run.state
    if not run.spike_guard.rollback_due(state.step):
        return
    is_main = run.accelerator.is_main_process
    latest = resolve_checkpoint_dir(str(checkpoint_root(run.out)), required=False) if is_main else None
    target = broadcast_object(str(latest) if latest else None, run.accelerator)
    if target is None:
        raise TrainingError(
            f"{len(run.spike_guard.skips)} loss spikes within {t.spike_window} steps at step {state.step} "
            "and no checkpoint to roll back to; lower optim.lr, check the data, or raise train.spike_factor"
        )
    times = run.rollbacks_to.get(target, 0) + 1
    if times > 3:
        raise TrainingError(
            f"rolled back to {target} 3 times and the spikes persist (step {state.step}); lower "
            "optim.lr or check the data, then resume from that checkpoint"
        )
    run.rollbacks_to[target] = times
    path = Path(target) if is_main else None
    saved = roll_back_to(path, run.accelerator, run.raw_model, run.torch_optimizers, run.scaler)
    spiked, back_to = list(run.spike_guard.skips), saved["state"]["step"]
    run.metrics.truncate(back_to)
    if is_main:
        print(
            f"step {state.step}: {len(spiked)} loss spikes ({spiked}); rolled back to step "
            f"{back_to}, the data moves on",
            file=sys.stderr,
        )
    state.step, state.tokens = back_to, saved["state"]["tokens"]
    state.rollbacks += 1
    run.metrics.write(back_to, event="rolled_back", spike_steps=spiked, rolled_back_from=spiked[-1])
    run.spike_guard.skips.clear()  # the good steps' history stays: the guard stays armed
    state.bad_steps = 0
    run.window = Window()
