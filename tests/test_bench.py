import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_bench(module: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_bench_quick_runs_every_path(tmp_path):
    out = tmp_path / "RESULTS.md"
    result = run_bench("bench", "--quick", "--out", str(out))
    machine = result.stdout.splitlines()[0]
    assert machine.startswith("CPU: ") and "native bf16: " in machine and "precision auto: " in machine
    bf16 = "precision auto: bf16" in machine  # bf16 rows only where this CPU runs bf16 fast
    assert "train tiny fp32: ours" in result.stdout and ("train tiny bf16: ours" in result.stdout) == bf16
    assert "train tiny compiled fp32: ours" in result.stdout
    generation = [line for line in result.stdout.splitlines() if line.startswith("generate fp32 batch 1")]
    assert len(generation) == 2 and "batch 1 compiled: ours" in generation[1]
    assert all(line.endswith("same tokens: True") for line in generation)
    report = out.read_text()
    assert ("| tiny | bf16 |" in report) == bf16 and "torch " in report and "- CPU: " in report
    assert "{" not in report  # every placeholder filled in


def test_data_bench_reports_prepare_and_loaders():
    result = run_bench("bench.data", "--copies", "2", "--batches", "5", "--skip-cpu-training")
    assert "shard files identical for 1 and 2 workers: True" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("| prepared shards, rank 0 of")]
    assert len(rows) == 2 and all(float(r.split("|")[2].replace(",", "")) > 0 for r in rows)


@pytest.mark.slow
def test_the_gpu_script_runs_every_section_on_cpu(tmp_path):
    """bench/gpu.sh meets a GPU only in a rare lease: its dry run on CPU (toy sizes) runs every section,
    and the results file holds each one's outcome, written as the run goes."""
    import json

    from bench.gpu import SECTIONS

    out = tmp_path / "gpu_results.json"
    result = run_bench("bench.gpu", "--dry-run", "--out", str(out))
    results = json.loads(out.read_text())
    failed = {name: results[name].get("trace") for name, _, _ in SECTIONS if not results[name]["ok"]}
    assert not failed, failed
    assert "failed sections: none" in result.stdout
    # its lm-eval section is bench.evals: our adapter's scores equal lm_eval --model hf's
    evals = results["lm_eval_items"]["result"]
    assert evals["same_scores"] and any("ratio: **" in line for line in evals["lines"])
    assert all(limit <= 540 for _, _, limit in SECTIONS)  # each fits in one lease's run


def test_the_gpu_script_adds_what_an_earlier_run_left(tmp_path):
    """A lease is too short for every section: `--missing` runs only those that the results
    file lacks or that failed there, keeps the rest, and `--budget` leaves for later a
    section whose limit would pass it."""
    import json

    from bench.gpu import SECTIONS

    out = tmp_path / "gpu_results.json"
    earlier = {name: {"ok": True, "result": {"kept": 1}, "seconds": 1} for name, _, _ in SECTIONS}
    earlier["chunked_loss"] = {"ok": False, "error": "SectionTimeout()", "seconds": 20}
    del earlier["resume_with_more_rng_states"]
    earlier["runs"] = [{"date": "2026-12-04", "torch": "2.11", "sections": ["chunked_loss"]}]
    out.write_text(json.dumps(earlier))
    result = run_bench("bench.gpu", "--dry-run", "--out", str(out), "--missing", "--budget", "8")
    results = json.loads(out.read_text())
    assert results["resume_with_more_rng_states"]["ok"]  # missing, its 5 s limit fits in 8
    assert results["chunked_loss"] == earlier["chunked_loss"]  # failed, but 10 s pass 8
    assert "['chunked_loss']" in result.stdout
    assert results["sdpa_kernels"]["result"] == {"kept": 1}
    assert [run["sections"] for run in results["runs"]] == [["chunked_loss"], ["resume_with_more_rng_states"]]


