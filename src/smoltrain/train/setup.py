"""Everything a run needs, built once: the accelerator, the model (sharded or not), optimizers,
data, metrics and the checkpoint it resumes from, gathered in `Run`."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from smoltrain.atomic import FolderLock
from smoltrain.data.loader import build_loader
from smoltrain.data.mixture import describe as describe_data
from smoltrain.data.mixture import uses_plan
from smoltrain.data.stream import resolve_rank_split
from smoltrain.device import (
    choose_precision,
    cpu_matmul_speeds,
    cuda_training_settings,
    format_flops,
    peak_flops,
    pick_device,
)
from smoltrain.errors import TrainingError
from smoltrain.formats.model_io import load_model, model_skeleton
from smoltrain.model.config import ModelConfig
from smoltrain.model.kernels import KERNELS, active_kernels, prepare_for_training
from smoltrain.model.model import CustomLLM
from smoltrain.perf import cpu_training_tweaks
from smoltrain.train.checkpoint import (
    CHECKPOINTS,
    RunState,
    remove_partial_checkpoints,
    resolve_checkpoint_dir,
    restore_checkpoint,
)
from smoltrain.train.config import TrainConfig, config_warnings, load_config
from smoltrain.train.machine import check_step_fits
from smoltrain.train.metrics import (
    MetricsLog,
    flatten,
    print_start,
    truncate_metrics,
)
from smoltrain.train.optim import build_optimizers, torch_optimizers
from smoltrain.train.output import clear_old_run, prepare_output_dir
from smoltrain.train.parallel import (
    broadcast_object,
    shard_model,
)
from smoltrain.train.spike_guard import SpikeGuard


def setup_accelerator(cfg: TrainConfig):
    """The device, the process group and the trackers."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    if "wandb" in cfg.log.trackers and not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")  # no key: log locally, sync later
    return Accelerator(
        cpu=pick_device(cfg.train.device) == "cpu",
        # the rotary tables are buffers computed identically on every rank: no broadcast
        kwargs_handlers=[
            DistributedDataParallelKwargs(broadcast_buffers=False),
            # ranks wait in a collective while rank 0 writes a checkpoint (a 1.7B FSDP one: ~20 GB)
            InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.train.dist_timeout_minutes)),
        ],
        # autocast and fp16's loss scaling are the loop's own (`autocast`, `Run.scaler`): one
        # path on CUDA and CPU, where Accelerate has no fp16, so it is tested here
        mixed_precision="no",
        log_with=list(cfg.log.trackers) or None,
        project_dir=cfg.output_dir,
        step_scheduler_with_optimizer=False,
    )


def agree_on_config(cfg: TrainConfig, accelerator) -> TrainConfig:
    """Every rank trains with rank 0's config (on a resume, only rank 0 may hold the
    checkpoint it comes from); each keeps its own output folder, a local path on nodes that
    share no filesystem."""
    if accelerator.num_processes == 1:
        return cfg
    agreed = load_config(base=broadcast_object(cfg.to_dict(), accelerator))
    agreed.output_dir = cfg.output_dir
    return agreed


