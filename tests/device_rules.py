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
