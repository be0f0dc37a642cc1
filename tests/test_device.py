"""What the machine decides: the precision `auto` picks from measured matmul speeds (faked
both ways), the CUDA defaults proven on CPU (TF32, the MFU ceiling, CUDA graphs for the
compiled decode step), and no CPU-only kernel or glibc setting off CPU."""

import torch

from smoltrain import device as device_module
from smoltrain.device import (
    choose_precision,
    cpu_matmul_speeds,
    cuda_training_settings,
    datasheet_peak_flops,
    format_flops,
    measure_peak_flops,
)
from smoltrain.generate import decode_compile_mode
from smoltrain.model.kernels import choose_kernels
from smoltrain.perf import cpu_training_tweaks


def test_datasheet_peaks_by_device_name():
    assert datasheet_peak_flops("NVIDIA H200", "bf16") == 989e12
    assert datasheet_peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12  # not the SXM part's
    assert datasheet_peak_flops("NVIDIA H100 80GB HBM3", "tf32") == 495e12
    assert datasheet_peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5e12
    assert datasheet_peak_flops("Tesla T4", "bf16") is None  # no bf16 there: measured instead
    assert datasheet_peak_flops("NVIDIA GeForce RTX 4090", "bf16") is None


def test_measured_peak_is_a_batch_of_matmuls():
    peak = measure_peak_flops("cpu", torch.float32, n=256, repeats=2)
    assert 1e8 < peak < 1e14


def test_tf32_is_set_on_cuda_only(monkeypatch):
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert cuda_training_settings("cpu", True) == [] and not torch.backends.cuda.matmul.allow_tf32
        assert cuda_training_settings("cuda", False) == [] and not torch.backends.cuda.matmul.allow_tf32
        assert cuda_training_settings("cuda", True) == ["TF32 matmuls for fp32 (train.tf32)"]
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_cuda_graphs_for_the_compiled_decode_step_on_cuda_only():
    assert decode_compile_mode("cuda") == {"mode": "reduce-overhead"}
    cpu = decode_compile_mode("cpu")  # no graphs; guards on the inputs only, a C++ wrapper
    assert "mode" not in cpu and cpu["options"]["cpp_wrapper"] and cpu["options"]["guard_filter_fn"]


