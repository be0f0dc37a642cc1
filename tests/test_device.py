"""The CUDA defaults, proven on CPU: TF32, the MFU ceiling, CUDA graphs for the compiled
decode step, and no CPU-only kernel or glibc setting off CPU."""

import torch

from smoltrain.device import cuda_training_settings, datasheet_peak_flops, measure_peak_flops
from smoltrain.generate import decode_compile_mode
from smoltrain.kernels import choose_kernels
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
    assert decode_compile_mode("cpu") == {}


def test_no_cpu_only_kernel_or_glibc_setting_off_cpu(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    for device, precisions in (("cuda", ("fp32", "bf16", "fp16")), ("mps", ("fp32",))):
        for precision in precisions:
            chosen = choose_kernels(device, precision)
            assert "rms_norm" not in chosen and "chunked_loss" in chosen, (device, precision)
        assert cpu_training_tweaks(device, True) == []
