"""Training checkpoints, the one module that reads and writes their format:
`checkpoints/step-N/` folders written atomically, `latest`, pruning, resolving what a user
points at, checking, restoring, rolling back.

A checkpoint holds model.safetensors and optimizer.pt (full state, gathered on rank 0, so it
resumes on any process count, sharded or not), rng-rankR.pt, data.pt (or data-rankR.pt),
trainer_state.json (the run's counters, resolved config, loss scale, spike guard), the
tokenizer and config.json; `COMPLETE` is written last. Its .pt files are read as data
(`read_state_file`): no code stored in one runs.
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
from safetensors.torch import load_file, save_file

from smoltrain.atomic import plain_permissions, publish_folder, write_atomic, write_failure
from smoltrain.errors import CheckpointError, WriteError
from smoltrain.train.config import TrainConfig, renamed_keys
from smoltrain.train.parallel import FULL_STATE, broadcast_object, gather_objects, scatter_objects
from smoltrain.train.spike_guard import SpikeGuard

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"  # written last: a checkpoint folder without it is ignored


@dataclass
class RunState:
    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens consumed, all ranks
    bad_steps: int = 0  # NaN/inf steps in a row
    skipped_steps: int = 0  # NaN/inf steps in total
    overflow_steps: int = 0  # fp16 batches whose gradients overflowed (not counted as steps)
    spike_steps: int = 0  # steps the loss-spike guard skipped
    rollbacks: int = 0  # times the guard rolled the run back to its last checkpoint
    elapsed: float = 0.0  # training seconds before this process


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def rng_state() -> dict:
    """This process's random states. On CUDA only its own device's: each rank saves its own
    file, and a run resumed on fewer GPUs than it was saved from sees fewer devices."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    numpy_state = (name, keys.tolist(), position, has_gauss, gauss)  # plain data: read back as data
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # saved before 2026-12-03: every visible device's
            device = torch.cuda.current_device()
            cuda = cuda[device] if device < len(cuda) else cuda[0]
        torch.cuda.set_rng_state(cuda)


