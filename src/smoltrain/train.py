"""Training on `accelerate.Accelerator`: `train()` is the loop; the pieces it calls
(`build_optimizer`, `lr_at`, `evaluate`, `sample`, `save_checkpoint`) are plain functions.

An output folder holds `metrics.jsonl`, `checkpoints/step-N/` + `checkpoints/latest`,
`final/` (a Hugging Face folder) and `loss.png`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from smoltrain.config import ModelConfig
from smoltrain.data import build_loader
from smoltrain.device import measure_peak_flops, pick_device
from smoltrain.hf import load_model
from smoltrain.model import CustomLLM
from smoltrain.parallel import (
    clip_grad_norm,
    full_model_state,
    gradient_sync,
    load_training_state,
    rng_state,
    save_training_state,
    set_rng_state,
    shard_model,
)
from smoltrain.perf import keep_freed_memory
from smoltrain.train_config import ScheduleConfig, TrainConfig, load_config

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"  # written last: a checkpoint folder without it is ignored


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why and what to do."""


# ----------------------------------------------------------------------------- pieces


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
        decay_start = s.max_steps - int(s.decay_fraction * (s.max_steps - s.warmup_steps))
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


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW; by default norms, biases and embeddings get no weight decay (they are not
    matrices that decay regularizes, nanoGPT's and litgpt's choice)."""
    o = cfg.optim
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.dim() < 2 or "embed_tokens" in name
        (no_decay if exempt and not o.decay_norms_and_embeddings else decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel: one pass over the parameters, no foreach temporaries (+3% on CPU)
    fused = o.fused if o.fused is not None else device_type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused or None)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, accelerator, cfg: TrainConfig, tokenizer, fsdp: bool = False) -> float:
    """Mean token loss over the first `eval_batches` batches of the held-out split, dealt out
    to the ranks and summed over all of them before dividing. Every rank runs the same number
    of forwards (a rank whose share ran out repeats a batch with weight 0), since a sharded
    model gathers its weights collectively in each forward."""
    model = model if fsdp else accelerator.unwrap_model(model)
    model.eval()
    data_cfg = dataclasses.replace(cfg.data, num_workers=0, shuffle_buffer=0)
    world, rank = accelerator.num_processes, accelerator.process_index
    loader = build_loader(data_cfg, tokenizer, cfg.train.micro_batch_size, "eval", rank, world)
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)  # loss sum, tokens
    batches = iter(loader)
    batch = None
    for _ in range(-(-cfg.log.eval_batches // world)):
        fresh = next(batches, None)
        if fresh is None and batch is None:
            break
        weight = 1.0 if fresh is not None else 0.0
        batch = _to_device(fresh, accelerator.device) if fresh is not None else batch
        with accelerator.autocast():
            loss = model(**batch, return_logits=False).loss
        n = (batch["labels"][:, 1:] != -100).sum() * weight
        total += torch.stack([loss.double() * n, n.double()])
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


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


# ------------------------------------------------------------------------ checkpoints


@dataclass
class RunState:
    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens consumed, all ranks
    bad_steps: int = 0  # NaN/inf steps in a row
    skipped_steps: int = 0  # NaN/inf steps in total
    elapsed: float = 0.0  # training seconds before this process


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / CHECKPOINTS


def save_checkpoint(
    accelerator, model, optimizer, loader, cfg: TrainConfig, state: RunState, tokenizer
) -> Path:
    """Write checkpoints/step-N atomically: everything goes to a temporary folder that is
    renamed once complete, then `latest` is replaced. A kill at any point leaves the previous
    checkpoint and `latest` intact; a full disk raises and removes the partial folder."""
    root = checkpoint_root(Path(cfg.output_dir))
    final = root / f"step-{state.step}"
    tmp = root / f".step-{state.step}.tmp"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        raw = accelerator.unwrap_model(model)
        save_training_state(raw, optimizer, tmp, accelerator.is_main_process, raw.config.tie_word_embeddings)
        torch.save(rng_state(), tmp / f"rng-rank{accelerator.process_index}.pt")
        if cfg.data.rank_split == "document":  # one position per rank
            torch.save(loader.state_dict(), tmp / f"data-rank{accelerator.process_index}.pt")
        elif accelerator.is_main_process:  # one global position, the same on every rank
            torch.save(loader.state_dict(), tmp / "data.pt")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            raw.config.to_hf().to_json_file(tmp / "config.json")
            tokenizer.save_pretrained(tmp)
            run = {"state": state.__dict__, "config": cfg.to_dict(), "world_size": accelerator.num_processes}
            (tmp / "trainer_state.json").write_text(json.dumps(run, indent=2))
            (tmp / COMPLETE).write_text(f"{state.step}\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_atomic(root / "latest", final.name + "\n")
            _prune(root, cfg.log.keep_checkpoints)
        accelerator.wait_for_everyone()
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        latest = resolve_checkpoint_dir(str(root), required=False)
        raise TrainingError(
            f"could not write checkpoint step-{state.step}: {e}. "
            f"The previous checkpoint ({latest or 'none'}) is intact; free disk space and resume "
            f"with --phase resume --checkpoint {root / 'latest'}"
        ) from e
    return final


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prune(root: Path, keep: int) -> None:
    steps = sorted((int(p.name.split("-")[1]), p) for p in root.glob("step-*") if (p / COMPLETE).is_file())
    for _, path in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def resolve_checkpoint_dir(spec: str, required: bool = True) -> Path | None:
    """A step-N folder, a `checkpoints` folder or `latest` file, or a run's output folder;
    only complete checkpoints count."""
    path = Path(spec)
    if path.name == "latest" and path.is_file():
        path = path.parent / path.read_text().strip()
    elif (path / CHECKPOINTS / "latest").is_file():
        path = path / CHECKPOINTS / (path / CHECKPOINTS / "latest").read_text().strip()
    elif (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if (path / COMPLETE).is_file() and (path / "trainer_state.json").is_file():
        return path
    if not required:
        return None
    if not path.exists():
        raise TrainingError(
            f"checkpoint '{spec}' does not exist; pass a checkpoints/step-N folder or a run folder"
        )
    raise TrainingError(
        f"checkpoint '{spec}' is incomplete or corrupt (no {COMPLETE} marker or trainer_state.json): "
        "it was probably interrupted while being written; use an earlier checkpoints/step-N"
    )


# --------------------------------------------------------------------------- the run


def setup_accelerator(cfg: TrainConfig):
    """Device, precision and trackers. bf16 on CUDA when supported (else fp16 with loss
    scaling), fp32 on MPS always (as the reference), bf16 autocast on CPU on request."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t = cfg.train
    device_type = pick_device(t.device)
    precision = t.precision
    if precision == "auto":
        precision = (
            ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device_type == "cuda" else "fp32"
        )
    if device_type == "mps" and precision != "fp32":
        print(f"note: {precision} is off on MPS (as in the reference); training in fp32", file=sys.stderr)
        precision = "fp32"
    if precision == "fp16" and device_type != "cuda":
        raise TrainingError("train.precision=fp16 needs CUDA; use bf16 or fp32 here")
    if precision not in ("fp32", "bf16", "fp16"):
        raise TrainingError(f"train.precision '{precision}' is unknown; use auto, fp32, bf16 or fp16")
    trackers = list(cfg.log.trackers)
    if "wandb" in trackers and not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")  # no key: log locally, sync later
    from accelerate.utils import DistributedDataParallelKwargs

    accelerator = Accelerator(
        cpu=device_type == "cpu",
        # the rotary tables are buffers computed identically on every rank: no broadcast
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        mixed_precision={"fp32": "no"}.get(precision, precision),
        log_with=trackers or None,
        project_dir=cfg.output_dir,
        step_scheduler_with_optimizer=False,
    )
    set_seed(t.seed)
    return accelerator, precision


