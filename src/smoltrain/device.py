"""Which device to run on, and what it can do: the one place for device choice, device
synchronisation and the matmul peak that MFU is measured against."""

from __future__ import annotations

import time

import torch


def pick_device(name: str = "auto") -> str:
    """cuda > mps > cpu for `auto`; an explicit device must exist."""
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
        "cpu": True,
    }
    if name == "auto":
        return next(d for d, ok in available.items() if ok)
    if name not in available:
        raise ValueError(f"unknown device '{name}'; choose auto, cuda, mps or cpu")
    if not available[name]:
        raise ValueError(f"device '{name}' is not available here; use --device auto or cpu")
    return name


def sync(device: torch.device | str) -> None:
    """Wait for queued kernels, so that wall-clock timings mean something."""
    device_type = torch.device(device).type
    if device_type == "cuda":
        torch.cuda.synchronize()
    elif device_type == "mps":
        torch.mps.synchronize()


def measure_peak_flops(
    device: torch.device | str, dtype: torch.dtype, n: int | None = None, repeats: int = 7
) -> float:
    """FLOP/s of an n^3 matmul here: the ceiling MFU is measured against. The fastest of
    `repeats` timings: on a shared machine a neighbour's burst can slow several in a row, and
    the ceiling is what the hardware does when left alone (the conservative choice for MFU)."""
    device = torch.device(device)
    n = n or (2048 if device.type != "cpu" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times)
