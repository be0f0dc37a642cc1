"""`smoltrain eval` beside `lm_eval --model hf`: items/s on the same tasks and model, in one run.

The model is the bundled SmolLM2-135M-Instruct written as a Hugging Face folder, which both
load; the tasks are local copies of arc_easy, hellaswag and piqa (lm-eval's own prompts and
metrics over rows shaped like the hub's, tests/lm_eval_tasks.py), their items numbered so
that no two contexts repeat. Each side's time counts loading the model and building the
tasks (lm-eval's task index is built once beforehand for both). Ours and theirs alternate,
`--repeats` times each; the median counts. The scores are compared too: a faster wrong
answer would not count.

Usage: python -m bench.evals [--copies K] [--batch-size B] [--repeats R] [--dtype float32|bfloat16]"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

TASKS = ["arc_easy_local", "hellaswag_local", "piqa_local"]


def run_ours(folder: Path, tasks_dir: Path, batch_size: int, dtype: torch.dtype) -> tuple[float, dict]:
    from smoltrain.evaluation.benchmarks import SmolLM, evaluate_tasks
    from smoltrain.formats.model_io import load_model
    from smoltrain.generate import prepare_for_generation
    from smoltrain.tokenizer import load_tokenizer

    start = time.perf_counter()  # loading counts: `smoltrain eval` loads the model too
    model = prepare_for_generation(load_model(folder, dtype=dtype))
    lm = SmolLM(model, load_tokenizer(folder), batch_size=batch_size)
    results = evaluate_tasks(lm, TASKS, str(tasks_dir))
    return time.perf_counter() - start, results


def run_theirs(folder: Path, tasks_dir: Path, batch_size: int, dtype: torch.dtype) -> tuple[float, dict]:
    import lm_eval

    from smoltrain.evaluation.benchmarks import task_manager

    start = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={folder},dtype={str(dtype).removeprefix('torch.')}",
        tasks=TASKS,
        task_manager=task_manager(str(tasks_dir)),
        batch_size=batch_size,
        device="cpu",
    )
    return time.perf_counter() - start, results


def main() -> None:
    from smoltrain.evaluation.benchmarks import scores
    from smoltrain.formats.model_io import load_model, save_model
    from smoltrain.tokenizer import load_tokenizer
    from tests.lm_eval_tasks import write_tasks

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--copies", type=int, default=10, help="copies of the 22 local items")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        folder, tasks_dir = Path(tmp) / "smollm2-hf", write_tasks(Path(tmp) / "tasks", copies=args.copies)
        save_model(load_model("smollm2"), folder, load_tokenizer("smollm2"))
        from smoltrain.evaluation.benchmarks import task_manager

        task_manager(str(tasks_dir))  # lm-eval's task index, built once for both sides (~5 s)
        times: dict[str, list[float]] = {"ours": [], "theirs": []}
        results = {}
        for _ in range(args.repeats):
            for name, run in (("ours", run_ours), ("theirs", run_theirs)):
                seconds, results[name] = run(folder, tasks_dir, args.batch_size, dtype)
                times[name].append(seconds)
        items = sum(results["ours"]["n-samples"][t]["effective"] for t in TASKS)
        ours, theirs = (statistics.median(times[k]) for k in ("ours", "theirs"))
        print(
            f"# smoltrain eval vs lm_eval --model hf: {items} items ({', '.join(TASKS)}), "
            f"batch {args.batch_size}, {args.dtype}, CPU ({torch.get_num_threads()} threads)\n"
        )
        print(f"| | seconds (median of {args.repeats}) | items/s |\n| --- | --- | --- |")
        print(f"| smoltrain eval | {ours:.1f} | {items / ours:.1f} |")
        print(f"| lm_eval --model hf | {theirs:.1f} | {items / theirs:.1f} |")
        print(f"\nratio: **{theirs / ours:.2f}x** (goal >= 1.5x)")
        a, b = scores(results["ours"]), scores(results["theirs"])
        print(f"same scores: {a == b}  " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(a.items())))


if __name__ == "__main__":
    main()