def prepare_output_dir(cfg: TrainConfig, phase: str, overwrite: bool) -> Path:
    out = Path(cfg.output_dir)
    holds_run = (out / "metrics.jsonl").exists() or (out / CHECKPOINTS).exists()
    if phase == "init" and holds_run:
        if not overwrite:
            raise TrainingError(
                f"output folder '{out}' already holds a run; pass --overwrite to replace it, "
                f"--phase resume --checkpoint {out} to continue it, or another --output-dir"
            )
        for name in ("metrics.jsonl", CHECKPOINTS, "final", "loss.png", "run.json"):
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (out / CHECKPOINTS).glob(".step-*.tmp"):  # left by a killed save
        shutil.rmtree(stale, ignore_errors=True)
    return out


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop log lines past the checkpoint: those steps are about to be redone."""
    if not path.exists():
        return
    keep = [
        line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step
    ]
    _write_atomic(path, "".join(line + "\n" for line in keep))


class MetricsLog:
    """metrics.jsonl (always) plus the Accelerate trackers, main process only."""

    def __init__(self, path: Path, accelerator) -> None:
        self.accelerator = accelerator
        self.file = open(path, "a", buffering=1) if accelerator.is_main_process else None

    def write(self, step: int, **values: Any) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        numeric = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        if self.accelerator.trackers:
            self.accelerator.log(numeric, step=step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def plot_losses(metrics_path: Path, out_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_path)


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


def train(
    cfg: TrainConfig,
    phase: str = "init",
    checkpoint: str | None = None,
    stop_at_step: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run phase `init` (from scratch or `model.init_from`) or `resume` (from `checkpoint`).
    Returns a summary (final losses, time, paths)."""
    from smoltrain.tokenizer import check_tokenizer_fits, load_tokenizer

    keep_freed_memory()
    resume_dir = resolve_checkpoint_dir(checkpoint) if phase == "resume" else None
    out = prepare_output_dir(cfg, phase, overwrite)
    accelerator, precision = setup_accelerator(cfg)
    device = accelerator.device
    tokenizer = load_tokenizer(cfg.tokenizer)

    # model: from init_from's weights (continued pre-training; on resume the checkpoint's
    # weights replace them, but the architecture still comes from there) or from scratch
    if cfg.model.init_from:
        model = load_model(cfg.model.init_from)
    else:
        model_config: ModelConfig = cfg.model.build_config()
        model_config.bos_token_id, model_config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        model_config.pad_token_id = tokenizer.pad_token_id
        model = CustomLLM(model_config)
    check_tokenizer_fits(model.config.vocab_size, tokenizer)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()

    # batch arithmetic: the global batch is what the user fixes when global_batch_size is set
    t = cfg.train
    world = accelerator.num_processes
    if t.global_batch_size is not None:
        per_step = t.micro_batch_size * world
        if t.global_batch_size % per_step:
            raise TrainingError(
                f"train.global_batch_size {t.global_batch_size} is not divisible by micro_batch_size "
                f"{t.micro_batch_size} x {world} processes; change one of them"
            )
        t.grad_accum_steps = t.global_batch_size // per_step
    tokens_per_step = t.micro_batch_size * t.grad_accum_steps * world * cfg.data.context_length

    fsdp = t.fsdp and world > 1
    if fsdp:
        if precision == "fp16":
            raise TrainingError("train.fsdp with fp16 is not supported; use bf16 (or fp32)")
        model = shard_model(model, device)  # FSDP2 from torch.distributed, in place
        optimizer = build_optimizer(model, cfg, device.type)
    else:
        optimizer = build_optimizer(model, cfg, device.type)
        model, optimizer = accelerator.prepare(model, optimizer)
    torch_optimizer = getattr(optimizer, "optimizer", optimizer)  # Accelerate wraps it
    raw_model: CustomLLM = accelerator.unwrap_model(model)
    forward = torch.compile(model) if t.compile else model
    loader = build_loader(cfg.data, tokenizer, t.micro_batch_size, "train", accelerator.process_index, world)

    state = RunState()
    if resume_dir is not None:
        state = restore_checkpoint(resume_dir, accelerator, raw_model, torch_optimizer, loader, cfg)
        if accelerator.is_main_process:
            _truncate_metrics(out / "metrics.jsonl", state.step)
    end_step = cfg.schedule.max_steps
    if phase == "resume" and state.step >= cfg.schedule.max_steps:
        end_step = state.step + cfg.resume.extra_steps  # the reference's phase "resume"
        cfg.log.log_every = cfg.resume.log_every
    if stop_at_step is not None:
        end_step = min(end_step, stop_at_step)

    peak_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    peak = t.peak_flops or measure_peak_flops(device, peak_dtype)
    flops_per_token = raw_model.config.flops_per_token(cfg.data.context_length)
    metrics = MetricsLog(out / "metrics.jsonl", accelerator)
    if cfg.log.trackers:
        accelerator.init_trackers(cfg.log.project, config=_flatten(cfg.to_dict()))
    if accelerator.is_main_process:
        _print_start(cfg, raw_model, accelerator, precision, tokens_per_step, state.step, end_step)

    from tqdm.auto import tqdm

    bar = tqdm(
        total=end_step,
        initial=state.step,
        disable=not (accelerator.is_main_process and cfg.log.progress_bar),
        unit="step",
        dynamic_ncols=True,
    )
    batches = iter(loader)
    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
    last: dict[str, float] = {}
    run_start = time.perf_counter()
    first_step = state.step + 1
    with StopRequested() as stop:
        while state.step < end_step:
            # ---- one optimizer step: accumulate gradients over micro-batches
            lr = lr_at(state.step + 1, cfg.optim.lr, cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), device=device)
            for micro in range(t.grad_accum_steps):
                batch = _to_device(next(batches), device)
                last_micro = micro == t.grad_accum_steps - 1
                with gradient_sync(model, accelerator, fsdp, sync=last_micro):
                    with accelerator.autocast():
                        loss = forward(**batch, return_logits=False).loss
                    accelerator.backward(loss / t.grad_accum_steps)
                step_loss += loss.detach() / t.grad_accum_steps
            if cfg.optim.grad_clip > 0:
                grad_norm = clip_grad_norm(model, accelerator, fsdp, cfg.optim.grad_clip)
            else:
                grad_norm = torch.zeros((), device=device)
            step_loss = accelerator.reduce(step_loss, reduction="mean")
            # the one host sync per step: both figures come back together
            loss_value, grad_norm_value = torch.stack([step_loss.float(), grad_norm.float()]).tolist()
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm_value)):
                optimizer.zero_grad(set_to_none=True)
                state.bad_steps += 1
                state.skipped_steps += 1
                state.step += 1
                if accelerator.is_main_process:
                    print(f"step {state.step}: loss {loss_value} is not finite; skipped", file=sys.stderr)
                if state.bad_steps >= t.max_bad_steps:
                    raise TrainingError(
                        f"{state.bad_steps} non-finite steps in a row at step {state.step}; stopping. "
                        f"The last good checkpoint is in {checkpoint_root(out)}; lower optim.lr or "
                        "check the data, then resume from it"
                    )
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.bad_steps = 0
            state.step += 1
            state.tokens += tokens_per_step
            window_loss += loss_value
            window_steps += 1
            bar.update(1)
            if t.compile and state.step == first_step:
                compile_s = time.perf_counter() - run_start  # the first step compiles the model
                metrics.write(state.step, compile_s=compile_s)
                if accelerator.is_main_process:
                    bar.write(f"torch.compile: the first step took {compile_s:.1f}s, compilation included")

            # ---- every N steps: log, evaluate, sample, checkpoint
            step = state.step
            if step % cfg.log.log_every == 0 or step == end_step:
                elapsed = time.perf_counter() - window_start
                tok_s = window_steps * tokens_per_step / elapsed
                last = {
                    "loss": window_loss / window_steps,
                    "lr": lr,
                    "grad_norm": grad_norm_value,
                    "tokens_per_s": tok_s,
                    "mfu": tok_s * flops_per_token / (peak * world),
                    "tokens": state.tokens,
                }
                metrics.write(step, **last)
                bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{tok_s:,.0f}")
                window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
            periodic_start = time.perf_counter()
            if step % cfg.log.eval_every == 0 or step == end_step:
                eval_loss = evaluate(model, accelerator, cfg, tokenizer, fsdp)
                last["eval_loss"] = eval_loss
                perplexity = math.exp(min(eval_loss, 50))
                metrics.write(step, eval_loss=eval_loss, perplexity=perplexity)
                if accelerator.is_main_process:
                    bar.write(f"step {step}: eval loss {eval_loss:.3f} (perplexity {perplexity:.1f})")
            if step % cfg.log.sample_every == 0 or step == end_step:
                # a sharded model generates on every rank together; otherwise rank 0 alone
                text = sample(raw_model, tokenizer, cfg) if fsdp or accelerator.is_main_process else ""
                metrics.write(step, sample=text)
                if accelerator.is_main_process:
                    bar.write(f"step {step} sample: {text!r}")
            if device.type == "mps" and t.mps_empty_cache_every and step % t.mps_empty_cache_every == 0:
                torch.mps.empty_cache()
            stopping = stop.signal is not None
            if step % cfg.log.checkpoint_every == 0 or step == end_step or stopping:
                state.elapsed += time.perf_counter() - run_start
                run_start = time.perf_counter()
                save_checkpoint(accelerator, model, torch_optimizer, loader, cfg, state, tokenizer)
            window_start += time.perf_counter() - periodic_start  # eval etc. is not training time
            if stopping:
                break
    bar.close()
    state.elapsed += time.perf_counter() - run_start

    finished = state.step >= cfg.schedule.max_steps and stop.signal is None
    summary = {
        "step": state.step,
        "loss": last.get("loss"),
        "eval_loss": last.get("eval_loss"),
        "seconds": state.elapsed,
        "skipped_steps": state.skipped_steps,
        "output_dir": str(out),
        "interrupted": stop.signal is not None,
    }
    if finished and (stop_at_step is None or state.step >= end_step):
        final_dir = out / "final"
        export_final(raw_model, accelerator, fsdp, final_dir, tokenizer)
        summary["final"] = str(final_dir)
    if accelerator.is_main_process:
        plot_losses(out / "metrics.jsonl", out / "loss.png")
        _print_end(summary, out)
    metrics.close()
    accelerator.end_training()
    return summary


