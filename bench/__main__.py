"""smoltrain against transformers, side by side in one run: training and generation
throughput, peak memory, and how close each comes to what this machine allows.

    python -m bench            # the full table, written to bench/RESULTS.md (~10 min on 2 cores)
    python -m bench --quick    # a smoke run of every path (tests use it)

Each measurement runs in a fresh process (so peak memory is its own) and the contenders
alternate, so that drift on a shared machine hits both alike. The ratios are the headline.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from smoltrain.device import ISA_SETTINGS, choose_precision, cpu_info, measure_peak_flops, native_flags
from smoltrain.model.config import get_preset

PRECISIONS = {"fp32": "float32", "bf16": "bfloat16"}

HERE = Path(__file__).resolve().parent


def worker(*args: str) -> dict:
    from bench.worker import launch_env

    cmd = [sys.executable, "-m", "bench.worker", *args]
    env = launch_env(args)
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent, timeout=3600, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def alternate(rounds: int, make_args, contenders=("ours", "hf")) -> dict[str, list[dict]]:
    """Run each contender `rounds` times, rotating who goes first."""
    runs: dict[str, list[dict]] = {c: [] for c in contenders}
    for r in range(rounds):
        for c in contenders[r % len(contenders) :] + contenders[: r % len(contenders)]:
            runs[c].append(worker(*make_args(c)))
    return runs


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def median_mfu(runs: list[dict], flops_per_token: float) -> float:
    return statistics.median(r["tokens_per_s"] * flops_per_token / r["matmul_peak_flops"] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one round: checks every path runs")
    parser.add_argument("--rounds", type=int, default=None, help="alternations per measurement")
    parser.add_argument("--out", type=Path, default=None, help="markdown report (default bench/RESULTS.md)")
    parser.add_argument(
        "--precisions",
        default=None,
        help="comma-separated, of fp32,bf16 (default: fp32, and bf16 where this CPU runs it fast)",
    )
    args = parser.parse_args()
    quick = args.quick
    rounds = args.rounds or 1
    out = args.out or (None if quick else HERE / "RESULTS.md")

    # bf16 only where `precision: auto` would train in it: on a CPU that emulates bf16 a
    # 135M step takes minutes and says nothing a user of that CPU would run
    auto = choose_precision("auto", "cpu")
    precisions = (
        args.precisions.split(",") if args.precisions else ["fp32", *(["bf16"] * (auto.precision == "bf16"))]
    )
    n = 512 if quick else 2048
    peaks = {p: measure_peak_flops("cpu", getattr(torch, PRECISIONS[p]), n) for p in precisions}
    bandwidth_mb = 64 if quick else 512
    machine = describe_cpu()
    print(f"{machine}; precision auto: {auto.precision} ({auto.reason})", flush=True)
    print(
        f"matmul peak ({n}^3): " + ", ".join(f"{p} {f / 1e9:.0f} GFLOP/s" for p, f in peaks.items()),
        flush=True,
    )

    rows_train = []
    # (preset, batch, context, ModelConfig overrides, torch.compile)
    if quick:
        tiny = ("tiny", 2, 64, '{"num_hidden_layers": 1}')
        train_cases = [(*tiny, False), (*tiny, True)]
    else:
        tiny, smol = ("tiny", 8, 256, "{}"), ("smollm2-135m", 4, 256, "{}")
        long = ("smollm2-135m", 1, 2048, "{}")
        train_cases = [(*tiny, False), (*smol, False), (*long, False), (*tiny, True)]
    for preset, batch, context, overrides, compiled in train_cases:
        config = get_preset(preset, **json.loads(overrides))
        flops_per_token = config.flops_per_token(context)
        for precision in precisions:
            if quick and compiled and precision == "bf16":
                continue
            steps = "2" if quick else "5"
            runs = alternate(
                rounds,
                lambda impl, p=precision, pr=preset, b=batch, c=context, o=overrides, s=steps, cm=compiled: [
                    "train",
                    "--impl",
                    impl,
                    "--preset",
                    pr,
                    "--precision",
                    p,
                    "--batch",
                    str(b),
                    "--context",
                    str(c),
                    "--steps",
                    s,
                    "--warmup",
                    "1" if quick else "2",
                    "--overrides",
                    o,
                    "--peak-n",
                    str(n),
                    *(["--compile"] if cm else []),
                ],
            )
            ours, hf = (median_of(runs[k], "tokens_per_s") for k in ("ours", "hf"))
            mem_ours, mem_hf = (median_of(runs[k], "peak_memory_mb") for k in ("ours", "hf"))
            row = {
                "preset": preset,
                "compiled": compiled,
                "compile_s": [median_of(runs[k], "compile_s") if compiled else None for k in ("ours", "hf")],
                "precision": precision,
                "batch": f"{batch}x{context}",
                "ours": ours,
                "hf": hf,
                "ratio": ours / hf,
                # each run against the matmul peak its own worker measured right after it
                "mfu_ours": median_mfu(runs["ours"], flops_per_token),
                "mfu_hf": median_mfu(runs["hf"], flops_per_token),
                "matmul_peak": median_of(runs["ours"] + runs["hf"], "matmul_peak_flops"),
                "mem_ours": mem_ours,
                "mem_hf": mem_hf,
                "mem_ratio": mem_ours / mem_hf,
            }
            rows_train.append(row)
            label = f"{preset}{' compiled' if compiled else ''}"
            print(
                f"train {label} {precision}: ours {ours:,.0f} tok/s vs transformers {hf:,.0f} "
                f"({row['ratio']:.2f}x), MFU {row['mfu_ours']:.0%} vs {row['mfu_hf']:.0%} "
                f"(peak {row['matmul_peak'] / 1e9:.0f} GFLOP/s), "
                f"peak memory {mem_ours:,.0f} vs {mem_hf:,.0f} MB",
                flush=True,
            )

    rows_gen = []
    new_tokens = "8" if quick else "128"
    for precision in precisions:
        for batch in (1, 8):
            if quick and (batch == 8 or precision == "bf16"):
                continue
            # at batch 1 also ours with the decode step compiled (prepare_for_generation(compile=True))
            contenders = ("ours", "ours-compiled", "hf") if batch == 1 else ("ours", "hf")
            runs = alternate(
                rounds,
                lambda c, p=precision, b=batch: [
                    "generate",
                    "--impl",
                    "hf" if c == "hf" else "ours",
                    *(["--compile"] if c == "ours-compiled" else []),
                    "--precision",
                    p,
                    "--batch",
                    str(b),
                    "--new-tokens",
                    new_tokens,
                    "--repeats",
                    "1" if quick else "3",
                    "--bandwidth-mb",
                    str(bandwidth_mb),
                    "--layers",
                    "2" if quick else "0",  # quick: compiling 2 layers, not 30
                ],
                contenders,
            )
            hf = median_of(runs["hf"], "tokens_per_s")
            weight_bytes, params = runs["ours"][0]["weight_bytes"], runs["ours"][0]["params"]
            for contender in contenders[:-1]:
                ours = median_of(runs[contender], "tokens_per_s")
                bandwidth = median_of(runs[contender], "bandwidth")  # measured beside its runs
                # each decode step reads every weight once and does 2 FLOPs per weight and row
                limit = min(bandwidth / weight_bytes, peaks[precision] / (2 * params * batch)) * batch
                compiled = contender == "ours-compiled"
                same = runs[contender][0]["tokens"] == runs["hf"][0]["tokens"]
                row = {
                    "precision": precision,
                    "batch": batch,
                    "compile_s": median_of(runs[contender], "warmup_s") if compiled else None,
                    "ours": ours,
                    "hf": hf,
                    "ratio": ours / hf,
                    "bandwidth": bandwidth,
                    "limit": limit,
                    "of_limit": ours / limit,
                    "same_tokens": same,
                    "linears": runs[contender][0].get("linears", "?"),
                }
                rows_gen.append(row)
                print(
                    f"generate {precision} batch {batch}{' compiled' if compiled else ''}: ours {ours:,.1f} "
                    f"tok/s vs transformers {hf:,.1f} ({row['ratio']:.2f}x); weight-bandwidth limit "
                    f"{limit:,.0f} tok/s at {bandwidth / 1e9:.0f} GB/s (ours at {row['of_limit']:.0%}); "
                    f"same tokens: {same}",
                    flush=True,
                )

    if out is not None:
        write_report(out, machine, auto, peaks, bandwidth_mb, n, rows_train, rows_gen, rounds, quick)
        print(f"wrote {out}")


def describe_cpu() -> str:
    """The CPU as every figure should name it: model, widest vector kernels, native bf16."""
    info = cpu_info()
    wide = [f for f in info.flags if f.startswith(("avx512f", "amx", "avx2")) or f == "avx512_bf16"]
    bf16 = " ".join(native_flags(info, "bf16")) or "none"
    held = [f"{k}={os.environ[k]}" for k in ISA_SETTINGS if k in os.environ]
    return (
        f"CPU: {info.model}, {info.threads} threads, torch kernels {info.capability}, "
        f"flags {' '.join(wide) or 'n/a'}, native bf16: {bf16}"
        + (f"; instruction set held down by {' '.join(held)}" if held else "")
    )


def write_report(
    out: Path, machine: str, auto, peaks, bandwidth_mb, n, rows_train, rows_gen, rounds, quick
) -> None:
    peak_text = ", ".join(f"{p} {f / 1e9:.0f} GFLOP/s" for p, f in peaks.items())
    lines = [
        "# smoltrain vs transformers",
        "",
        f"- {machine}; `precision: auto` here: {auto.precision} ({auto.reason})",
        f"- date: {datetime.date.today().isoformat()}; {platform.machine()}, {platform.platform()}",
        f"- torch {torch.__version__}, transformers {__import__('transformers').__version__}, "
        f"python {platform.python_version()}; `python -m bench` ({rounds} alternation(s) per row)",
        f"- matmul peak ({n}^3 torch.mm) at the start: {peak_text} (training MFU uses the peak "
        "each worker measures right after its timed steps, shown per row); memory read bandwidth: "
        f"summing a {bandwidth_mb} MiB tensor in each generation run, right before each timed repeat "
        "(it moves with the neighbours)",
        "",
        "## Training (AdamW step, identical weights and batch; median of "
        + ("2 steps after 1 warm-up, --quick)" if quick else "5 steps after 2 warm-up)"),
        "",
        "| model | precision | batch | ours tok/s | transformers tok/s | ours/theirs | MFU ours "
        "| MFU theirs | matmul peak GFLOP/s | peak MB ours | peak MB theirs | memory ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows_train:
        model = r["preset"]
        if r["compiled"]:
            ours_s, hf_s = r["compile_s"]
            model += f", torch.compile (compile {ours_s:.0f} s vs {hf_s:.0f} s)"
        lines.append(
            f"| {model} | {r['precision']} | {r['batch']} | {r['ours']:,.0f} | {r['hf']:,.0f} | "
            f"**{r['ratio']:.2f}x** | {r['mfu_ours']:.0%} | {r['mfu_hf']:.0%} | "
            f"{r['matmul_peak'] / 1e9:.0f} | "
            f"{r['mem_ours']:,.0f} | {r['mem_hf']:,.0f} | {r['mem_ratio']:.2f} |"
        )
    lines += [
        "",
        "## Generation (bundled SmolLM2-135M-Instruct, greedy, 128 new tokens, prefill included)",
        "",
        "Ours: `prepare_for_generation(model)` (oneDNN linears where a timing of one layer "
        "shows them faster at one row: `OneDNNLinear`, else the model as loaded: `Linear`), "
        "and at batch 1 also with "
        "`compile=True` (static cache, decode step compiled; its warm-up of 8 tokens is mostly "
        "compilation, shorter with a warm inductor cache). Theirs: `generate` as it comes.",
        "",
        "| ours | precision | batch | ours tok/s | transformers tok/s | ours/theirs | read GB/s "
        "| weight-bandwidth limit | ours of limit | same tokens |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows_gen:
        ours = f"prepared ({r['linears']})"
        if r["compile_s"] is not None:
            ours = f"prepared, compiled decode (warm-up {r['compile_s']:.0f} s)"
        lines.append(
            f"| {ours} | {r['precision']} | {r['batch']} | {r['ours']:,.1f} | {r['hf']:,.1f} | "
            f"**{r['ratio']:.2f}x** | {r['bandwidth'] / 1e9:.0f} | {r['limit']:,.0f} | {r['of_limit']:.0%} | "
            f"{r['same_tokens']} |"
        )
    lines += [
        "",
        "MFU: model FLOPs per token (6N + 12·L·H·T, PaLM appendix B) x tokens/s over the matmul peak "
        "of that precision, measured in the same worker right after the timed steps (the fastest of "
        "15 matmuls; median over the row's runs). Peak memory: the worker's peak resident set (CPU) "
        "or max allocated (CUDA); smoltrain's worker runs, as `smoltrain train` does, with glibc's "
        "tcache off (`smoltrain/perf.py`), transformers' as it comes. The generation limit: the "
        "tokens/s at which a decode step's weight reads take the whole time (read bandwidth / bytes "
        "of weights, x batch), or its matmuls do (peak at the start / 2N per row), whichever is "
        "lower.",
    ]
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
