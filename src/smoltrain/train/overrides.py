"""The config a command line means: flags and dotted overrides, resuming a run, cooldown branches."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from smoltrain.errors import TrainingError
from smoltrain.train.checkpoint import (
    CHECKPOINTS,
    checkpoint_config,
    resolve_checkpoint_dir,
    trainer_state,
)
from smoltrain.train.config import TrainConfig, load_config
from smoltrain.train.metrics import (
    flatten,
)
from smoltrain.train.optim import wsd_decay_start


def config_for_cli(
    config_path: str | None,
    overrides: list[str],
    phase: str,
    checkpoint: str | None,
    flags: dict[str, Any],  # config key -> a flag's value (None: not given); they win
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
    dotted = [f"{key}={value}" for key, value in flags.items() if value is not None]
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
    if flags.get("schedule.max_steps") is not None:
        raise TrainingError(
            "--phase cooldown sets the schedule's end itself (step K + --steps); drop --max-steps"
        )
    ckpt = resolve_checkpoint_dir(checkpoint, required=os.environ.get("RANK", "0") == "0")
    dotted = [f"{key}={value}" for key, value in flags.items() if value is not None]
    if ckpt is None:  # a rank on a node without the checkpoint: rank 0's config arrives at set-up
        run_folder = _run_folder(Path(checkpoint))
        out = flags.get("output_dir") or str(run_folder.parent / f"{run_folder.name}-cooldown-{steps}")
        return load_config(config_path, [*overrides, *dotted, f"output_dir={out}"])
    base = checkpoint_config(ckpt)
    step = trainer_state(ckpt)["state"]["step"]
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
RESUME_SAFE_PREFIXES = ("log.", "resume.", "model.", "benchmarks.", "output_dir")
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