def restore_checkpoint(path: Path, accelerator, model, optimizer, loader, cfg: TrainConfig) -> RunState:
    run = json.loads((path / "trainer_state.json").read_text())
    saved_model = run["config"]["model"]
    if (saved_model["preset"], saved_model["overrides"]) != (cfg.model.preset, cfg.model.overrides):
        raise TrainingError(
            f"checkpoint {path} was trained with model {saved_model['preset']} {saved_model['overrides']} "
            f"but the config asks for {cfg.model.preset} {cfg.model.overrides}; resume with the same "
            "model config (or start a new run with model.init_from)"
        )
    load_training_state(model, optimizer, path, model.config.tie_word_embeddings)
    rank_rng = path / f"rng-rank{accelerator.process_index}.pt"
    set_rng_state(torch.load(rank_rng if rank_rng.is_file() else path / "rng-rank0.pt", weights_only=False))
    global_state = path / "data.pt"
    rank_state = path / f"data-rank{accelerator.process_index}.pt"
    if cfg.data.rank_split == "micro_batch" and global_state.is_file():
        loader.load_state_dict(torch.load(global_state, weights_only=False))
    elif rank_state.is_file() and run.get("world_size", 1) == accelerator.num_processes:
        loader.load_state_dict(torch.load(rank_state, weights_only=False))
    elif accelerator.is_main_process:
        print(
            f"note: the data position of {path} was saved per rank by {run.get('world_size')} "
            f"process(es) (data.rank_split=document); this run has {accelerator.num_processes}, "
            "so the stream starts over (data.rank_split=micro_batch resumes on any count)",
            file=sys.stderr,
        )
    return RunState(**run["state"])


