"""What a run reports: `metrics.jsonl` and the trackers, `loss.png`, and the summaries
printed at the start and the end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from smoltrain.atomic import write_atomic


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl, in order."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    """metrics.jsonl (always) plus the Accelerate trackers, main process only. Lines are
    appended as they come (a crash loses at most the line being written)."""

    def __init__(self, path: Path, accelerator) -> None:
        self.accelerator = accelerator
        self.file = open(path, "a", buffering=1) if accelerator.is_main_process else None

    def write(self, step: int, **values: Any) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        numeric = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        if self.accelerator.trackers:
            self.accelerator.log(numeric, step=step)

    def truncate(self, step: int) -> None:
        """Drop the lines past `step` (a rollback redoes those steps), then append again."""
        if self.file is None:
            return
        self.file.close()
        truncate_metrics(Path(self.file.name), step)
        self.file = open(self.file.name, "a", buffering=1)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop log lines past the checkpoint: those steps are about to be redone."""
    if not path.exists():
        return
    keep = [row for row in read_metrics(path) if row["step"] <= step]
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in keep))


def plot_losses(metrics_path: Path, out_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    benchmarks: dict[str, list[tuple[int, float]]] = {}  # "task/metric" -> (tokens, score)
    for r in rows:
        for key, value in r.items():
            if "/" in key and isinstance(value, (int, float)) and "tokens" in r:
                benchmarks.setdefault(key, []).append((r["tokens"], value))
    if benchmarks:  # a second panel: benchmark scores against training tokens
        fig, (ax, scores_ax) = plt.subplots(1, 2, figsize=(12, 4))
        for key, points in sorted(benchmarks.items()):
            scores_ax.plot(*zip(*points, strict=True), "o-", label=key)
        scores_ax.set_xlabel("training tokens")
        scores_ax.set_ylabel("score")
        scores_ax.grid(alpha=0.3)
        scores_ax.legend(fontsize="small")
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_atomic(out_path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)


def plot_branches(run: Path, out_path: Path) -> None:
    """Eval loss (and benchmark scores, when the run logs them) against training tokens of a
    warmup-stable-decay run and of every cooldown branch beside it (RUN-cooldown-*)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [run, *sorted(run.parent.glob(f"{run.name}-cooldown-*"))]
    curves = {}  # (label, "eval_loss" or "task/metric") -> [(tokens, value)]
    for folder in runs:
        if not (folder / "metrics.jsonl").is_file():
            continue
        label = "main run" if folder == run else folder.name.removeprefix(f"{run.name}-")
        for r in read_metrics(folder / "metrics.jsonl"):
            for key, value in r.items():
                if (key == "eval_loss" or "/" in key) and isinstance(value, (int, float)) and "tokens" in r:
                    curves.setdefault((label, key), []).append((r["tokens"], value))
    scores = sorted({key for _, key in curves if key != "eval_loss"})
    fig, axes = plt.subplots(1, 1 + len(scores), figsize=(7 + 5 * len(scores), 4), squeeze=False)
    for ax, key in zip(axes[0], ["eval_loss", *scores], strict=True):
        for (label, k), points in curves.items():
            if k == key:
                ax.plot(*zip(*sorted(points), strict=True), "o-", label=label, markersize=3)
        ax.set_xlabel("training tokens")
        ax.set_ylabel(key.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    write_atomic(out_path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys of plain values, as the trackers want it."""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat


def print_start(lines: dict[str, str]) -> None:
    """The start-up summary: one aligned line per item."""
    print("\n".join(["smoltrain", *(f"  {k:<11} {v}" for k, v in lines.items())]), flush=True)


def print_end(summary: dict[str, Any], out: Path, checkpoints: Path) -> None:
    def fmt(x):
        return "n/a" if x is None else f"{x:.3f}"

    lines = [
        f"done: step {summary['step']} in {summary['seconds']:.0f}s, train loss {fmt(summary['loss'])}, "
        f"eval loss {fmt(summary['eval_loss'])}"
        + (f" (from {fmt(start)} at step 0)" if (start := summary.get("start_eval_loss")) is not None else "")
        + (f", {bpb:.3f} bits/byte" if (bpb := summary.get("eval_bpb")) is not None else "")
        + (f", {summary['skipped_steps']} non-finite steps skipped" if summary["skipped_steps"] else "")
        + (f", {n} fp16 overflows retried at a lower scale" if (n := summary.get("overflow_steps")) else "")
        + (f", {n} loss spikes skipped" if (n := summary.get("spike_steps")) else "")
        + (f", {n} rollback(s) to a checkpoint" if (n := summary.get("rollbacks")) else ""),
        *(
            [f"  benchmarks  {', '.join(f'{k} {v:.3f}' for k, v in found.items())}"]
            if (found := summary.get("benchmarks"))
            else []
        ),
        *(
            [
                f"  data        conversations so far: {counts.get('long', 0)} longer than the context "
                f"(cut or left out, data.long_conversations), {counts.get('no_assistant', 0)} with no "
                "assistant turn (left out)"
            ]
            if (counts := summary.get("conversations")) is not None
            else []
        ),
        f"  metrics     {out / 'metrics.jsonl'}",
        f"  plot        {out / 'loss.png'}",
        f"  checkpoint  {checkpoints / 'latest'}",
    ]
    if "final" in summary:
        lines.append(f"  model       {summary['final']} (transformers loads it)")
    if "adapter" in summary:
        lines.append(f"  adapter     {summary['adapter']} (peft's PeftModel loads it on the base model)")
    if "final_gguf" in summary:
        lines.append(f"  gguf        {summary['final_gguf']} (llama.cpp, Ollama and LM Studio run it)")
    print("\n".join(lines), flush=True)