def build_model_config(cfg: TrainConfig, tokenizer) -> ModelConfig:
    """A new model's architecture: the preset with its overrides, the vocabulary and special
    tokens following the tokenizer's."""
    model_config: ModelConfig = cfg.model.build_config()
    if "vocab_size" not in cfg.model.overrides:  # the vocabulary follows the tokenizer
        model_config.vocab_size = -(-len(tokenizer) // 64) * 64  # rows in multiples of 64: faster matmuls
    model_config.bos_token_id, model_config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model_config.pad_token_id = tokenizer.pad_token_id
    return model_config


def build_model(cfg: TrainConfig, tokenizer) -> CustomLLM:
    """From `model.init_from`'s weights (continued pre-training; on resume the checkpoint's
    weights replace them, but the architecture still comes from there) or from scratch."""
    from smoltrain.tokenizer import check_tokenizer_fits

    if cfg.model.init_from:
        model = load_model(cfg.model.init_from)
    else:
        model = CustomLLM(build_model_config(cfg, tokenizer))
    check_tokenizer_fits(model.config.vocab_size, tokenizer)
    if cfg.train.lora.rank:
        from smoltrain.train.lora import add_adapters

        model = add_adapters(model, cfg.train.lora)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def build_sharded_model(cfg: TrainConfig, tokenizer, accelerator, precision: str) -> CustomLLM:
    """The model sharded with FSDP2 and never whole on any GPU: rank 0 builds (or loads) it
    on the CPU, every rank builds it on the meta device (no memory), shards it, allocates its
    own shards and receives their values from rank 0. With `train.compile` each decoder
    layer is compiled before it is sharded (the whole model would not compile around
    FSDP's hooks); under bf16 the shards are gathered and computed in bf16, gradients are
    reduced in fp32 (MixedPrecisionPolicy)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    t, device, is_main = cfg.train, accelerator.device, accelerator.is_main_process
    whole = build_model(cfg, tokenizer) if is_main else None
    config = broadcast_object(whole.config if is_main else None, accelerator)
    full_state = whole.state_dict() if is_main else {}
    del whole
    model = model_skeleton(config)
    if t.lora.rank:
        from smoltrain.train.lora import add_adapters

        with torch.device("meta"):
            model = add_adapters(model, t.lora)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model = prepare_for_training(model, device.type, precision, t.kernels)
    if t.compile:
        for layer in model.layers:
            layer.compile()
    model = shard_model(model, device, torch.bfloat16 if precision == "bf16" else None)
    model.to_empty(device=device)
    model.rotary_emb.reset_parameters()  # buffers outside the state dict: computed, not sent
    set_model_state_dict(
        model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )
    return model


def check_data_and_tasks(cfg: TrainConfig, tokenizer, accelerator, samples_per_step: int) -> None:
    """Read this rank's first training block and the first held-out batch now (a few
    documents each), so that a source too small for one block or an empty eval split fails
    at start-up rather than at the first step or evaluation; and check that lm-eval is
    installed and knows every benchmark task (before a model is built, not at the first
    benchmark)."""
    data_cfg = dataclasses.replace(cfg.data, num_workers=0, shuffle_buffer=0)
    rank, world = accelerator.process_index, accelerator.num_processes
    next(iter(build_loader(data_cfg, tokenizer, 1, "train", rank, world, samples_per_step=samples_per_step)))
    next(iter(build_loader(data_cfg, tokenizer, 1, "eval")))
    if cfg.benchmarks.tasks:
        from smoltrain.evaluation.benchmarks import check_tasks

        check_tasks(cfg.benchmarks.tasks, cfg.benchmarks.include_path)


def grad_accum_steps(cfg: TrainConfig, world: int) -> int:
    """Micro-batches per optimizer step: from train.global_batch_size when it is set."""
    t = cfg.train
    if t.global_batch_size is None:
        return t.grad_accum_steps
    per_step = t.micro_batch_size * world
    if t.global_batch_size % per_step:
        raise TrainingError(
            f"train.global_batch_size {t.global_batch_size} is not divisible by micro_batch_size "
            f"{t.micro_batch_size} x {world} processes; change one of them"
        )
    return t.global_batch_size // per_step


@dataclass
class Window:
    """Progress since the last log line."""

    loss: float = 0.0
    steps: int = 0
    start: float = field(default_factory=time.perf_counter)


@dataclass
class Run:
    """Everything a training run holds, built by `setup_run`; `cfg` is the caller's, unchanged."""

    cfg: TrainConfig
    out: Path
    accelerator: Any
    precision: str
    precision_reason: str  # why this precision: auto's measurement, or the config
    model: torch.nn.Module  # wrapped for DDP, or sharded (FSDP2)
    raw_model: CustomLLM
    forward: Callable  # the model, compiled when train.compile
    optimizers: list  # Accelerate's wrappers, or the torch optimizers themselves under FSDP
    loader: Any
    batches: Iterator
    tokenizer: Any
    state: RunState
    fsdp: bool
    grad_accum_steps: int
    log_every: int
    end_step: int  # the last step this process runs
    tokens_per_step: int
    flops_per_token: float
    peak_flops: float  # per process, for MFU
    peak_source: str  # a datasheet, a measurement or the config
    metrics: MetricsLog
    bar: Any
    scaler: torch.amp.GradScaler | None  # fp16's loss scaling
    lock: FolderLock | None  # the output folder's, held by rank 0
    spike_guard: SpikeGuard  # its memory is checkpointed
    rollbacks_to: dict = field(default_factory=dict)  # checkpoint -> times rolled back to it
    window: Window = field(default_factory=Window)
    last: dict[str, float] = field(default_factory=dict)  # the latest logged figures
    start_step: int = 0
    start_eval_loss: float | None = None  # log.eval_at_start's, before the first step
    branch_of: Path | None = None  # a cooldown branch's source run folder
    segment_start: float = field(default_factory=time.perf_counter)  # training time counted from
    started: float = field(default_factory=time.perf_counter)  # set-up's start: max_minutes counts from it
    first_step_done: float | None = None  # when this process's first step ended (the time probe)
    start_eval_s: float = 0.0  # log.eval_at_start's duration
    held_out: list | None = None  # this rank's held-out batches, read at the first eval

    @property
    def torch_optimizers(self) -> list[torch.optim.Optimizer]:
        return torch_optimizers(self.optimizers)