def save_checkpoint(
    accelerator,
    model,
    optimizer,
    loader,
    cfg: TrainConfig,
    state: RunState,
    tokenizer,
    scaler=None,
    spike_guard: SpikeGuard | None = None,
) -> Path:
    """Write checkpoints/step-N atomically: everything goes to a temporary folder that is
    renamed once complete, then `latest` is replaced. A kill at any point leaves the previous
    checkpoint and `latest` intact; a full disk raises on every rank and removes the partial
    folder. Every rank calls it; rank 0 writes every file, the other ranks' RNG and data
    states included (sent to it), so nodes that share no filesystem write nothing."""
    root = checkpoint_root(cfg.output_dir)
    final = root / f"step-{state.step}"
    tmp = root / f".step-{state.step}.tmp"
    is_main = accelerator.is_main_process
    per_rank_data = cfg.data.rank_split == "document"  # else one global position, rank 0's
    ranks = gather_objects(
        {"rng": rng_state(), "data": loader.state_dict() if per_rank_data else None}, accelerator
    )
    raw = accelerator.unwrap_model(model)
    error = None
    try:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        save_training_state(raw, optimizer, tmp, is_main, raw.config.tie_word_embeddings)  # gathers
        if is_main:
            for rank, part in enumerate(ranks):
                torch.save(part["rng"], tmp / f"rng-rank{rank}.pt")
                if per_rank_data:
                    torch.save(part["data"], tmp / f"data-rank{rank}.pt")
            if not per_rank_data:
                torch.save(loader.state_dict(), tmp / "data.pt")
            raw.config.to_hf().to_json_file(tmp / "config.json")
            tokenizer.save_pretrained(tmp)
            run = {"state": asdict(state), "config": cfg.to_dict(), "world_size": accelerator.num_processes}
            if scaler is not None:  # fp16's loss scale and its growth counter
                run["grad_scaler"] = scaler.state_dict()
            if spike_guard is not None:  # the recent good steps it judges spikes by
                run["spike_guard"] = spike_guard.state_dict()
            (tmp / "trainer_state.json").write_text(json.dumps(run, indent=2))
            (tmp / COMPLETE).write_text(f"{state.step}\n")
            publish_folder(tmp, final, replace=True)
            write_atomic(root / "latest", final.name + "\n")
            prune_checkpoints(root, cfg.log.keep_checkpoints)
    except Exception as e:
        failure = write_failure(e, tmp)
        if failure is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # a partial folder would keep the disk full
        latest = resolve_checkpoint_dir(str(root), required=False)
        error = (
            f"could not write checkpoint step-{state.step}: {failure}. The partial folder was removed "
            f"and the previous checkpoint ({latest or 'none'}) is intact; free disk space and resume "
            f"with --phase resume --checkpoint {root / 'latest'}"
        )
    error = broadcast_object(error, accelerator)  # every rank stops, none waits on rank 0
    if error:
        raise WriteError(error)
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
    only complete checkpoints count, and a required one is checked readable (`check_checkpoint`)."""
    path = Path(spec)
    if path.name == "latest" and path.is_file():
        path = path.parent / path.read_text().strip()
    elif (path / CHECKPOINTS / "latest").is_file():
        path = path / CHECKPOINTS / (path / CHECKPOINTS / "latest").read_text().strip()
    elif (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if (path / COMPLETE).is_file() and (path / "trainer_state.json").is_file():
        if required:
            check_checkpoint(path)
        return path
    if not required:
        return None
    if not path.exists():
        if Path(spec).resolve() != path.resolve():  # `latest` names a folder that is gone
            raise CheckpointError(
                f"'{spec}' points at {path.name}, which no longer exists (deleted?); {_older_advice(path)}"
            )
        raise CheckpointError(
            f"checkpoint '{spec}' does not exist; pass a checkpoints/step-N folder or a run folder"
        )
    if not any((path / name).exists() for name in (COMPLETE, "trainer_state.json", "model.safetensors")):
        raise CheckpointError(
            f"'{spec}' is not a checkpoint (no {COMPLETE}, trainer_state.json or model.safetensors in it); "
            "pass a checkpoints/step-N folder, a run folder or its checkpoints/latest"
        )
    raise CheckpointError(
        f"checkpoint '{spec}' is incomplete (no {COMPLETE} marker or trainer_state.json): it was "
        f"interrupted while being written; {_older_advice(path)}"
    )


def _older_advice(path: Path) -> str:
    """Names the newest complete checkpoint beside `path` that is older than it."""
    try:
        this = int(path.name.split("-")[1])
    except (IndexError, ValueError):
        this = None
    older = sorted(
        (int(p.name.split("-")[1]), p)
        for p in path.parent.glob("step-*")
        if p.name.split("-")[1].isdigit() and (p / COMPLETE).is_file() and p != path
    )
    older = [(n, p) for n, p in older if this is None or n < this]
    if not older:
        return "no complete older checkpoint is beside it; start again with --phase init"
    return f"resume from the newest complete older one: --checkpoint {older[-1][1]}"


def check_checkpoint(path: Path) -> None:
    """Fail with the file and the way out when a complete-looking checkpoint cannot be read:
    a broken trainer_state.json, a truncated or empty model.safetensors or optimizer.pt."""
    from safetensors import safe_open

    def broken(name: str, what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path}: {name} is {what}; {_older_advice(path)}")

    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        raise broken("trainer_state.json", f"not valid JSON ({e})") from None
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise broken("model.safetensors", "missing")
    try:
        with safe_open(weights, "pt") as f:
            names = list(f.keys())
            if names:
                f.get_slice(names[-1])  # the header's last entry lies inside the file
    except Exception as e:  # safetensors' own error types differ across versions
        raise broken(
            "model.safetensors", f"unreadable, probably truncated ({str(e).splitlines()[0]})"
        ) from None
    optimizer = path / "optimizer.pt"
    if not optimizer.is_file() or optimizer.stat().st_size == 0:
        raise broken("optimizer.pt", "missing or empty")


def trainer_state(path: Path) -> dict:
    """trainer_state.json: the run's counters ("state"), its resolved config, the process
    count, fp16's loss scale and the spike guard's memory."""
    return json.loads((path / "trainer_state.json").read_text())


def checkpoint_config(path: Path) -> dict:
    """The resolved config a checkpoint was trained with, keys renamed since read under their
    new names (`train.config.RENAMED`)."""
    return renamed_keys(trainer_state(path)["config"])


def roll_back_to(path: Path | None, accelerator, model, optimizers, scaler=None) -> dict:
    """Load checkpoint `path`'s weights, optimizer state and loss scale into the running
    model (rank 0 reads, `path` is None on the others) and return its trainer state; the RNG
    and the data position stay as they are, so the data moves on."""
    saved = broadcast_object(trainer_state(path) if path is not None else None, accelerator)
    tied = model.config.tie_word_embeddings
    states = read_training_state(model, path, tied) if path is not None else None
    load_training_state(model, optimizers, states, accelerator.num_processes > 1)
    if scaler is not None and "grad_scaler" in saved:
        scaler.load_state_dict(saved["grad_scaler"])
    return saved


def restore_checkpoint(
    path: Path | None,
    accelerator,
    model,
    optimizer,
    loader,
    cfg: TrainConfig,
    scaler=None,
    spike_guard: SpikeGuard | None = None,
) -> RunState:
    """Load model, optimizer, each rank's RNG state and data position, fp16's loss scale and
    the spike guard's memory (a checkpoint from before it was saved leaves it empty); the
    run's counters are returned. The model config must be the checkpoint's. Rank 0 reads
    the checkpoint (`path` is None on the other ranks) and sends each rank its part."""
    world = accelerator.num_processes
    parts, states = None, None
    if accelerator.is_main_process:
        run = trainer_state(path)
        saved = run["config"]["model"]
        error = None
        if (saved["preset"], saved["overrides"]) != (cfg.model.preset, cfg.model.overrides):
            error = (
                f"checkpoint {path} was trained with model {saved['preset']} {saved['overrides']} "
                f"but the config asks for {cfg.model.preset} {cfg.model.overrides}; resume with the same "
                "model config (or start a new run with model.init_from)"
            )
        ranks = [None] * world
        if error is None:
            try:
                states = read_training_state(model, path, model.config.tie_word_embeddings)
                ranks = [_rank_part(path, rank, world, run, cfg) for rank in range(world)]
            except CheckpointError as e:
                error = str(e)
        parts = [{"run": run, "error": error, **(part or {"rng": None, "data": None})} for part in ranks]
        if error is None and any(p["data"] is None for p in parts):
            print(
                f"note: the data position of {path} was saved per rank by {run.get('world_size')} "
                f"process(es) (data.rank_split=document); this run has {world}, "
                "so the stream starts over (data.rank_split=micro_batch resumes on any count)",
                file=sys.stderr,
            )
    part = scatter_objects(parts, accelerator)
    if part["error"]:
        raise CheckpointError(part["error"])
    run = part["run"]
    load_training_state(model, optimizer, states, world > 1)
    set_rng_state(part["rng"])
    if part["data"] is not None:
        loader.load_state_dict(part["data"])
    if scaler is not None and "grad_scaler" in run:
        scaler.load_state_dict(run["grad_scaler"])
    if spike_guard is not None and "spike_guard" in run:
        spike_guard.load_state_dict(run["spike_guard"])
    return RunState(**run["state"])


def _rank_part(path: Path, rank: int, world: int, run: dict, cfg: TrainConfig) -> dict:
    """Rank `rank`'s RNG state (rank 0's when the checkpoint had fewer ranks) and data
    position (None: the stream starts over)."""
    rank_rng = path / f"rng-rank{rank}.pt"
    rng = read_state_file(rank_rng if rank_rng.is_file() else path / "rng-rank0.pt")
    global_state, rank_state = path / "data.pt", path / f"data-rank{rank}.pt"
    data = None
    if cfg.data.rank_split == "micro_batch" and global_state.is_file():
        data = read_state_file(global_state)
    elif rank_state.is_file() and run.get("world_size", 1) == world:
        data = read_state_file(rank_state)
    return {"rng": rng, "data": data}


def save_training_state(model, optimizer, folder: Path, is_main: bool, tied: bool) -> None:
    """model.safetensors (our parameter names, the tied head left out) and optimizer.pt,
    both gathered in full on rank 0. Every rank must call this (it gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(**FULL_STATE))
    if is_main:
        skip = "lm_head.weight" if tied else None
        kept = trained_names(model)  # LoRA: the adapters only; the rest is model.init_from's
        model_state = {k: v.contiguous() for k, v in model_state.items() if k != skip and k in kept}
        save_file(model_state, folder / "model.safetensors", metadata={"format": "pt"})
        plain_permissions(folder / "model.safetensors")
        torch.save(optim_state, folder / "optimizer.pt")


