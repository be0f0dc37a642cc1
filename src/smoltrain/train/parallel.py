"""Data-parallel wrapping and process-count-independent training state.

DDP comes from `accelerator.prepare`; FSDP is torch.distributed's FSDP2 (`fully_shard`),
applied here with the decoder layer as the unit (Accelerate only offers FSDP on accelerators;
this path runs on CPU with gloo as well, so it is tested here). Checkpoints hold *full* state
dicts (torch.distributed.checkpoint's `get_state_dict`), keyed by parameter name, so a run
saved by N processes, sharded or not, resumes on M. Rank 0 alone reads and writes them,
so nodes need not share a filesystem.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from smoltrain.atomic import plain_permissions
from smoltrain.errors import CheckpointError
from smoltrain.model.model import CustomLLM

_FULL = dict(full_state_dict=True, cpu_offload=True)


def gather_objects(obj, accelerator) -> list | None:
    """Every rank's picklable `obj`, as a list on rank 0 (None elsewhere)."""
    if accelerator.num_processes == 1:
        return [obj]
    import torch.distributed as dist

    gathered = [None] * accelerator.num_processes if accelerator.is_main_process else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def scatter_objects(objects: list | None, accelerator):
    """objects[r] to rank r, from the list that rank 0 holds (None elsewhere)."""
    if accelerator.num_processes == 1:
        return objects[0]
    import torch.distributed as dist

    received = [None]
    dist.scatter_object_list(received, objects if accelerator.is_main_process else None, src=0)
    return received[0]


def broadcast_object(obj, accelerator):
    """Rank 0's picklable `obj` on every rank."""
    return scatter_objects(
        [obj] * accelerator.num_processes if accelerator.is_main_process else None, accelerator
    )


def shard_model(model: CustomLLM, device: torch.device, param_dtype: torch.dtype | None = None) -> CustomLLM:
    """FSDP2: each decoder layer is one unit of all-gather / reduce-scatter; the root unit
    holds the embedding (tied to the head), the final norm and the rotary tables. With
    `param_dtype` (bf16) the gathered weights are cast once per unit instead of by autocast
    in every matmul, and gradients are reduced in fp32. A model on the meta device stays
    there (the caller allocates its shards)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if model.embed_tokens.weight.device.type != "meta":
        model.to(device)
    policy = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None
    )
    for layer in model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def gradient_sync(model, accelerator, fsdp: bool, sync: bool):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch."""
    if fsdp:
        model.set_requires_gradient_sync(sync)
        return nullcontext()
    return nullcontext() if sync else accelerator.no_sync(model)


def clip_grad_norm(model, accelerator, fsdp: bool, max_norm: float) -> torch.Tensor:
    if not fsdp:
        return accelerator.clip_grad_norm_(model.parameters(), max_norm)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def save_training_state(model, optimizer, folder: Path, is_main: bool, tied: bool) -> None:
    """model.safetensors (our parameter names, the tied head left out) and optimizer.pt,
    both gathered in full on rank 0. Every rank must call this (it gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(**_FULL))
    if is_main:
        skip = "lm_head.weight" if tied else None
        model_state = {k: v.contiguous() for k, v in model_state.items() if k != skip}
        save_file(model_state, folder / "model.safetensors", metadata={"format": "pt"})
        plain_permissions(folder / "model.safetensors")
        torch.save(optim_state, folder / "optimizer.pt")


def full_model_state(model) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU, gathered from its shards (every rank joins)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(**_FULL))


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
    expected = {k: v for k, v in shapes.items() if not (tied and k == "lm_head.weight")}
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
    if tied:
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
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=optim_state,
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast),
    )
