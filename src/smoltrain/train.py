"""Training on `accelerate.Accelerator`, in pieces that read in one screen:

    run = setup_run(cfg, ...)           # everything built; the caller's config untouched
    while not done:
        result = train_step(run)        # accumulation, clipping, the non-finite policy
        run_periodic_jobs(run, result)  # log, evaluate, sample, checkpoint
    finish(run)                         # export final/, plot, summary

An output folder holds `metrics.jsonl`, `checkpoints/step-N/` + `checkpoints/latest`
(smoltrain.checkpoint), `final/` (a Hugging Face folder) and `loss.png` (smoltrain.metrics).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from smoltrain.atomic import FolderLock, staged_folder
from smoltrain.checkpoint import (
    CHECKPOINTS,
    COMPLETE,
    RunState,
    checkpoint_config,
    checkpoint_root,
    remove_partial_checkpoints,
    resolve_checkpoint_dir,
    restore_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from smoltrain.config import ModelConfig
from smoltrain.data import build_loader, resolve_rank_split
from smoltrain.device import (
    choose_precision,
    cpu_matmul_speeds,
    cuda_training_settings,
    format_flops,
    peak_flops,
    pick_device,
)
from smoltrain.errors import TrainingError
from smoltrain.kernels import KERNELS, active_kernels, prepare_for_training
from smoltrain.machine import check_step_fits
from smoltrain.metrics import (
    MetricsLog,
    flatten,
    plot_branches,
    plot_losses,
    print_end,
    print_start,
    truncate_metrics,
)
from smoltrain.mixture import describe as describe_data
from smoltrain.mixture import uses_plan
from smoltrain.model import CustomLLM
from smoltrain.model_io import load_model
from smoltrain.parallel import (
    broadcast_object,
    clip_grad_norm,
    full_model_state,
    gradient_sync,
    load_training_state,
    read_training_state,
    shard_model,
)
from smoltrain.perf import cpu_training_tweaks
from smoltrain.train_config import ScheduleConfig, TrainConfig, config_warnings, load_config

__all__ = ["TrainingError", "config_for_cli", "lr_at", "setup_run", "train", "train_step"]

# ----------------------------------------------------------------------------- pieces


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
    if s.kind == "cosine":
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"schedule.kind '{s.kind}' is unknown; use linear, cosine, wsd or constant")


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


def autocast(device_type: str, precision: str):
    """The forward's autocast: matmuls in bf16 or fp16, reductions in fp32; none in fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device_type, dtype=dtype) if dtype else nullcontext()


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def held_out_batches(cfg: TrainConfig, tokenizer, accelerator) -> list[tuple[dict, int]]:
    """This rank's share of the first `eval_batches` batches of the held-out split, with the
    UTF-8 bytes of each batch's predicted tokens: read once per run and kept on the host
    (at most eval_batches / ranks x micro_batch_size x context_length token ids per rank),
    since finding them re-reads the source (a hub stream: ~190k documents for 1 in 200)."""
    data_cfg = dataclasses.replace(cfg.data, num_workers=0, shuffle_buffer=0)
    world, rank = accelerator.num_processes, accelerator.process_index
    loader = build_loader(data_cfg, tokenizer, cfg.train.micro_batch_size, "eval", rank, world)
    kept = []
    for batch in itertools.islice(loader, -(-cfg.log.eval_batches // world)):
        predicted = [row[row != -100].tolist() for row in batch["labels"][:, 1:]]
        kept.append((batch, sum(len(tokenizer.decode(row).encode("utf-8")) for row in predicted)))
    return kept


@torch.no_grad()
def evaluate(
    model,
    accelerator,
    held_out: list[tuple[dict, int]],
    batches: int,
    fsdp: bool = False,
    precision: str = "fp32",
) -> tuple[float, float]:
    """Mean token loss over the held-out batches (`held_out_batches`), dealt out to the ranks
    and summed over all of them before dividing, and the same loss in bits per UTF-8 byte of
    the predicted text (comparable across tokenizers). Every rank runs the same number of
    forwards, ceil(`batches` / ranks) (a rank whose share ran out repeats a batch with weight
    0), since a sharded model gathers its weights collectively in each forward."""
    model = model if fsdp else accelerator.unwrap_model(model)
    model.eval()
    # loss sum, token and byte counts in fp32: MPS has no float64 (2^24 are counted exactly)
    total = torch.zeros(3, device=accelerator.device, dtype=torch.float32)
    batch = None
    for i in range(-(-batches // accelerator.num_processes) if held_out else 0):
        fresh, n_bytes = held_out[i] if i < len(held_out) else (None, 0)
        weight = 1.0 if fresh is not None else 0.0
        batch = _to_device(fresh, accelerator.device) if fresh is not None else batch
        with autocast(accelerator.device.type, precision):
            loss = model(**batch, return_logits=False).loss
        n = (batch["labels"][:, 1:] != -100).sum() * weight
        total += torch.stack(
            [loss.float() * n, n.float(), n.new_tensor(n_bytes * weight, dtype=torch.float32)]
        )
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    loss_sum, tokens, n_bytes = total.tolist()
    return loss_sum / max(tokens, 1), loss_sum / math.log(2) / max(n_bytes, 1)


@torch.no_grad()
def sample(model: CustomLLM, tokenizer, cfg: TrainConfig) -> str:
    """A continuation of the monitoring prompt (the reference prints one every 500 steps),
    sampled with a fixed seed so that samples of different steps are comparable."""
    was_training = model.training
    model.eval()
    ids = tokenizer(cfg.log.sample_prompt, return_tensors="pt")["input_ids"].to(model.device)
    greedy = cfg.log.sample_temperature <= 0
    out = model.generate(
        ids,
        max_new_tokens=cfg.log.sample_tokens,
        do_sample=not greedy,
        temperature=1.0 if greedy else cfg.log.sample_temperature,
        top_k=cfg.log.sample_top_k,
        repetition_penalty=1.2,
        seed=cfg.train.seed,
    )
    model.train(was_training)
    return cfg.log.sample_prompt + tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def export_final(
    model: CustomLLM, accelerator, fsdp: bool, out: Path, tokenizer, gguf: str | None = None
) -> None:
    """final/: a Hugging Face folder, and final.gguf beside it when `gguf` names a dtype.
    A sharded model is gathered first (every rank joins)."""
    if fsdp:
        state = full_model_state(model)
        if not accelerator.is_main_process:
            return
        model = CustomLLM(model.config)
        model.load_state_dict(state)
    elif not accelerator.is_main_process:
        return
    with staged_folder(out / "final") as tmp:  # a kill mid-export leaves no half a folder
        model.save_pretrained(tmp, tokenizer=tokenizer)
    if gguf:
        from smoltrain.gguf_export import write_gguf

        write_gguf(model, out / "final.gguf", tokenizer, gguf, name=out.name)


class StopRequested:
    """SIGINT/SIGTERM set a flag; the loop checkpoints and exits at the next step boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum
        print(
            f"\nreceived {signal.Signals(signum).name}: saving a checkpoint, then stopping", file=sys.stderr
        )

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- set-up


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


# every file and folder a run writes into its output folder: what --overwrite removes
RUN_FILES = ("metrics.jsonl", CHECKPOINTS, "final", "final.gguf", "loss.png", "branches.png")


def holds_run(out: Path) -> bool:
    """Whether a folder holds a run: one with a completed step (logged, checkpointed or
    exported). A start that failed before its first step leaves no run behind."""
    metrics = out / "metrics.jsonl"
    logged = metrics.is_file() and '"loss"' in metrics.read_text(errors="replace")
    checkpointed = any((p / COMPLETE).is_file() for p in (out / CHECKPOINTS).glob("step-*"))
    return logged or checkpointed or (out / "final").is_dir()


def prepare_output_dir(cfg: TrainConfig, phase: str, overwrite: bool) -> Path:
    """The output folder, refused at init if it holds a run and `overwrite` is off. Nothing
    is removed here: `clear_old_run` does that once everything has been checked."""
    out = Path(cfg.output_dir)
    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise TrainingError(
            f"output folder '{out}' cannot be made: '{blocking}' is a file; pass another --output-dir "
            "(or output_dir in the config)"
        )
    if phase != "resume" and holds_run(out) and not overwrite:
        resume = f"--phase resume --checkpoint {out} to continue it, " if (out / CHECKPOINTS).is_dir() else ""
        raise TrainingError(
            f"output folder '{out}' already holds a run; pass --overwrite to replace it, "
            f"{resume}or another --output-dir"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def clear_old_run(out: Path) -> None:
    """Remove what an earlier run (or a failed start) left in `out`: called by rank 0 at init
    when the model, data and tokenizer are built, so a typo never costs the old run."""
    for name in RUN_FILES:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


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
    with torch.device("meta"):
        model = CustomLLM(config)
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


def check_data_at_start(cfg: TrainConfig, tokenizer, accelerator, samples_per_step: int) -> None:
    """Read this rank's first training block and the first held-out batch now (a few
    documents each), so that a source too small for one block or an empty eval split fails
    at start-up rather than at the first step or evaluation."""
    data_cfg = dataclasses.replace(cfg.data, num_workers=0, shuffle_buffer=0)
    rank, world = accelerator.process_index, accelerator.num_processes
    next(iter(build_loader(data_cfg, tokenizer, 1, "train", rank, world, samples_per_step=samples_per_step)))
    next(iter(build_loader(data_cfg, tokenizer, 1, "eval")))


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
    good_steps: deque = field(default_factory=deque)  # (loss, grad norm) of recent good steps
    recent_spikes: deque = field(default_factory=deque)  # steps the spike guard skipped
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


def torch_optimizers(optimizers: list) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside Accelerate's wrappers (FSDP runs use them unwrapped)."""
    return [getattr(o, "optimizer", o) for o in optimizers]


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
    from tqdm.auto import tqdm

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
    if choice.warning and accelerator.is_main_process:
        print(f"warning: {choice.warning}", file=sys.stderr)
    if cfg.optim.name == "muon" and device.type == "cpu":
        speeds = cpu_matmul_speeds()
        if speeds["bf16"] < speeds["fp32"] and accelerator.is_main_process:
            print(
                "warning: optim.name=muon: torch.optim.Muon orthogonalizes its updates in bf16, which this "
                f"CPU runs {speeds['fp32'] / speeds['bf16']:,.0f}x slower than fp32: a Muon step can cost "
                "several AdamW steps here (the quickstart's: 4x); AdamW (optim.name=adamw) is faster here",
                file=sys.stderr,
            )
    set_seed(t.seed)
    process_tweaks = cpu_training_tweaks(device.type, t.tune_malloc) + cuda_training_settings(
        device.type, t.tf32
    )
    tokenizer = load_tokenizer(cfg.tokenizer)
    accum = grad_accum_steps(cfg, world)
    fsdp = t.fsdp and world > 1
    # data errors need no model: said before one is built or loaded (seconds for SmolLM2)
    check_data_at_start(cfg, tokenizer, accelerator, t.micro_batch_size * accum * world)
    if fsdp:
        if precision == "fp16":
            raise TrainingError("train.fsdp with fp16 is not supported; use bf16 (or fp32)")
        model = build_sharded_model(cfg, tokenizer, accelerator, precision)
        optimizers = build_optimizers(model, cfg, device.type)
    else:
        model = prepare_for_training(build_model(cfg, tokenizer), device.type, precision, t.kernels)
        model, *optimizers = accelerator.prepare(model, *build_optimizers(model, cfg, device.type))
    raw_model: CustomLLM = accelerator.unwrap_model(model)
    kernels = tuple(active_kernels(raw_model))
    context, gc = cfg.data.context_length, t.gradient_checkpointing
    shards = world if fsdp else 1  # refused before the first step allocates what cannot fit
    check_step_fits(raw_model.config, t.micro_batch_size, context, device, precision, kernels, gc, shards)
    if cfg.export.gguf:  # a model llama.cpp cannot represent is refused now, not after training
        from smoltrain.gguf_export import check_exportable, check_tokenizer_exportable

        check_exportable(raw_model.config)
        check_tokenizer_exportable(tokenizer, raw_model.config.vocab_size)
    sequences_per_step = t.micro_batch_size * accum * world
    # the inner loader's batches between checkpoints: one worker state sent per checkpoint
    snapshot_every = cfg.log.checkpoint_every * accum * (1 if cfg.data.rank_split == "document" else world)
    loader = build_loader(
        cfg.data,
        tokenizer,
        t.micro_batch_size,
        "train",
        accelerator.process_index,
        world,
        pin_memory=device.type == "cuda",
        snapshot_every=snapshot_every,
        samples_per_step=sequences_per_step,
    )

    if cfg.eval.tasks:  # lm-eval installed, every task known: said now, not at the first benchmark
        from smoltrain.benchmarks import check_tasks

        check_tasks(cfg.eval.tasks, cfg.eval.include_path)
    scaler = torch.amp.GradScaler(device.type, init_scale=t.loss_scale) if precision == "fp16" else None
    state = RunState()
    if resume:
        state = restore_checkpoint(
            resume_dir, accelerator, raw_model, torch_optimizers(optimizers), loader, cfg, scaler
        )
        if accelerator.is_main_process and phase == "resume":
            truncate_metrics(out / "metrics.jsonl", state.step)
    end_step, log_every = cfg.schedule.max_steps, cfg.log.log_every
    if resume and state.step >= cfg.schedule.max_steps:
        end_step = state.step + cfg.resume.extra_steps  # the reference's phase "resume"
        log_every = cfg.resume.log_every
        if accelerator.is_main_process:
            still = " (the weights do not change)" if cfg.schedule.past_end_lr == 0 else ""
            print(
                f"note: the run finished its schedule at step {state.step}; resuming adds "
                f"resume.extra_steps={cfg.resume.extra_steps} steps at schedule.past_end_lr="
                f"{cfg.schedule.past_end_lr}{still}. To train on, raise schedule.max_steps "
                "(with --allow-config-changes) or branch a cooldown (--phase cooldown)",
                file=sys.stderr,
            )
    if stop_at_step is not None:
        end_step = min(end_step, stop_at_step)

    if phase != "resume":  # everything is built and checked: only now does an old run go
        if accelerator.is_main_process:
            clear_old_run(out)
        accelerator.wait_for_everyone()
    if t.peak_flops:
        peak, peak_source = t.peak_flops, "train.peak_flops"
    else:
        tf32 = precision == "fp32" and device.type == "cuda" and t.tf32
        peak, peak_source = peak_flops(device, "tf32" if tf32 else precision)
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
        bar=tqdm(
            total=end_step,
            initial=state.step,
            # a log file or a pipe gets the log lines alone, not a bar redrawn into it
            disable=not (accelerator.is_main_process and cfg.log.progress_bar and sys.stdout.isatty()),
            unit="step",
            dynamic_ncols=True,
        ),
        start_step=state.step,
        started=started,
        scaler=scaler,
        lock=lock,
    )
    if accelerator.is_main_process:
        print_start(start_summary(run, process_tweaks))
        for warning in config_warnings(cfg):
            print(f"warning: {warning}", file=sys.stderr)
    return run


def start_summary(run: Run, process_tweaks: list[str]) -> dict[str, str]:
    cfg, t, acc = run.cfg, run.cfg.train, run.accelerator
    kernels = active_kernels(run.raw_model)
    return {
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
        "data": f"{describe_data(cfg.data)} ({cfg.data.mode}), tokenizer {cfg.tokenizer}",
        "output": cfg.output_dir,
    }


def _parallelism(accelerator, fsdp: bool) -> str:
    """Accelerate's distributed type in words ("NO" read as a failure)."""
    if accelerator.num_processes == 1:
        return "one process"
    return f"{accelerator.num_processes} processes, " + ("FSDP2" if fsdp else "DDP")


# ----------------------------------------------------------------------- the loop


@dataclass
class StepResult:
    loss: float  # mean over the micro-batches and ranks
    grad_norm: float  # before clipping (0 when clipping is off)
    lr: float
    skipped: bool  # non-finite: no update was made
    stop: bool = False  # some rank was asked to stop (SIGINT/SIGTERM): all checkpoint and end


def zero_grad(run: Run) -> None:
    for optimizer in run.optimizers:
        optimizer.zero_grad(set_to_none=True)


def train_step(run: Run, stop_requested: bool = False) -> StepResult:
    """One optimizer step: gradients accumulated over `grad_accum_steps` micro-batches (synced
    across ranks on the last), clipped, applied. A non-finite loss or gradient norm skips the
    update and counts the step; `train.max_bad_steps` of those in a row stop the run. Under
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
        batch = _to_device(next(run.batches), device)
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
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm_value)):
        zero_grad(run)
        overflow_scale = scaler.get_scale() if scaler else 0.0
        if scaler:
            scaler.update()  # halves the scale; the next unscale_ needs this step's update
        if math.isfinite(loss_value) and overflow_scale >= 1.0:
            # GradScaler's normal search for a scale: not a step (the schedule waits for it)
            state.overflow_steps += 1
            if accelerator.is_main_process:
                print(
                    f"step {state.step + 1}: fp16 gradients overflowed at loss scale "
                    f"{overflow_scale:g}; skipped, retried at half the scale",
                    file=sys.stderr,
                )
            return StepResult(loss_value, grad_norm_value, lr, skipped=True, stop=stop)
        state.step += 1
        state.bad_steps += 1
        state.skipped_steps += 1
        if cfg.train.spike_factor > 0:  # the guard counts it as a spike: a rollback comes first
            run.recent_spikes.append(state.step)
        if accelerator.is_main_process:
            print(f"step {state.step}: loss {loss_value} is not finite; skipped", file=sys.stderr)
        if state.bad_steps >= cfg.train.max_bad_steps:
            raise TrainingError(
                f"{state.bad_steps} non-finite steps in a row at step {state.step}; stopping. "
                f"The last good checkpoint is in {checkpoint_root(run.out)}; lower optim.lr or "
                "check the data (under fp16, try bf16 or fp32), then resume from it"
            )
        return StepResult(loss_value, grad_norm_value, lr, skipped=True, stop=stop)
    if is_spike(run, loss_value, grad_norm_value):
        zero_grad(run)
        if scaler:
            scaler.update()
        state.step += 1
        state.spike_steps += 1
        run.recent_spikes.append(state.step)
        run.metrics.write(
            state.step, event="spike_skipped", spike_loss=loss_value, spike_grad_norm=grad_norm_value
        )
        if accelerator.is_main_process:
            print(
                f"step {state.step}: loss {loss_value:.3f} / grad norm {grad_norm_value:.3f} spiked; skipped",
                file=sys.stderr,
            )
        return StepResult(loss_value, grad_norm_value, lr, skipped=True, stop=stop)
    run.good_steps.append((loss_value, grad_norm_value))
    if len(run.good_steps) > cfg.train.spike_window:
        run.good_steps.popleft()
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
    run.bar.update(1)
    return StepResult(loss_value, grad_norm_value, lr, skipped=False, stop=stop)


def is_spike(run: Run, loss: float, grad_norm: float) -> bool:
    """Whether the loss or the grad norm jumps above `train.spike_factor` times its mean over
    the last `train.spike_window` good steps (judged once that many are seen; every rank
    decides alike, from the reduced figures)."""
    t = run.cfg.train
    if t.spike_factor <= 0 or len(run.good_steps) < t.spike_window:
        return False
    mean_loss = sum(loss for loss, _ in run.good_steps) / len(run.good_steps)
    mean_norm = sum(norm for _, norm in run.good_steps) / len(run.good_steps)
    return loss > t.spike_factor * mean_loss or (mean_norm > 0 and grad_norm > t.spike_factor * mean_norm)


def roll_back_if_spiking(run: Run) -> None:
    """After `train.spike_rollback` skipped spikes within `train.spike_window` steps, load the
    last checkpoint's weights, optimizer and counters, and go on with the data where it is:
    the window that caused the spikes is not read again."""
    t, state = run.cfg.train, run.state
    while run.recent_spikes and run.recent_spikes[0] <= state.step - t.spike_window:
        run.recent_spikes.popleft()
    if len(run.recent_spikes) < t.spike_rollback:
        return
    is_main = run.accelerator.is_main_process
    latest = resolve_checkpoint_dir(str(checkpoint_root(run.out)), required=False) if is_main else None
    target = broadcast_object(str(latest) if latest else None, run.accelerator)
    if target is None:
        raise TrainingError(
            f"{len(run.recent_spikes)} loss spikes within {t.spike_window} steps at step {state.step} "
            "and no checkpoint to roll back to; lower optim.lr, check the data, or raise train.spike_factor"
        )
    saved = json.loads((Path(target) / "trainer_state.json").read_text()) if is_main else None
    saved = broadcast_object(saved, run.accelerator)
    times = run.rollbacks_to.get(target, 0) + 1
    if times > 3:
        raise TrainingError(
            f"rolled back to {target} 3 times and the spikes persist (step {state.step}); lower "
            "optim.lr or check the data, then resume from that checkpoint"
        )
    run.rollbacks_to[target] = times
    tied = run.raw_model.config.tie_word_embeddings
    states = read_training_state(run.raw_model, Path(target), tied) if is_main else None
    load_training_state(run.raw_model, run.torch_optimizers, states, run.accelerator.num_processes > 1)
    if run.scaler is not None and "grad_scaler" in saved:
        run.scaler.load_state_dict(saved["grad_scaler"])
    spiked, back_to = list(run.recent_spikes), saved["state"]["step"]
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
    run.recent_spikes.clear()  # the good steps' history stays: the guard stays armed
    state.bad_steps = 0
    run.window = Window()


def _due(run: Run, every: int) -> bool:
    return run.state.step % every == 0 or run.state.step == run.end_step


def log_progress(run: Run, result: StepResult) -> None:
    """The log line: the window's mean loss, speed and MFU since the last one."""
    step, window = run.state.step, run.window
    tok_s = window.steps * run.tokens_per_step / (time.perf_counter() - window.start)
    run.last = {
        "loss": window.loss / window.steps,
        "lr": result.lr,
        "grad_norm": result.grad_norm,
        "tokens_per_s": tok_s,
        "mfu": tok_s * run.flops_per_token / (run.peak_flops * run.accelerator.num_processes),
        "tokens": run.state.tokens,
    }
    by_source = run.loader.source_tokens() if hasattr(run.loader, "source_tokens") else {}
    run.metrics.write(step, **run.last, **({"source_tokens": by_source} if len(by_source) > 1 else {}))
    run.bar.set_postfix(loss=f"{run.last['loss']:.3f}", tok_s=f"{tok_s:,.0f}")
    run.window = Window()


def evaluate_and_log(run: Run) -> None:
    if run.held_out is None:
        run.held_out = held_out_batches(run.cfg, run.tokenizer, run.accelerator)
    eval_loss, bpb = evaluate(
        run.model, run.accelerator, run.held_out, run.cfg.log.eval_batches, run.fsdp, run.precision
    )
    run.last["eval_loss"], run.last["eval_bpb"] = eval_loss, bpb
    perplexity = math.exp(min(eval_loss, 50))
    run.metrics.write(
        run.state.step, eval_loss=eval_loss, perplexity=perplexity, eval_bpb=bpb, tokens=run.state.tokens
    )
    if run.accelerator.is_main_process:
        figures = f"perplexity {perplexity:.1f}, {bpb:.3f} bits/byte"
        run.bar.write(f"step {run.state.step}: eval loss {eval_loss:.3f} ({figures})")


def benchmark_and_log(run: Run) -> None:
    """lm-eval's tasks (eval.tasks) on the model as it is now, every rank scoring its share;
    scores go to metrics.jsonl and the trackers as task/metric. The global RNG is put back
    afterwards (lm-eval seeds it), so a run with benchmarks trains as one without."""
    from smoltrain.benchmarks import SmolLM, evaluate_tasks, scores

    b, step = run.cfg.eval, run.state.step
    start, rng = time.perf_counter(), rng_state()
    model = run.model if run.fsdp else run.raw_model
    model.eval()
    try:
        lm = SmolLM(
            model,
            run.tokenizer,
            batch_size=b.batch_size,
            amp=lambda: autocast(model.device.type, run.precision),
        )
        results = evaluate_tasks(lm, b.tasks, b.include_path, b.limit, b.num_fewshot, quiet=True)
    finally:
        model.train()
        set_rng_state(rng)
    seconds = time.perf_counter() - start
    if results is None:  # ranks other than 0
        return
    found = scores(results)
    run.last.update(found)
    run.metrics.write(step, tokens=run.state.tokens, benchmark_s=seconds, **found)
    shown = ", ".join(f"{k} {v:.3f}" for k, v in found.items() if not k.endswith("_stderr"))
    run.bar.write(f"step {step}: {shown} ({seconds:.0f}s)")


def sample_and_log(run: Run) -> None:
    # a sharded model generates on every rank together; otherwise rank 0 alone
    is_main = run.accelerator.is_main_process
    text = sample(run.raw_model, run.tokenizer, run.cfg) if run.fsdp or is_main else ""
    run.metrics.write(run.state.step, sample=text)
    if is_main:
        run.bar.write(f"step {run.state.step} sample: {text!r}")


# schedule.max_minutes: the steps timed before the schedule's length is fixed (the first,
# which warms up allocators and caches, is left out)
BUDGET_PROBE_STEPS = 4


def fit_schedule_to_time(run: Run) -> None:
    """schedule.max_minutes: from the speed of steps 2..BUDGET_PROBE_STEPS, fix max_steps to
    the most steps that end within the budget, the final eval included (rank 0 decides for
    all). Only what follows the warmup depends on max_steps, so with warmup past this step
    the run is the one a plain max_steps of that length would give. The run's config copy
    holds the result (and no budget), so a resume continues the same schedule."""
    cfg, step = run.cfg, run.state.step
    now = time.perf_counter()
    step_s = (now - run.first_step_done) / (step - run.start_step - 1)
    if run.start_eval_s:
        eval_s = run.start_eval_s
    else:  # forward only: about a third of a training step's work per token
        eval_tokens = cfg.log.eval_batches * cfg.train.micro_batch_size * cfg.data.context_length
        eval_s = eval_tokens / (run.tokens_per_step / run.accelerator.num_processes) * step_s / 3
    left = cfg.schedule.max_minutes * 60 - (now - run.started) - eval_s
    fitted = [min(cfg.schedule.max_steps, max(step + 1, step + int(left / step_s)))]
    if run.accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(fitted)
    schedule = dataclasses.replace(cfg.schedule, max_steps=fitted[0], max_minutes=None)
    run.cfg = dataclasses.replace(cfg, schedule=schedule)
    if run.end_step == cfg.schedule.max_steps:
        run.end_step = fitted[0]
    run.bar.total = run.end_step
    run.bar.refresh()
    run.metrics.write(step, fitted_max_steps=fitted[0], step_s=step_s)
    if run.accelerator.is_main_process:
        run.bar.write(
            f"schedule.max_minutes {cfg.schedule.max_minutes:g}: {fitted[0]:,} steps of {step_s:.2f}s fit "
            f"(max_steps {cfg.schedule.max_steps:,})"
        )


def checkpoint_now(run: Run) -> Path:
    now = time.perf_counter()
    run.state.elapsed += now - run.segment_start
    run.segment_start = now
    return save_checkpoint(
        run.accelerator,
        run.model,
        run.torch_optimizers,
        run.loader,
        run.cfg,
        run.state,
        run.tokenizer,
        run.scaler,
    )


def run_periodic_jobs(run: Run, result: StepResult, stopping: bool = False) -> None:
    """After a step: log, evaluate, sample and checkpoint when due (and a checkpoint when
    `stopping`). Their time is not counted in the next log line's speed."""
    cfg, step = run.cfg, run.state.step
    if result.skipped:  # nothing new to log or evaluate; a stop still checkpoints
        if stopping:
            checkpoint_now(run)
        return
    if cfg.train.compile and step == run.start_step + 1 and run.accelerator.is_main_process:
        compile_s = time.perf_counter() - run.segment_start  # the first step compiles the model
        run.metrics.write(step, compile_s=compile_s)
        run.bar.write(f"torch.compile: the first step took {compile_s:.1f}s, compilation included")
    if step == run.start_step + 1:
        run.first_step_done = time.perf_counter()
    elif cfg.schedule.max_minutes and run.first_step_done and step >= run.start_step + BUDGET_PROBE_STEPS:
        fit_schedule_to_time(run)  # once: the run's config holds no budget after it
        cfg = run.cfg
    if _due(run, run.log_every):
        log_progress(run, result)
    stage_steps = getattr(run.loader, "stage_steps", [])
    if step in stage_steps:  # data.stages: the next step draws from the next mixture
        stage = stage_steps.index(step) + 1
        mixture = ", ".join(f"{e.source} x{e.weight:g}" for e in cfg.data.stages[stage].mixture)
        run.metrics.write(step, stage=stage)
        if run.accelerator.is_main_process:
            run.bar.write(
                f"step {step}: stage {stage + 1} of {len(cfg.data.stages)} from the next step: {mixture}"
            )
    jobs_start = time.perf_counter()
    if _due(run, cfg.log.eval_every):
        evaluate_and_log(run)
    if cfg.eval.tasks and _due(run, cfg.eval.every):
        benchmark_and_log(run)
    if _due(run, cfg.log.sample_every):
        sample_and_log(run)
    every = cfg.train.mps_empty_cache_every
    if run.accelerator.device.type == "mps" and every and step % every == 0:
        torch.mps.empty_cache()
    if _due(run, cfg.log.checkpoint_every) or stopping:
        checkpoint_now(run)
    run.window.start += time.perf_counter() - jobs_start


def finish(run: Run, interrupted: bool) -> dict[str, Any]:
    """Export final/ when the schedule is done, plot, print and return the summary."""
    run.bar.close()
    state, out = run.state, run.out
    state.elapsed += time.perf_counter() - run.segment_start
    summary = {
        "step": state.step,
        "loss": run.last.get("loss"),
        "eval_loss": run.last.get("eval_loss"),
        "eval_bpb": run.last.get("eval_bpb"),
        "start_eval_loss": run.start_eval_loss,
        "seconds": state.elapsed,
        "skipped_steps": state.skipped_steps,
        "overflow_steps": state.overflow_steps,
        "spike_steps": state.spike_steps,
        "rollbacks": state.rollbacks,
        "output_dir": str(out),
        "interrupted": interrupted,
        "benchmarks": {k: v for k, v in run.last.items() if "/" in k},  # the latest eval.tasks scores
    }
    if state.step >= run.cfg.schedule.max_steps and state.step >= run.end_step and not interrupted:
        export_final(run.raw_model, run.accelerator, run.fsdp, out, run.tokenizer, run.cfg.export.gguf)
        summary["final"] = str(out / "final")
        if run.cfg.export.gguf:
            summary["final_gguf"] = str(out / "final.gguf")
    if run.accelerator.is_main_process:
        plot_losses(out / "metrics.jsonl", out / "loss.png")
        if run.branch_of is not None:
            plot_branches(run.branch_of, out / "branches.png")
        print_end(summary, out, checkpoint_root(out))
    run.metrics.close()
    # all ranks tear the process group down together: a rank that exits while another still
    # exports can die in gloo's teardown (SIGABRT, "terminate called without an active exception")
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    if run.lock:
        run.lock.release()
    return summary


def train(
    cfg: TrainConfig,
    phase: str = "init",
    checkpoint: str | None = None,
    stop_at_step: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run phase `init` (from scratch or `model.init_from`) or `resume` (from `checkpoint`).
    Returns a summary (final losses, time, paths)."""
    out = Path(cfg.output_dir)
    fresh, had_lock = not out.exists(), (out / FolderLock.NAME).exists()
    try:
        run = setup_run(cfg, phase, checkpoint, stop_at_step, overwrite)
    except BaseException:
        # a failed start leaves the folder as it found it: no lock file, no empty folder
        if int(os.environ.get("RANK", "0")) == 0 and out.is_dir():
            if not had_lock:
                (out / FolderLock.NAME).unlink(missing_ok=True)
            if fresh and not any(out.iterdir()):
                out.rmdir()
        raise
    if cfg.log.eval_at_start and run.state.step == 0:
        evaluate_and_log(run)
        run.start_eval_loss = run.last["eval_loss"]
        run.start_eval_s = time.perf_counter() - run.segment_start
    stopping = False
    with StopRequested() as stop:
        while run.state.step < run.end_step:
            # a signal reaches ranks at different moments: they stop on the step any one saw it
            result = train_step(run, stop_requested=stop.signal is not None)
            stopping = result.stop
            if result.skipped and not stopping:
                roll_back_if_spiking(run)
                continue
            run_periodic_jobs(run, result, stopping)
            if stopping:
                break
    return finish(run, interrupted=stopping)


def config_for_cli(
    config_path: str | None,
    overrides: list[str],
    phase: str,
    checkpoint: str | None,
    flags: dict[str, Any],
    allow_config_changes: bool = False,
    cooldown_steps: int | None = None,
) -> TrainConfig:
    """The resolved config: a resume starts from the checkpoint's own config, and keys that
    change the run itself (batch, schedule, precision, data) may differ from it only with
    `allow_config_changes`."""
    base = None
    if phase == "cooldown":
        return cooldown_config(config_path, overrides, checkpoint, cooldown_steps, flags)
    if phase == "resume":
        if checkpoint is None:
            raise TrainingError(
                "--phase resume needs --checkpoint DIR (a step-N folder, run folder or latest)"
            )
        # rank 0 must hold the checkpoint; a node that does not is sent rank 0's config at set-up
        ckpt = resolve_checkpoint_dir(checkpoint, required=os.environ.get("RANK", "0") == "0")
        base = checkpoint_config(ckpt) if ckpt else None
        run_folder = ckpt.parent.parent if ckpt else _run_folder(Path(checkpoint))
        if flags.get("output_dir") is None:
            flags = {**flags, "output_dir": str(run_folder)}
    # flags win over the file and the dotted overrides
    dotted = [f"{_FLAG_KEYS[name]}={value}" for name, value in flags.items() if value is not None]
    cfg = load_config(config_path, [*overrides, *dotted], base=base)
    changed = resume_changes(base, cfg) if base is not None else []
    if changed and not allow_config_changes:
        raise TrainingError(
            f"resuming {ckpt} with a config that changes the run: {'; '.join(changed)}. Pass "
            "--allow-config-changes to resume with them anyway, or leave them out (the checkpoint's "
            "own config is the default on resume)"
        )
    return cfg


def cooldown_config(
    config_path: str | None,
    overrides: list[str],
    checkpoint: str | None,
    steps: int | None,
    flags: dict[str, Any],
) -> TrainConfig:
    """A decay-anytime branch: from checkpoint step K of a warmup-stable-decay run, the
    stable learning rate decays linearly to 0 over `steps` more steps
    (schedule.decay_start=K, max_steps=K+steps), into a folder of its own beside the run
    (RUN-cooldown-stepK-N by default); the source run is only read."""
    if checkpoint is None or steps is None:
        raise TrainingError("--phase cooldown needs --checkpoint DIR (a step-N folder or run) and --steps N")
    if steps < 1:
        raise TrainingError(f"--steps must be at least 1 (the decay's length), got {steps}")
    if flags.get("max_steps") is not None:
        raise TrainingError(
            "--phase cooldown sets the schedule's end itself (step K + --steps); drop --max-steps"
        )
    ckpt = resolve_checkpoint_dir(checkpoint, required=os.environ.get("RANK", "0") == "0")
    dotted = [f"{_FLAG_KEYS[name]}={value}" for name, value in flags.items() if value is not None]
    if ckpt is None:  # a rank on a node without the checkpoint: rank 0's config arrives at set-up
        run_folder = _run_folder(Path(checkpoint))
        out = flags.get("output_dir") or str(run_folder.parent / f"{run_folder.name}-cooldown-{steps}")
        return load_config(config_path, [*overrides, *dotted, f"output_dir={out}"])
    base = checkpoint_config(ckpt)
    step = json.loads((ckpt / "trainer_state.json").read_text())["state"]["step"]
    schedule = load_config(base=base).schedule
    if schedule.kind != "wsd":
        raise TrainingError(
            f"{ckpt} is from a '{schedule.kind}' schedule; a cooldown branch decays from the stable "
            "phase of a warmup-stable-decay run (schedule.kind: wsd)"
        )
    if not schedule.warmup_steps <= step <= wsd_decay_start(schedule):
        raise TrainingError(
            f"{ckpt} is at step {step}, outside its run's stable phase (steps {schedule.warmup_steps} to "
            f"{wsd_decay_start(schedule)}); branch from a checkpoint in it"
        )
    run_folder = ckpt.parent.parent
    out = flags.get("output_dir") or str(run_folder.parent / f"{run_folder.name}-cooldown-step{step}-{steps}")
    branch = [
        f"schedule.max_steps={step + steps}",
        f"schedule.decay_start={step}",
        "schedule.min_lr_ratio=0",  # a decay to 0
        f"output_dir={out}",
    ]
    cfg = load_config(config_path, [*overrides, *dotted, *branch], base=base)
    changed = [
        c
        for c in resume_changes(base, cfg)
        if not c.startswith(("schedule.max_steps", "schedule.decay", "schedule.min_lr"))
    ]
    if changed:
        raise TrainingError(
            f"a cooldown branch continues its run as it was; these keys would change it: {'; '.join(changed)}"
        )
    return cfg


# Keys a resume may change freely: how the run is watched and run, not what it computes
# (model keys are checked against the checkpoint's weights by restore_checkpoint).
RESUME_SAFE_PREFIXES = ("log.", "resume.", "model.", "eval.", "output_dir")
RESUME_SAFE_KEYS = {
    "train.device",
    "train.compile",
    "train.kernels",
    "train.dist_timeout_minutes",
    "train.tune_malloc",
    "train.peak_flops",
    "train.mps_empty_cache_every",
    "train.max_bad_steps",
    "data.num_workers",
    "data.tokenize_batch",
}


def resume_changes(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """`key: saved -> new` for each key that changes what a resumed run computes."""
    before, after = flatten(saved), flatten(cfg.to_dict())
    changes = []
    for key, new in after.items():
        old = before.get(key)
        if old == new or key in RESUME_SAFE_KEYS or key.startswith(RESUME_SAFE_PREFIXES):
            continue
        if key == "data.rank_split" and new == "auto":  # the checkpoint holds what auto chose
            continue
        changes.append(f"{key}: {old} -> {new}")
    return changes


def _run_folder(spec: Path) -> Path:
    """The run folder a checkpoint spec (run folder, checkpoints/, latest or step-N) names."""
    if spec.name == "latest" or spec.name.startswith("step-"):
        spec = spec.parent
    return spec.parent if spec.name == CHECKPOINTS else spec


_FLAG_KEYS = {  # CLI flag -> config key
    "output_dir": "output_dir",
    "max_steps": "schedule.max_steps",
    "seed": "train.seed",
    "log_every": "log.log_every",
    "device": "train.device",
}