def read_state_file(path: Path):
    """A `.pt` file of a checkpoint read as data: tensors, numbers, text, lists, dicts and
    numpy arrays (a data position's token buffer; numpy's RNG state before 2026-12).
    torch.load's full unpickler runs any code a file names, and checkpoints pass between
    people."""
    import pickle

    import numpy as np

    multiarray = (np._core if hasattr(np, "_core") else np.core).multiarray  # numpy 2 renamed it
    numeric = [type(np.dtype(code)) for code in "?bBhHiIlLqQefd"]  # an array's dtype class
    numpy_data = [np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar, *numeric]
    try:
        with torch.serialization.safe_globals(numpy_data):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise CheckpointError(
            f"{path} holds more than tensors, numbers and text ({refused}); smoltrain reads "
            "checkpoints as data and runs no code stored in one. Resume only from checkpoints "
            "smoltrain wrote, or start a new run with model.init_from pointing at trusted weights"
        ) from None
    except (EOFError, RuntimeError) as e:
        raise CheckpointError(
            f"{path} is damaged ({str(e).splitlines()[0] or type(e).__name__}); resume from an "
            "earlier checkpoint (checkpoints/step-N)"
        ) from None


def trained_names(model) -> set[str]:
    """The parameters a checkpoint holds: those that train (with LoRA, only the adapters)."""
    return {_canonical_name(k) for k, p in model.named_parameters() if p.requires_grad}


