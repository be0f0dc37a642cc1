"""Muon against AdamW on the quickstart (configs/quickstart.yaml, its tokenizer from `make demo`):
steps and seconds each takes to reach the AdamW quickstart's final held-out loss, each
optimizer with a small learning-rate sweep (AdamW's lr; Muon's muon_lr, AdamW keeping the
quickstart's lr for the embeddings and norms). The held-out loss is measured every
`--eval-every` steps; seconds are the run's training time per step times the step.

Usage: python -m bench.muon [--adamw-lrs 1e-3,2e-3,4e-3] [--muon-lrs 0.01,0.02,0.04] [--steps N]"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(out: Path, overrides: list[str], eval_every: int, steps: int | None) -> dict:
    cmd = [
        sys.executable, "-m", "smoltrain", "train", "--config", str(REPO / "configs/quickstart.yaml"),
        "--output-dir", str(out), "--overwrite", f"log.eval_every={eval_every}", "log.sample_every=100000",
        "log.checkpoint_every=100000", "log.progress_bar=false", *overrides,
    ]  # fmt: skip
    if steps:
        cmd += ["--max-steps", str(steps)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
    step, seconds = map(float, re.search(r"done: step (\d+) in (\d+)s", done).groups())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    return {"evals": evals, "seconds_per_step": seconds / step, "final": evals[max(evals)]}


def reached(result: dict, target: float) -> tuple[int | None, float | None]:
    step = next((s for s, loss in sorted(result["evals"].items()) if loss <= target), None)
    return step, None if step is None else step * result["seconds_per_step"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adamw-lrs", default="1e-3,2e-3,4e-3")
    parser.add_argument("--muon-lrs", default="0.01,0.02,0.04")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--steps", type=int, default=None, help="schedule length (default: the quickstart's)")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for lr in args.adamw_lrs.split(","):
            results[("adamw", lr)] = run(
                Path(tmp) / f"adamw-{lr}", [f"optim.lr={lr}"], args.eval_every, args.steps
            )
        for lr in args.muon_lrs.split(","):
            overrides = ["optim.name=muon", f"optim.muon_lr={lr}"]
            results[("muon", lr)] = run(Path(tmp) / f"muon-{lr}", overrides, args.eval_every, args.steps)
    from smoltrain.train.config import load_config

    quickstart_lr = load_config(str(REPO / "configs/quickstart.yaml")).optim.lr
    baseline = next(r for (name, lr), r in results.items() if name == "adamw" and float(lr) == quickstart_lr)
    target = baseline["final"]
    print(f"target: the AdamW quickstart's final eval loss, {target:.3f} (lr {quickstart_lr:g})")
    print("| optimizer | lr | final eval loss | steps to target | seconds to target | s/step |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for (name, lr), result in results.items():
        step, seconds = reached(result, target)
        label = "muon_lr" if name == "muon" else "lr"
        print(
            f"| {name} | {label} {lr} | {result['final']:.3f} | {step if step else 'not reached'} | "
            f"{f'{seconds:.0f}' if seconds else '-'} | {result['seconds_per_step']:.3f} |"
        )


if __name__ == "__main__":
    main()
