"""Which device to run on, and what it can do: the one place for device choice, device
synchronisation, the precision `auto` picks, and the matmul peak that MFU is measured
against. On CPU both come from a short measurement of this machine, cached
(`cpu_matmul_speeds`): the same wheel of torch runs bf16 matmuls 3x faster than fp32 on a
CPU with AMX and 86x slower on one without bf16 units (docs/performance.md)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from smoltrain.atomic import cache_dir, write_atomic

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# bf16 autocast adds casts around every matmul: it pays only when the matmuls themselves are
# clearly faster (AMX: 3-12x; avx512_bf16 alone: ~2x; emulated: 0.01x)
AUTOCAST_PAYS_AT = 1.5
# The CPU flags that mean native 16-bit matrix arithmetic (Linux /proc/cpuinfo names; the
# aarch64 one is `bf16`), shown by `smoltrain env` beside the measurement that decides.
NATIVE_FLAGS = {
    "bf16": ("amx_bf16", "avx512_bf16", "bf16"),
    "fp16": ("amx_fp16", "avx512_fp16", "fphp"),
}
# Process settings that change which matmul kernels run (and so their speed): part of the
# cache key, so an emulated AVX2 run (ONEDNN_MAX_CPU_ISA=AVX2 ...) measures anew.
ISA_SETTINGS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")


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
    else a measurement here (on CPU the cached `cpu_matmul_speeds`)."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = datasheet_peak_flops(name, precision)
        if known:
            return known, f"{name} datasheet, {precision}"
    if device.type == "cpu":
        return cpu_matmul_speeds()[precision], f"measured here, {precision} matmuls"
    dtype = PRECISION_DTYPES.get(precision, torch.float32)
    return measure_peak_flops(device, dtype), f"measured here, {precision} matmuls"


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


def inference_dtype(device_type: str) -> torch.dtype:
    """The weights' dtype for generation, serving and evaluation when none is asked for: on
    CUDA bf16 (fp16 without it), as training computes there, rather than fp32 at a quarter of
    the tensor cores' rate; fp32 elsewhere (CPU decoding is measured in docs/performance.md)."""
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def cuda_training_settings(device_type: str, tf32: bool) -> list[str]:
    """Process-wide CUDA settings for training, applied here and named for the start-up
    summary: TF32 matmuls and convolutions for fp32 (8x the fp32 rate on tensor cores, at
    bf16-like input rounding and fp32 accumulation; what nanoGPT and litgpt turn on)."""
    if device_type != "cuda" or not tf32:
        return []
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return ["TF32 matmuls for fp32 (train.tf32)"]


@dataclass(frozen=True)
class CpuInfo:
    model: str  # as lscpu names it
    flags: tuple[str, ...]  # the vector and matrix extensions among the CPU's flags
    capability: str  # the widest vector kernels torch dispatches to here (AVX2, AVX512, ...)
    threads: int  # torch's intra-op threads


_VECTOR_FLAG_PREFIXES = ("avx", "amx", "fma", "sse4", "asimd", "sve", "neon", "bf16", "fphp", "i8mm")


def cpu_info() -> CpuInfo:
    """This CPU's model name and its vector/matrix flags (Linux: /proc/cpuinfo; elsewhere
    the platform's own name and no flags)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model name", "cpu model") and value.strip():
            model = value.strip()
        elif key in ("flags", "Features"):
            flags.update(value.split())
    if sys.platform == "darwin":
        import subprocess

        brand = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        model = brand.stdout.strip() or model
    vector = tuple(sorted(f for f in flags if f.startswith(_VECTOR_FLAG_PREFIXES)))
    return CpuInfo(model, vector, torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())


def native_flags(info: CpuInfo, precision: str) -> list[str]:
    """The flags of `info` that mean native `precision` (bf16, fp16) matrix arithmetic."""
    return [f for f in NATIVE_FLAGS.get(precision, ()) if f in info.flags]


def _time_matmuls(dtype: torch.dtype, n: int, budget_s: float = 0.05, repeats: int = 3) -> float:
    """FLOP/s of n^3 matmuls on CPU: the fastest of `repeats` timings of as many matmuls as
    fill `budget_s` (one, for an emulated dtype that takes longer than that alone)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    t0 = time.perf_counter()
    torch.matmul(a, b, out=out)  # warm-up: packing buffers, thread pool
    one = time.perf_counter() - t0
    per_timing = max(1, min(20, int(budget_s / max(one, 1e-6))))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(per_timing):
            torch.matmul(a, b, out=out)
        best = min(best, (time.perf_counter() - t0) / per_timing)
    return 2 * n**3 / best


def measure_cpu_matmul(dtype: torch.dtype) -> float:
    """FLOP/s of this CPU's matmuls in `dtype`, at 1024^3 where that is quick, else at
    512^3: an emulated bf16 1024^3 matmul takes seconds, and its rate is plain at 512."""
    small = _time_matmuls(dtype, 512, repeats=1)
    if 2 * 1024**3 / small > 0.1:  # a 1024^3 one would take over 0.1 s: a slow dtype
        return small
    return max(small, _time_matmuls(dtype, 1024))


