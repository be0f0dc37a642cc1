"""Dispatch modes that prove on CPU what only a GPU or a Mac would show."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class MPSRules(TorchDispatchMode):
    """Fails on what MPS cannot run: any float64 tensor an op makes, and bf16 autocast (off
    on MPS in smoltrain)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for device in ("cpu", "mps"):
            if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16:
                raise AssertionError(f"bf16 autocast under MPS rules: {func}")
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                raise AssertionError(f"{func} made a float64 tensor, which MPS does not have")
        return out


class CountHostSyncs(TorchDispatchMode):
    """Counts the ops that copy a device value to the host (`.item()`, `bool(t)`, `if t.any()`):
    each is a sync on a GPU or MPS, where the host then waits for the device's queue."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def reads_cost_a_sync(monkeypatch) -> None:
    """Make the kernels take their device path: as on a GPU, no host read is free."""
    from smoltrain.model.kernels import chunked_loss

    monkeypatch.setattr(chunked_loss, "host_reads_are_free", lambda device: False)