def warn_if_slow_here(cfg: TrainConfig, precision_warning: str | None, device_type: str) -> None:
    """Said once at start-up: an explicit precision this CPU emulates, or Muon on a CPU whose
    bf16 is slow (torch.optim.Muon orthogonalizes in bf16)."""
    if precision_warning:
        print(f"warning: {precision_warning}", file=sys.stderr)
    if cfg.optim.name == "muon" and device_type == "cpu":
        speeds = cpu_matmul_speeds()
        if speeds["bf16"] < speeds["fp32"]:
            print(
                "warning: optim.name=muon: torch.optim.Muon orthogonalizes its updates in bf16, which this "
                f"CPU runs {speeds['fp32'] / speeds['bf16']:,.0f}x slower than fp32: a Muon step can cost "
                "several AdamW steps here (the quickstart's: 4x); AdamW (optim.name=adamw) is faster here",
                file=sys.stderr,
            )


def check_sample_quantize(kind: str, device_type: str, fsdp: bool) -> None:
    if kind != "off" and (device_type != "cpu" or fsdp):
        raise TrainingError(
            f"log.sample_quantize={kind} decodes samples with PyTorch's CPU kernels; this run is on "
            f"{device_type}{' with FSDP' if fsdp else ''}: leave it off (log.sample_quantize=off)"
        )


def build_model_and_optimizers(cfg: TrainConfig, tokenizer, accelerator, precision: str, fsdp: bool):
    """The model with its kernels, wrapped (DDP) or sharded (FSDP2), and its optimizers;
    then refused now if a step cannot fit in memory or llama.cpp cannot represent it (an
    `export.gguf` run), rather than at the first step or after training."""
    device, t = accelerator.device, cfg.train
    if fsdp:
        if precision == "fp16":
            raise TrainingError("train.fsdp with fp16 is not supported; use bf16 (or fp32)")
        model = build_sharded_model(cfg, tokenizer, accelerator, precision)
        optimizers = build_optimizers(model, cfg, device.type)
    else:
        model = prepare_for_training(build_model(cfg, tokenizer), device.type, precision, t.kernels)
        model, *optimizers = accelerator.prepare(model, *build_optimizers(model, cfg, device.type))
    raw = accelerator.unwrap_model(model)
    kernels = tuple(active_kernels(raw))
    context, gc = cfg.data.context_length, t.gradient_checkpointing
    shards = accelerator.num_processes if fsdp else 1
    check_step_fits(
        raw.config, t.micro_batch_size, context, device, precision, kernels, gc, shards, t.lora.rank
    )
    if cfg.export.gguf:
        from smoltrain.formats.gguf import check_exportable, check_tokenizer_exportable

        check_exportable(raw.config)
        check_tokenizer_exportable(tokenizer, raw.config.vocab_size)
    return model, optimizers


def last_step(
    cfg: TrainConfig, step: int, resume: bool, stop_at_step: int | None, is_main: bool
) -> tuple[int, int]:
    """The step this process ends at, and its log interval: the schedule's end, or on a
    resume of a finished run `resume.extra_steps` more (the reference's phase "resume"),
    or `--stop-at-step`, whichever comes first."""
    end_step, log_every = cfg.schedule.max_steps, cfg.log.log_every
    if resume and step >= cfg.schedule.max_steps:
        end_step, log_every = step + cfg.resume.extra_steps, cfg.resume.log_every
        if is_main:
            still = " (the weights do not change)" if cfg.schedule.past_end_lr == 0 else ""
            print(
                f"note: the run finished its schedule at step {step}; resuming adds "
                f"resume.extra_steps={cfg.resume.extra_steps} steps at schedule.past_end_lr="
                f"{cfg.schedule.past_end_lr}{still}. To train on, raise schedule.max_steps "
                "(with --allow-config-changes) or branch a cooldown (--phase cooldown)",
                file=sys.stderr,
            )
    if stop_at_step is not None:
        end_step = min(end_step, stop_at_step)
    return end_step, log_every