def export_final(model: CustomLLM, accelerator, fsdp: bool, folder: Path, tokenizer) -> None:
    """final/: a Hugging Face folder. A sharded model is gathered first (every rank joins)."""
    if not fsdp:
        if accelerator.is_main_process:
            model.save_pretrained(folder, tokenizer=tokenizer)
        return
    state = full_model_state(model)
    if accelerator.is_main_process:
        plain = CustomLLM(model.config)
        plain.load_state_dict(state)
        plain.save_pretrained(folder, tokenizer=tokenizer)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat


def _print_start(cfg, model, accelerator, precision, tokens_per_step, step, end_step) -> None:
    t = cfg.train
    lines = [
        "smoltrain",
        f"  model       {cfg.model.init_from or cfg.model.preset}: {model.num_parameters():,} parameters",
        f"  batch       {t.micro_batch_size} x {t.grad_accum_steps} accumulation"
        f" x {accelerator.num_processes} process(es) x {cfg.data.context_length} tokens"
        f" = {tokens_per_step:,} tokens/step",
        f"  steps       {step} -> {end_step} (schedule: {cfg.schedule.kind}, {cfg.schedule.max_steps} steps, "
        f"peak lr {cfg.optim.lr:g})",
        f"  device      {accelerator.device} ({accelerator.distributed_type.value}), precision {precision}",
        f"  data        {cfg.data.source} ({cfg.data.mode}), tokenizer {cfg.tokenizer}",
        f"  output      {cfg.output_dir}",
    ]
    print("\n".join(lines), flush=True)


