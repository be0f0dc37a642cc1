"""`smoltrain env` and what the machine decides through the CLI: the precision `auto` picks
(the measured matmul speeds faked both ways in the cache the CLI reads), the warning for an
explicit slow choice, and the memory estimate against a real step's peak."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from smoltrain.atomic import cache_dir
from tests.test_device import EMULATED_BF16, NATIVE_BF16
from tests.train.test_train import REPO, small_run_args


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smoltrain", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


def machine_with_speeds(tmp_path: Path, speeds: dict[str, float]) -> dict[str, str]:
    """An environment whose cache holds `speeds` as this machine's measured matmul FLOP/s
    (the converted tokenizers and corpora are shared with the real cache: no re-conversion)."""
    cache = tmp_path / "cache"
    (cache / "machine").mkdir(parents=True, exist_ok=True)
    for sub in ("models", "tokenizers", "corpora"):
        (cache_dir() / sub).mkdir(parents=True, exist_ok=True)
        if not (cache / sub).exists():
            (cache / sub).symlink_to(cache_dir() / sub)
    env = {**os.environ, "SMOLTRAIN_CACHE": str(cache)}
    key = subprocess.run(  # the key as a fresh process computes it (torch's default threads)
        [sys.executable, "-c", "from smoltrain import device; print(device._machine_key(device.cpu_info()))"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.strip()
    (cache / "machine" / f"cpu-matmul-{key}.json").write_text(json.dumps({"flops": speeds}))
    return env


def summary_line(stdout: str, key: str) -> str:
    return next(line for line in stdout.splitlines() if line.strip().startswith(key))


def test_auto_precision_through_the_cli_follows_the_machine(tmp_path):
    """On a CPU whose bf16 matmuls are emulated, `auto` trains in fp32 and says why; where
    they are native and fast, in bf16. An explicit bf16 on the slow CPU trains as asked,
    after one warning with the measured ratio; the MFU line names its ceiling in GFLOP/s."""
    args = [*small_run_args(tmp_path, "run", "--max-steps", "1"), "--overwrite"]
    args.remove("train.peak_flops=1e11")  # the ceiling comes from the (faked) measurement
    slow = machine_with_speeds(tmp_path / "slow", EMULATED_BF16)
    result = run_cli("train", *args, "train.precision=auto", env=slow)
    assert result.returncode == 0, result.stderr[-2000:]
    device = summary_line(result.stdout, "device")
    assert "precision fp32 (auto on CPU: no fast bf16 on this CPU (bf16 0.9 GFLOP/s" in device
    assert "slower than fp32" not in result.stderr
    assert "against 77.7 GFLOP/s per process (measured here, fp32 matmuls)" in result.stdout

    result = run_cli("train", *args, "train.precision=bf16", env=slow)
    assert result.returncode == 0, result.stderr[-2000:]
    warning = "bf16 matmuls run 86x slower than fp32 on this CPU (0.9 GFLOP/s vs 77.7 GFLOP/s)"
    assert result.stderr.count(warning) == 1 and "precision=auto picks fp32" in result.stderr
    assert "precision bf16 (as configured)" in summary_line(result.stdout, "device")
    assert "against 0.9 GFLOP/s per process (measured here, bf16 matmuls)" in result.stdout

    fast = machine_with_speeds(tmp_path / "fast", NATIVE_BF16)
    result = run_cli("train", *args, "train.precision=auto", env=fast)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "precision bf16 (auto on CPU: native bf16, faster" in summary_line(result.stdout, "device")
    assert "attention" in summary_line(result.stdout, "kernels")  # the bf16 set
    assert "slower than fp32" not in result.stderr


def test_env_reports_the_machine_and_what_auto_picks(tmp_path):
    start = time.perf_counter()
    result = run_cli("env")
    assert result.returncode == 0, result.stderr
    assert time.perf_counter() - start < 60  # offline, a few seconds (the measurement is cached)
    for key in ("python / torch", "cpu flags", "matmul (measured)", "auto picks", "auto kernels", "extras"):
        assert summary_line(result.stdout, key)
    report = json.loads(run_cli("env", "--json", "--preset", "tiny", "--micro-batch", "8").stdout)
    assert report["torch"].startswith("2.") and report["auto"]["device"] == "cpu"
    assert report["auto"]["precision"] in ("fp32", "bf16") and report["auto"]["kernels"]
    assert set(report["cpu"]["matmul_gflops"]) == {"fp32", "bf16", "fp16"}
    assert report["memory"]["preset"] == "tiny" and report["memory"]["micro_batch"] == 8
    assert "eval (lm-eval)" in report["extras"]
    # the same speeds and choice as a training run on this machine would read
    slow = machine_with_speeds(tmp_path, EMULATED_BF16)
    report = json.loads(run_cli("env", "--json", "--precision", "bf16", env=slow).stdout)
    assert report["cpu"]["matmul_gflops"] == {"fp32": 77.7, "bf16": 0.9, "fp16": 0.8}
    assert report["auto"]["warning"].startswith("bf16 matmuls run 86x slower")


def test_env_refuses_bad_requests_in_one_line():
    for args, words in (
        (["--preset", "smollm3"], "unknown model preset 'smollm3'"),
        (["--micro-batch", "0"], "--micro-batch and --context must be at least 1"),
    ):
        result = run_cli("env", *args)
        assert result.returncode != 0 and words in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_memory_estimate_is_within_a_quarter_of_a_real_step(tmp_path):
    """SmolLM2-135M, 4 x 256, AdamW steps in the precision `auto` picks here (the second, with
    the optimizer state already there, is the peak): the peak
    resident memory of a fresh process (bench.worker) against `smoltrain env`'s estimate."""
    report = json.loads(run_cli("env", "--json", "--micro-batch", "4", "--context", "256").stdout)
    precision = report["auto"]["precision"]
    step = subprocess.run(
        [sys.executable, "-m", "bench.worker", "train", "--impl", "ours", "--preset", "smollm2-135m"]
        + ["--batch", "4", "--context", "256", "--steps", "1", "--warmup", "1", "--peak-n", "128"]
        + ["--precision", precision],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert step.returncode == 0, step.stderr[-2000:]
    measured = json.loads(step.stdout.strip().splitlines()[-1])["peak_memory_mb"] * 2**20
    estimate = report["memory"]["total_gb"] * 1e9
    assert abs(estimate - measured) <= 0.25 * measured, (precision, estimate / 1e9, measured / 1e9)