def train_loader(cfg: TrainConfig, tokenizer, accelerator, accum: int):
    """This rank's resumable loader of training micro-batches."""
    world = accelerator.num_processes
    # the inner loader's batches between checkpoints: one worker state sent per checkpoint
    snapshot_every = cfg.log.checkpoint_every * accum * (1 if cfg.data.rank_split == "document" else world)
    return build_loader(
        cfg.data,
        tokenizer,
        cfg.train.micro_batch_size,
        "train",
        accelerator.process_index,
        world,
        pin_memory=accelerator.device.type == "cuda",
        snapshot_every=snapshot_every,
        samples_per_step=cfg.train.micro_batch_size * accum * world,
    )


def progress_bar(step: int, end_step: int, wanted: bool):
    """tqdm's bar of steps, on a terminal only: a log file or a pipe gets the log lines
    alone, not a bar redrawn into it."""
    from tqdm.auto import tqdm

    on = wanted and sys.stdout.isatty()
    return tqdm(total=end_step, initial=step, disable=not on, unit="step", dynamic_ncols=True)


def mfu_peak(cfg: TrainConfig, device, precision: str) -> tuple[float, str]:
    """The peak FLOP/s MFU is against, for the precision in use (TF32 for fp32 on CUDA), and
    where it comes from."""
    t = cfg.train
    if t.peak_flops:
        return t.peak_flops, "train.peak_flops"
    tf32 = precision == "fp32" and device.type == "cuda" and t.tf32
    return peak_flops(device, "tf32" if tf32 else precision)


def setup_run(
    cfg: TrainConfig,
    phase: str = "init",
    checkpoint: str | None = None,
    stop_at_step: int | None = None,
    overwrite: bool = False,
) -> Run:
    """Build everything a run needs (the output folder, the accelerator, tokenizer, model
    with its kernels, optimizer, data, the restored checkpoint), print the start-up summary
    and return it as a `Run`."""
    from accelerate.utils import set_seed

    from smoltrain.tokenizer import load_tokenizer

    started = time.perf_counter()
    out = prepare_output_dir(cfg, phase, overwrite)
    accelerator = setup_accelerator(cfg)
    # one run per folder: rank 0 holds the lock (a second launch into it is refused)
    lock = FolderLock(out) if accelerator.is_main_process else None
    remove_partial_checkpoints(out / CHECKPOINTS)  # a killed save's; no other run is writing
    cfg = agree_on_config(cfg, accelerator)
    # rank 0 reads the checkpoint and sends each rank its part
    resume = phase in ("resume", "cooldown")  # a cooldown branch starts from a checkpoint too
    resume_dir = resolve_checkpoint_dir(checkpoint) if resume and accelerator.is_main_process else None
    device, world, t = accelerator.device, accelerator.num_processes, cfg.train
    # shards and mixtures: each rank reads its own micro-batches of one global order
    split = (
        "micro_batch" if uses_plan(cfg.data) else resolve_rank_split(cfg.data.rank_split, device.type, world)
    )
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, rank_split=split))
    choice = choose_precision(t.precision, device.type)
    precision = choice.precision
    if accelerator.is_main_process:
        warn_if_slow_here(cfg, choice.warning, device.type)
    set_seed(t.seed)
    process_tweaks = cpu_training_tweaks(device.type, t.tune_malloc)
    process_tweaks += cuda_training_settings(device.type, t.tf32)
    tokenizer = load_tokenizer(cfg.tokenizer)
    accum = grad_accum_steps(cfg, world)
    fsdp = t.fsdp and world > 1
    check_sample_quantize(cfg.log.sample_quantize, device.type, fsdp)
    # data errors need no model: said before one is built or loaded (seconds for SmolLM2)
    check_data_and_tasks(cfg, tokenizer, accelerator, t.micro_batch_size * accum * world)
    model, optimizers = build_model_and_optimizers(cfg, tokenizer, accelerator, precision, fsdp)
    raw_model: CustomLLM = accelerator.unwrap_model(model)
    sequences_per_step = t.micro_batch_size * accum * world
    loader = train_loader(cfg, tokenizer, accelerator, accum)
    scaler = torch.amp.GradScaler(device.type, init_scale=t.loss_scale) if precision == "fp16" else None
    state = RunState()
    spike_guard = SpikeGuard(t.spike_factor, t.spike_window, t.spike_rollback)
    if resume:
        state = restore_checkpoint(
            resume_dir, accelerator, raw_model, torch_optimizers(optimizers), loader, cfg, scaler, spike_guard
        )
        if accelerator.is_main_process and phase == "resume":
            truncate_metrics(out / "metrics.jsonl", state.step)
    end_step, log_every = last_step(cfg, state.step, resume, stop_at_step, accelerator.is_main_process)
    if phase != "resume":  # everything is built and checked: only now does an old run go
        if accelerator.is_main_process:
            clear_old_run(out)
        accelerator.wait_for_everyone()
    peak, peak_source = mfu_peak(cfg, device, precision)
    if cfg.log.trackers:
        accelerator.init_trackers(cfg.log.project, config=flatten(cfg.to_dict()))
    run = Run(
        cfg=cfg,
        out=out,
        accelerator=accelerator,
        precision=precision,
        precision_reason=choice.reason,
        model=model,
        raw_model=raw_model,
        forward=torch.compile(model) if t.compile and not fsdp else model,  # FSDP: per layer
        optimizers=optimizers,
        branch_of=resume_dir.parent.parent if phase == "cooldown" and resume_dir else None,
        loader=loader,
        batches=iter(loader),
        tokenizer=tokenizer,
        state=state,
        fsdp=fsdp,
        grad_accum_steps=accum,
        log_every=log_every,
        end_step=end_step,
        tokens_per_step=sequences_per_step * cfg.data.context_length,
        flops_per_token=raw_model.config.flops_per_token(cfg.data.context_length),
        peak_flops=peak,
        peak_source=peak_source,
        metrics=MetricsLog(out / "metrics.jsonl", accelerator),
        bar=progress_bar(state.step, end_step, accelerator.is_main_process and cfg.log.progress_bar),
        start_step=state.step,
        started=started,
        scaler=scaler,
        lock=lock,
        spike_guard=spike_guard,
    )
    if accelerator.is_main_process:
        print_start(start_summary(run, process_tweaks))
        for warning in config_warnings(cfg):
            print(f"warning: {warning}", file=sys.stderr)
    return run


