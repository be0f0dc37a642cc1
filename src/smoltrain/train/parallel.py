"""Data-parallel wrapping, gathering, and moving Python objects between ranks.

DDP comes from `accelerator.prepare`; FSDP is torch.distributed's FSDP2 (`fully_shard`),
applied here with the decoder layer as the unit (Accelerate only offers FSDP on accelerators;
this path runs on CPU with gloo as well, so it is tested here). State is gathered *full*
(torch.distributed.checkpoint's state-dict API, `FULL_STATE`), keyed by parameter name, so
that a checkpoint (smoltrain.train.checkpoint) saved by N processes, sharded or not, resumes
on M; rank 0 alone reads and writes it, so nodes need not share a filesystem.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from smoltrain.model.model import CustomLLM

# whole (not sharded) state dicts, on the CPU: what checkpoints and final/ hold
FULL_STATE = dict(full_state_dict=True, cpu_offload=True)


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


def full_model_state(model) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU, gathered from its shards (every rank joins)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(**FULL_STATE))