def test_no_cpu_only_kernel_or_glibc_setting_off_cpu(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    for device, precisions in (("cuda", ("fp32", "bf16", "fp16")), ("mps", ("fp32",))):
        for precision in precisions:
            chosen = choose_kernels(device, precision)
            assert "rms_norm" not in chosen and "chunked_loss" in chosen, (device, precision)
        assert cpu_training_tweaks(device, True) == []


# Matmul FLOP/s as measured on the two CPUs of SPEC.md: with AMX bf16 units, and an AVX2-only
# EPYC that emulates bf16 and fp16
NATIVE_BF16 = {"fp32": 143e9, "bf16": 409e9, "fp16": 40e9}
EMULATED_BF16 = {"fp32": 77.7e9, "bf16": 0.9e9, "fp16": 0.8e9}


def test_auto_precision_on_cpu_follows_the_measured_matmul_speeds():
    native = choose_precision("auto", "cpu", NATIVE_BF16)
    assert native.precision == "bf16" and native.warning is None
    assert "native bf16, faster" in native.reason and "409.0 GFLOP/s" in native.reason
    emulated = choose_precision("auto", "cpu", EMULATED_BF16)
    assert emulated.precision == "fp32" and emulated.warning is None
    assert "no fast bf16" in emulated.reason and "0.9 GFLOP/s" in emulated.reason
    # bf16 a little faster than fp32 is not enough: autocast's casts would eat it
    assert choose_precision("auto", "cpu", {"fp32": 100e9, "bf16": 120e9, "fp16": 1e9}).precision == "fp32"


def test_an_explicit_slow_precision_runs_with_the_measured_ratio_named():
    slow = choose_precision("bf16", "cpu", EMULATED_BF16)
    assert slow.precision == "bf16"
    assert slow.warning == (
        "bf16 matmuls run 86x slower than fp32 on this CPU (0.9 GFLOP/s vs 77.7 GFLOP/s); "
        "precision=auto picks fp32"
    )
    fp16 = choose_precision("fp16", "cpu", NATIVE_BF16)
    assert (
        fp16.warning is not None
        and "fp16 matmuls run 4x slower" in fp16.warning
        and "picks bf16" in fp16.warning
    )
    assert choose_precision("bf16", "cpu", NATIVE_BF16).warning is None
    assert choose_precision("fp32", "cpu", NATIVE_BF16).warning is None  # slower than bf16, but asked for


def test_auto_precision_on_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose_precision("auto", "cuda").precision == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert choose_precision("auto", "cuda").precision == "fp16"  # V100, T4: with loss scaling
    assert choose_precision("bf16", "mps").precision == "fp32"
    assert "off on MPS" in choose_precision("bf16", "mps").warning


def test_flops_are_named_in_a_unit_that_shows_their_size():
    assert format_flops(0.9e9) == "0.9 GFLOP/s"  # was "0.0 TFLOP/s"
    assert format_flops(77.7e9) == "77.7 GFLOP/s"
    assert format_flops(989e12) == "989.0 TFLOP/s"
    assert format_flops(2e6) == "2.0 MFLOP/s"


def test_cpu_matmul_speeds_are_measured_once_per_machine_and_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOLTRAIN_CACHE", str(tmp_path))
    for name in device_module.ISA_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(
        device_module, "measure_cpu_matmul", lambda dtype: calls.append(dtype) or 1e9 * len(calls)
    )
    first = cpu_matmul_speeds()
    assert len(calls) == 3 and first == {"fp32": 1e9, "bf16": 2e9, "fp16": 3e9}
    assert cpu_matmul_speeds() == first and len(calls) == 3  # read back, not measured
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # other matmul kernels: measured anew
    cpu_matmul_speeds()
    assert len(calls) == 6
    for path in (tmp_path / "machine").glob("*.json"):
        path.write_text("{not json")  # damaged: measured again, not a crash
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert cpu_matmul_speeds() == {"fp32": 7e9, "bf16": 8e9, "fp16": 9e9}


def test_cpu_matmul_measurement_is_short_and_plausible():
    flops = device_module.measure_cpu_matmul(torch.float32)
    assert 1e8 < flops < 1e14


def test_inference_on_cuda_defaults_to_16_bit(monkeypatch):
    """generate, eval and serve loaded fp32 weights on CUDA (a quarter of the tensor cores'
    rate, no TF32 either); `--dtype auto` is bf16 there, fp16 without bf16, fp32 elsewhere."""
    from smoltrain.cli import _dtype
    from smoltrain.device import inference_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert inference_dtype("cuda") == _dtype("auto", "cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert inference_dtype("cuda") == torch.float16
    assert inference_dtype("cpu") == inference_dtype("mps") == _dtype("auto", "cpu") == torch.float32
    assert _dtype("bf16", "cpu") == torch.bfloat16  # an explicit choice stands


def test_process_group_timeout_and_mps_loss_chunks(tmp_path):
    """Ranks wait in a collective while rank 0 writes a checkpoint (a 1.7B FSDP one is ~20 GB):
    the process group's timeout is a setting (60 minutes by default). On an Apple GPU the
    loss's logits chunks are sized for memory it shares with the system, not CUDA's 1 GiB."""
    from smoltrain.model.kernels.chunked_loss import default_chunk_size
    from smoltrain.train.config import load_config
    from smoltrain.train.setup import setup_accelerator

    cfg = load_config(None, ["train.dist_timeout_minutes=90", "train.device=cpu", f"output_dir={tmp_path}"])
    accelerator = setup_accelerator(cfg)
    assert accelerator.init_handler is not None and accelerator.init_handler.timeout.total_seconds() == 5400
    vocab = 49152
    assert (
        4 * vocab * default_chunk_size(vocab, "mps")
        <= 256 << 20
        < 4 * vocab * default_chunk_size(vocab, "cuda")
    )
