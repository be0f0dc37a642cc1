"""Training checkpoints: `checkpoints/step-N/` folders written atomically, `latest`,
pruning, resolving what a user points at, restoring, and the RNG states of every rank.

A checkpoint holds the full model and optimizer state (gathered on rank 0, so it resumes
on any process count, sharded or not), each rank's RNG state, the data position, the
resolved config and the run's counters; `COMPLETE` is written last.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from smoltrain.atomic import publish_folder, write_atomic
from smoltrain.errors import TrainingError
from smoltrain.parallel import load_training_state, save_training_state
from smoltrain.train_config import TrainConfig

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"  # written last: a checkpoint folder without it is ignored


@dataclass
class RunState:
    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens consumed, all ranks
    bad_steps: int = 0  # NaN/inf steps in a row
    skipped_steps: int = 0  # NaN/inf steps in total
    overflow_steps: int = 0  # fp16 batches whose gradients overflowed (not counted as steps)
    elapsed: float = 0.0  # training seconds before this process


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    accelerator, model, optimizer, loader, cfg: TrainConfig, state: RunState, tokenizer, scaler=None
) -> Path:
    """Write checkpoints/step-N atomically: everything goes to a temporary folder that is
    renamed once complete, then `latest` is replaced. A kill at any point leaves the previous
    checkpoint and `latest` intact; a full disk raises and removes the partial folder.
    Every rank calls it (the full state is gathered)."""
    root = checkpoint_root(cfg.output_dir)
    final = root / f"step-{state.step}"
    tmp = root / f".step-{state.step}.tmp"
    rank, is_main = accelerator.process_index, accelerator.is_main_process
    try:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        raw = accelerator.unwrap_model(model)
        save_training_state(raw, optimizer, tmp, is_main, raw.config.tie_word_embeddings)
        torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
        if cfg.data.rank_split == "document":  # one position per rank
            torch.save(loader.state_dict(), tmp / f"data-rank{rank}.pt")
        elif is_main:  # one global position, the same on every rank
            torch.save(loader.state_dict(), tmp / "data.pt")
        accelerator.wait_for_everyone()
        if is_main:
            raw.config.to_hf().to_json_file(tmp / "config.json")
            tokenizer.save_pretrained(tmp)
            run = {"state": asdict(state), "config": cfg.to_dict(), "world_size": accelerator.num_processes}
            if scaler is not None:  # fp16's loss scale and its growth counter
                run["grad_scaler"] = scaler.state_dict()
            (tmp / "trainer_state.json").write_text(json.dumps(run, indent=2))
            (tmp / COMPLETE).write_text(f"{state.step}\n")
            publish_folder(tmp, final, replace=True)
            write_atomic(root / "latest", final.name + "\n")
            prune_checkpoints(root, cfg.log.keep_checkpoints)
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


def prune_checkpoints(root: Path, keep: int) -> None:
    """Remove all but the newest `keep` complete step-N folders (keep <= 0: keep all)."""
    steps = sorted((int(p.name.split("-")[1]), p) for p in root.glob("step-*") if (p / COMPLETE).is_file())
    for _, path in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def remove_partial_checkpoints(root: Path) -> None:
    """Temporary folders left by a save that was killed."""
    for stale in root.glob(".step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


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


def checkpoint_config(path: Path) -> dict:
    """The resolved config a checkpoint was trained with."""
    return json.loads((path / "trainer_state.json").read_text())["config"]


def restore_checkpoint(
    path: Path, accelerator, model, optimizer, loader, cfg: TrainConfig, scaler=None
) -> RunState:
    """Load model, optimizer, this rank's RNG state and the data position; the run's counters
    are returned. The model config must be the checkpoint's."""
    run = json.loads((path / "trainer_state.json").read_text())
    saved_model = run["config"]["model"]
    if (saved_model["preset"], saved_model["overrides"]) != (cfg.model.preset, cfg.model.overrides):
        raise TrainingError(
            f"checkpoint {path} was trained with model {saved_model['preset']} {saved_model['overrides']} "
            f"but the config asks for {cfg.model.preset} {cfg.model.overrides}; resume with the same "
            "model config (or start a new run with model.init_from)"
        )
    load_training_state(model, optimizer, path, model.config.tie_word_embeddings)
    if scaler is not None and "grad_scaler" in run:
        scaler.load_state_dict(run["grad_scaler"])
    rank = accelerator.process_index
    rank_rng = path / f"rng-rank{rank}.pt"
    set_rng_state(torch.load(rank_rng if rank_rng.is_file() else path / "rng-rank0.pt", weights_only=False))
    global_state, rank_state = path / "data.pt", path / f"data-rank{rank}.pt"
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