def start_summary(run: Run, process_tweaks: list[str]) -> dict[str, str]:
    cfg, t, acc = run.cfg, run.cfg.train, run.accelerator
    kernels = active_kernels(run.raw_model)
    params = list(run.raw_model.parameters())
    trained = sum(p.numel() for p in params if p.requires_grad)
    chat = ", chat: the loss on the assistant's tokens" if cfg.data.format == "chat" else ""
    lines = {
        "model": f"{cfg.model.init_from or cfg.model.preset}: {run.raw_model.num_parameters():,} parameters",
        "batch": f"{t.micro_batch_size} x {run.grad_accum_steps} accumulation x {acc.num_processes} "
        f"process(es) x {cfg.data.context_length} tokens = {run.tokens_per_step:,} tokens/step",
        "steps": f"{run.state.step} -> {run.end_step} (schedule: {cfg.schedule.kind}, "
        f"{cfg.schedule.max_steps} steps, peak lr {cfg.optim.lr:g})",
        "device": f"{acc.device} ({_parallelism(acc, run.fsdp)}), precision {run.precision} "
        f"({run.precision_reason})",
        "kernels": "; ".join(f"{k} ({KERNELS[k][2]})" for k in kernels) or "none (the plain model)",
        "process": "; ".join(process_tweaks) or "as started",
        "mfu": f"against {format_flops(run.peak_flops)} per process ({run.peak_source})",
        "data": f"{describe_data(cfg.data)} ({cfg.data.mode}{chat}), tokenizer {cfg.tokenizer}",
        "output": cfg.output_dir,
    }
    if t.lora.rank:
        lines["lora"] = (
            f"rank {t.lora.rank}, alpha {t.lora.alpha:g} on {', '.join(t.lora.targets)} (peft): "
            f"{trained:,} of {sum(p.numel() for p in params):,} parameters train, the rest frozen"
        )
    return lines


def _parallelism(accelerator, fsdp: bool) -> str:
    """Accelerate's distributed type in words ("NO" read as a failure)."""
    if accelerator.num_processes == 1:
        return "one process"
    return f"{accelerator.num_processes} processes, " + ("FSDP2" if fsdp else "DDP")