def _print_end(summary: dict[str, Any], out: Path) -> None:
    def fmt(x):
        return "n/a" if x is None else f"{x:.3f}"

    lines = [
        f"done: step {summary['step']} in {summary['seconds']:.0f}s, train loss {fmt(summary['loss'])}, "
        f"eval loss {fmt(summary['eval_loss'])}"
        + (f", {summary['skipped_steps']} non-finite steps skipped" if summary["skipped_steps"] else ""),
        f"  metrics     {out / 'metrics.jsonl'}",
        f"  plot        {out / 'loss.png'}",
        f"  checkpoint  {out / CHECKPOINTS / 'latest'}",
    ]
    if "final" in summary:
        lines.append(f"  model       {summary['final']} (transformers loads it)")
    print("\n".join(lines), flush=True)


def config_for_cli(
    config_path: str | None,
    overrides: list[str],
    phase: str,
    checkpoint: str | None,
    flags: dict[str, Any],
) -> TrainConfig:
    """The resolved config: a resume starts from the checkpoint's own config."""
    base = None
    if phase == "resume":
        if checkpoint is None:
            raise TrainingError(
                "--phase resume needs --checkpoint DIR (a step-N folder, run folder or latest)"
            )
        ckpt = resolve_checkpoint_dir(checkpoint)
        base = json.loads((ckpt / "trainer_state.json").read_text())["config"]
        if "output_dir" not in flags or flags["output_dir"] is None:
            flags["output_dir"] = str(ckpt.parent.parent)
    # flags win over the file and the dotted overrides
    dotted = [f"{_FLAG_KEYS[name]}={value}" for name, value in flags.items() if value is not None]
    return load_config(config_path, [*overrides, *dotted], base=base)


_FLAG_KEYS = {  # CLI flag -> config key
    "output_dir": "output_dir",
    "max_steps": "schedule.max_steps",
    "seed": "train.seed",
    "log_every": "log.log_every",
    "device": "train.device",
}