def _canonical_name(name: str) -> str:
    # torch.compile and activation checkpointing insert these into parameter names
    for wrapper in ("_orig_mod.", "_checkpoint_wrapped_module."):
        name = name.replace(wrapper, "")
    return name


def read_training_state(model, folder: Path, tied: bool) -> tuple[dict, dict]:
    """model.safetensors and optimizer.pt of a checkpoint, read as data and checked against
    `model` before anything is loaded: every tensor's name and shape (a checkpoint of another
    model would crash the process or train on with misshapen optimizer state)."""
    from safetensors import safe_open

    shapes = {_canonical_name(k): tuple(p.shape) for k, p in model.named_parameters()}
    weights, optimizer_file = folder / "model.safetensors", folder / "optimizer.pt"
    fix = "resume with the model config that wrote it, or start a new run with model.init_from"
    with safe_open(weights, "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    kept = trained_names(model)
    expected = {k: v for k, v in shapes.items() if k in kept and not (tied and k == "lm_head.weight")}
    for name in sorted(expected.keys() | saved.keys()):
        if saved.get(name) != expected.get(name):
            raise CheckpointError(
                f"{weights} does not fit this model: {name} is {saved.get(name, 'missing')} there "
                f"and {expected.get(name, 'absent')} here; {fix}"
            )
    optim_state = read_state_file(optimizer_file)
    if not isinstance(optim_state, dict) or not isinstance(optim_state.get("state"), dict):
        raise CheckpointError(f"{optimizer_file} is not an optimizer state; resume from an earlier one")
    for name, values in optim_state["state"].items():
        if name not in shapes:
            raise CheckpointError(f"{optimizer_file} holds state for {name}, which this model lacks; {fix}")
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != shapes[name]:
                raise CheckpointError(
                    f"{optimizer_file} does not fit this model: {key} of {name} is "
                    f"{tuple(value.shape)}, the parameter {shapes[name]}; {fix}"
                )
    model_state = load_file(weights)
    if tied and "embed_tokens.weight" in model_state:
        model_state["lm_head.weight"] = model_state["embed_tokens.weight"]
    return model_state, optim_state


def load_training_state(model, optimizer, states: tuple[dict, dict] | None, broadcast: bool) -> None:
    """Load what `read_training_state` read into a model and optimizer, plain or sharded.
    With `broadcast` only rank 0 holds `states` (None on the other ranks) and sends each
    tensor to the others: no rank but the first needs the files, nor their memory at once."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    # torch reads an empty model dict as "optimizer only" and skips the model's broadcast:
    # the other ranks pass their own state as the (unread) placeholder
    model_state, optim_state = states if states is not None else (model.state_dict(), {})
    partial = len(trained_names(model)) < len(list(model.parameters()))  # LoRA: the adapters only
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=optim_state,
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast, strict=not partial),
    )