def test_decode_bench_names_the_gap_where_greedy_tokens_part(tiny_model):
    """bench.decode's quality column: leading tokens shared with f32, and f32's top-2 logit gap where
    they part; the gaps it measures are those of the greedy choices (never negative)."""
    import torch

    from bench.decode import PROMPTS, agreement, greedy_of, top2_gaps
    from smoltrain.generate import generate

    reference = [[5, 6, 7, 8], [1, 2, 3, 4]]
    gaps = [[0.5, 0.25, 0.004, 0.1], [0.3, 0.2, 0.1, 0.05]]
    assert agreement([[5, 6, 9, 9], [1, 2, 3, 4]], reference, gaps) == "2/4; f32 gap there 0.004/-"
    assert agreement(reference, reference, gaps) == "4/4"
    assert agreement([[5, 9, 9, 9], [1, 2, 3, 4]], reference) == "1/4"
    with torch.inference_mode():
        tokens = greedy_of(tiny_model, PROMPTS[0], generate)
        measured = top2_gaps(tiny_model, PROMPTS[0], tokens)
    assert len(measured) == 32 and min(measured) >= 0 and max(measured) > 0


def test_the_step_profile_groups_ops_and_counts_the_products_flops():
    """bench.worker --profile: each op's own time lands in one group (the shares sum to 1), and
    the products' FLOPs are counted from their shapes, whichever aten op ran them."""
    import torch
    import torch.nn.functional as F

    from bench.worker import describe_split, step_time_split

    a, b, acc = torch.randn(64, 32), torch.randn(32, 48), torch.zeros(64, 48)
    batched = torch.randn(3, 16, 8)
    q = k = v = torch.randn(1, 2, 16, 8)
    weight = torch.nn.Parameter(torch.randn(8, 8))
    weight.grad = torch.randn(8, 8)
    opt = torch.optim.AdamW([weight], fused=True)

    def step():
        a @ b  # mm
        acc.addmm_(a, b)
        torch.bmm(batched, batched.transpose(1, 2))  # (3, 16, 8) @ (3, 8, 16)
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
        opt.step()
        torch.relu(a)

    split = step_time_split(step, steps=2)
    flops = 2 * (2 * (2 * 64 * 32 * 48) + 2 * 3 * 16 * 8 * 16)  # two steps of mm, addmm_ and bmm
    products_s = split["matmul"] * split["step_s"] * 2
    assert split["matmul_flops_per_s"] * products_s == pytest.approx(flops, rel=1e-6)
    assert all(split[g] > 0 for g in ("matmul", "attention", "optimizer", "other"))
    assert sum(split[g] for g in ("matmul", "attention", "optimizer", "other")) == pytest.approx(1)
    line = describe_split({"time_split": split, "matmul_peak_flops": 1e11, "mfu": 0.5})
    assert "under the profiler: matmul " in line and "of the 100 GFLOP/s peak; MFU 50%" in line


def test_smoltrains_bench_workers_start_under_the_lean_malloc_setting():
    """The launcher gives smoltrain's workers glibc's setting up front (no relaunch after torch's
    import), and transformers' workers, or ours with --tune-malloc off, this process's environment."""
    from bench.worker import launch_env
    from smoltrain.perf import LEAN_MALLOC_TUNABLE

    ours = launch_env(["train", "--impl", "ours", "--preset", "tiny"])
    assert LEAN_MALLOC_TUNABLE in ours["GLIBC_TUNABLES"].split(":")
    assert launch_env(["train", "--impl", "hf"]) is None
    assert launch_env(["train", "--impl", "ours", "--tune-malloc", "off"]) is None


def test_the_worker_refuses_a_profile_it_cannot_take():
    """--profile splits a CPU training step: asked of generation, the worker says so and stops."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.worker", "generate", "--impl", "ours", "--profile"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    assert "--profile splits a training step's time on CPU only" in result.stderr
    assert "Traceback" not in result.stderr