def _machine_key(info: CpuInfo) -> str:
    isa = ";".join(f"{k}={os.environ[k]}" for k in ISA_SETTINGS if k in os.environ)
    text = f"{info.model}|{' '.join(info.flags)}|{info.capability}|{info.threads}|{torch.__version__}|{isa}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def cpu_matmul_speeds(refresh: bool = False) -> dict[str, float]:
    """FLOP/s of fp32, bf16 and fp16 matmuls on this CPU with torch's threads: measured once
    (about 1 s; 2 s where 16-bit is emulated), then read from the cache, keyed by the CPU,
    its flags, the thread count, torch's version and the ISA settings of the environment."""
    info = cpu_info()
    path = cache_dir() / "machine" / f"cpu-matmul-{_machine_key(info)}.json"
    if not refresh:
        try:
            cached = json.loads(path.read_text())
            if set(cached.get("flops", {})) == set(PRECISION_DTYPES):
                return {k: float(v) for k, v in cached["flops"].items()}
        except (OSError, ValueError, AttributeError):
            pass  # missing or damaged: measure again
    speeds = {name: measure_cpu_matmul(dtype) for name, dtype in PRECISION_DTYPES.items()}
    record = {"cpu": info.model, "threads": info.threads, "torch": torch.__version__, "flops": speeds}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(record, indent=1))
    except OSError:
        pass  # a read-only cache only costs the next run another measurement
    return speeds


def format_flops(flops: float) -> str:
    """A FLOP/s figure in the unit that shows its size: 0.9 GFLOP/s, 77.7 GFLOP/s, 989 TFLOP/s."""
    for unit, scale, floor in (("TFLOP/s", 1e12, 1e12), ("GFLOP/s", 1e9, 1e8), ("MFLOP/s", 1e6, 1e6)):
        if flops >= floor:
            return f"{flops / scale:,.1f} {unit}"
    return f"{flops:,.0f} FLOP/s"


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # fp32, bf16 or fp16: what the run computes in
    reason: str  # why, for the start-up summary
    warning: str | None = None  # an explicit choice that will run slowly here, with the ratio


def choose_precision(
    requested: str, device_type: str, cpu_speeds: dict[str, float] | None = None
) -> PrecisionChoice:
    """What `train.precision` means here. auto: on CUDA bf16 where supported, else fp16 with
    loss scaling; on MPS fp32 (as the reference); on CPU bf16 autocast only where this CPU's
    bf16 matmuls measured at least AUTOCAST_PAYS_AT x its fp32 ones, else fp32. An explicit
    16-bit choice on a CPU where it is slower than fp32 is kept, with a warning that gives
    the measured ratio. `cpu_speeds` (FLOP/s by precision) defaults to `cpu_matmul_speeds()`.
    `requested` is one of auto, fp32, bf16, fp16 (checked when the config is loaded)."""
    if device_type == "mps":
        if requested not in ("auto", "fp32"):
            note = f"{requested} is off on MPS (as in the reference); training in fp32"
            return PrecisionChoice("fp32", "MPS", note)
        return PrecisionChoice("fp32", "auto on MPS: fp32, as the reference")
    if device_type == "cuda":
        if requested != "auto":
            return PrecisionChoice(requested, "as configured")
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16", "auto on CUDA: bf16 is supported")
        return PrecisionChoice("fp16", "auto on CUDA: no bf16 on this GPU, fp16 with loss scaling")
    speeds = cpu_speeds or cpu_matmul_speeds()
    fp32, bf16 = speeds["fp32"], speeds["bf16"]
    bf16_pays = bf16 >= AUTOCAST_PAYS_AT * fp32
    measured = f"bf16 {format_flops(bf16)} vs fp32 {format_flops(fp32)} matmuls"
    auto = "bf16" if bf16_pays else "fp32"
    if requested == "auto":
        why = "native bf16, faster" if bf16_pays else "no fast bf16 on this CPU"
        return PrecisionChoice(auto, f"auto on CPU: {why} ({measured})")
    warning = None
    if requested != "fp32" and speeds[requested] < fp32:
        warning = (
            f"{requested} matmuls run {fp32 / speeds[requested]:,.0f}x slower than fp32 on this CPU "
            f"({format_flops(speeds[requested])} vs {format_flops(fp32)}); precision=auto picks {auto}"
        )
    return PrecisionChoice(requested, "as configured", warning)


def autocast(device_type: str, precision: str):
    """The forward's autocast: matmuls in bf16 or fp16, reductions in fp32; none in fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device_type, dtype=dtype) if dtype else nullcontext()


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch's tensors on `device`, copied without waiting where the host memory is pinned."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
