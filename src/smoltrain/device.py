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


# Dense tensor-core peaks from NVIDIA's datasheets (SXM parts unless named), FLOP/s, by the
# first name fragment that matches torch.cuda.get_device_name(): what MFU is usually quoted
# against. "tf32" is fp32 training with TF32 matmuls (smoltrain's default on CUDA).
DATASHEET_PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},
    "T4": {"fp16": 65e12, "fp32": 8.1e12},
}


def datasheet_peak_flops(device_name: str, precision: str) -> float | None:
    """The datasheet peak of a known GPU for `precision` (bf16, fp16, tf32, fp32), else None."""
    for fragment, peaks in DATASHEET_PEAK_FLOPS.items():
        if fragment in device_name:
            return peaks.get(precision)
    return None


def peak_flops(device: torch.device | str, precision: str) -> tuple[float, str]:
    """The ceiling MFU is measured against, and where it comes from: a known GPU's datasheet,
    else a measurement here (`measure_peak_flops`)."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = datasheet_peak_flops(name, precision)
        if known:
            return known, f"{name} datasheet, {precision}"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return measure_peak_flops(device, dtype), f"measured, {precision}"


def measure_peak_flops(
    device: torch.device | str, dtype: torch.dtype, n: int | None = None, repeats: int = 5
) -> float:
    """FLOP/s of back-to-back n^3 matmuls here. One matmul between two host syncs reads the
    launch and sync latency as well (a 2048^3 one on a GPU, about 2x too low a time: MFU
    twice too high), so each timing covers a batch of them, on a GPU between CUDA events.
    The fastest of `repeats` timings: on a shared machine a neighbour's burst can slow
    several in a row, and the ceiling is what the hardware does when left alone."""
    device = torch.device(device)
    gpu = device.type == "cuda"
    n = n or (8192 if gpu else 2048 if device.type == "mps" else 1024)
    per_timing = 20 if device.type != "cpu" else 3
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(2):
        torch.matmul(a, b, out=out)
    times = []
    for _ in range(repeats):
        if gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(per_timing):
                torch.matmul(a, b, out=out)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(per_timing):
                torch.matmul(a, b, out=out)
            sync(device)
            times.append(time.perf_counter() - t0)
    return per_timing * 2 * n**3 / min(times)


def cuda_training_settings(device_type: str, tf32: bool) -> list[str]:
    """Process-wide CUDA settings for training, applied here and named for the start-up
    summary: TF32 matmuls and convolutions for fp32 (8x the fp32 rate on tensor cores, at
    bf16-like input rounding and fp32 accumulation; what nanoGPT and litgpt turn on)."""
    if device_type != "cuda" or not tf32:
        return []
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return ["TF32 matmuls for fp32 (train.tf32)"]
