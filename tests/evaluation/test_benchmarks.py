"""Benchmark scores through lm-eval: agreement with `lm_eval --model hf`, the CLI, the loop."""

import json
import math
import os
import subprocess
import sys

import pytest

from smoltrain.evaluation.benchmarks import (
    PRESETS,
    SmolLM,
    evaluate_tasks,
    expand_tasks,
    scores,
    task_manager,
)
from tests.lm_eval_tasks import IFEVAL, write_ifeval, write_tasks
from tests.train.test_train import losses, metric_rows, small_run_args, smoltrain

MULTIPLE_CHOICE = ["arc_easy_local", "hellaswag_local", "piqa_local"]


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, smollm2_tokenizer):
    """The bundled SmolLM2-135M-Instruct as a Hugging Face folder, which both sides load."""
    from smoltrain.formats.model_io import load_model, save_model

    folder = tmp_path_factory.mktemp("smollm2-hf")
    save_model(load_model("smollm2"), folder, smollm2_tokenizer)
    return folder


def eval_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smoltrain", "eval", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def test_scores_equal_lm_eval_hf_item_by_item(hf_folder, tasks_dir):
    import lm_eval

    from smoltrain.formats.model_io import load_model
    from smoltrain.generate import prepare_for_generation
    from smoltrain.tokenizer import load_tokenizer

    names = [*MULTIPLE_CHOICE, "rolling_local", "qa_local"]
    model = prepare_for_generation(load_model(hf_folder))
    ours = evaluate_tasks(
        SmolLM(model, load_tokenizer(hf_folder), batch_size=8), names, str(tasks_dir), log_samples=True
    )
    theirs = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={hf_folder},dtype=float32",
        tasks=names,
        task_manager=task_manager(str(tasks_dir)),
        log_samples=True,
        batch_size=8,
        device="cpu",
    )
    worst = 0.0
    for task in names:
        a, b = ours["samples"][task], theirs["samples"][task]
        assert [s["doc_id"] for s in a] == [s["doc_id"] for s in b] and len(a) > 1
        for x, y in zip(a, b, strict=True):
            for rx, ry in zip(x["resps"], y["resps"], strict=True):
                if task == "qa_local":
                    assert rx == ry  # the same greedy text
                elif task == "rolling_local":
                    worst = max(worst, abs(rx[0] - ry[0]))
                else:
                    assert rx[0][1] == ry[0][1]  # is_greedy
                    worst = max(worst, abs(rx[0][0] - ry[0][0]))
        for metric in ("acc,none", "acc_norm,none"):
            if metric in theirs["results"][task]:
                assert ours["results"][task][metric] == theirs["results"][task][metric], (task, metric)
    assert worst < 1e-4, worst
    assert ours["results"]["rolling_local"]["bits_per_byte,none"] == pytest.approx(
        theirs["results"]["rolling_local"]["bits_per_byte,none"], abs=1e-5
    )


def test_eval_cli_prints_a_table_and_writes_lm_eval_results(hf_folder, tasks_dir, tmp_path):
    out = tmp_path / "results.json"
    run = eval_cli(
        "--model", str(hf_folder), "--tasks", "arc_easy_local,piqa_local", "--include-path", str(tasks_dir),
        "--limit", "4", "--batch-size", "4", "--output", str(out), "--quantize", "int8",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "arc_easy_local" in run.stdout and "acc_norm" in run.stdout  # lm-eval's table
    results = json.loads(out.read_text())
    for task in ("arc_easy_local", "piqa_local"):
        row = results["results"][task]
        assert 0 <= row["acc,none"] <= 1 and 0 <= row["acc_norm,none"] <= 1 and "acc_norm_stderr,none" in row
        assert results["n-samples"][task]["effective"] == 4
    flat = scores(results)
    assert set(flat) == {f"{t}/{m}" for t in ("arc_easy_local", "piqa_local") for m in ("acc", "acc_norm")}


def test_the_smollm2_preset_names_lm_evals_tasks():
    manager = task_manager()
    tasks = expand_tasks(["smollm2"], manager)
    assert tasks == list(PRESETS["smollm2"]) and all(t in manager.all_tasks for t in tasks)
    assert {"hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "openbookqa"} <= set(tasks)


def eval_error(*args: str) -> str:
    """The message `smoltrain eval` exits with (its CLI, run in this process)."""
    from smoltrain.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *args])
    message = str(exit_info.value)
    assert message.startswith("error: ") and "Traceback" not in message
    return message


def test_eval_errors_name_the_problem(tmp_path, tasks_dir):
    assert "unknown task 'hellaswg'; did you mean hellaswag" in eval_error("--tasks", "hellaswg")
    not_model = tmp_path / "notes"
    not_model.mkdir()
    message = eval_error(
        "--model", str(not_model), "--tasks", "arc_easy_local", "--include-path", str(tasks_dir)
    )
    assert "folder without config.json" in message
    message = eval_error("--tasks", "arc_easy_local", "--include-path", str(tmp_path / "missing"))
    assert "is not a folder of lm-eval task YAMLs" in message
    # the hub out of reach (the offline switches are read at import: a process of its own)
    offline = eval_cli(
        "--tasks", "arc_easy", "--limit", "2", env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    )
    assert (
        offline.returncode == 1 and offline.stderr.startswith("error: ") and "Traceback" not in offline.stderr
    )
    assert "allenai/ai2_arc" in offline.stderr and "--include-path" in offline.stderr


def test_ifeval_offline_from_an_include_path_in_the_chat_template(hf_folder, tmp_path):
    """IFEval as chat models are scored: lm-eval's checkers on a local copy of its rows, each
    prompt rendered in the model's template after a system message, replies ended at the
    template's end of turn; nltk's punkt_tab from NLTK_DATA, nothing downloaded."""
    tasks = write_ifeval(tmp_path / "tasks")
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = tmp_path / "ifeval.json"
    run = eval_cli(
        "--model", str(hf_folder), "--tasks", "ifeval_local", "--include-path", str(tasks),
        "--apply-chat-template", "--system-instruction", "Answer briefly.", "--log-samples",
        "--output", str(out), env={**offline, "NLTK_DATA": str(tasks / "nltk_data")},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    row = results["results"]["ifeval_local"]
    for level in ("prompt", "inst"):
        strict, loose = row[f"{level}_level_strict_acc,none"], row[f"{level}_level_loose_acc,none"]
        assert 0 <= strict <= loose <= 1
    samples = results["samples"]["ifeval_local"]
    assert len(samples) == len(IFEVAL) and all(len(s["metrics"]) == 4 for s in samples)
    for sample in samples:
        (prompt, _), reply = sample["arguments"][0], sample["resps"][0][0]
        assert prompt.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n")
        assert prompt.endswith("<|im_start|>assistant\n") and "<|im_end|>" not in reply
        if "commas" in prompt:  # the checker saw our reply
            assert sample["prompt_level_strict_acc"] == ("," not in reply)
    # without punkt_tab (and offline, so not fetched): named before the model loads
    missing = eval_cli(
        "--model", str(hf_folder), "--tasks", "ifeval_local", "--include-path", str(tasks),
        env={**offline, "NLTK_DATA": str(tmp_path / "empty")},
    )  # fmt: skip
    assert missing.returncode == 1 and missing.stderr.startswith("error: ")
    assert "Traceback" not in missing.stderr
    assert "punkt_tab" in missing.stderr and "NLTK_DATA" in missing.stderr


def benchmark_args(tmp_path, out, tasks_dir, *extra):
    return small_run_args(
        tmp_path, out, "--max-steps", "6", "log.log_every=1", "log.eval_every=3",
        "benchmarks.tasks=[arc_easy_local,piqa_local]", "benchmarks.every=3", "benchmarks.limit=4",
        f"benchmarks.include_path={tasks_dir}", *extra,
    )  # fmt: skip


def test_training_logs_benchmarks_and_bits_per_byte_and_trains_as_without(
    tmp_path, tasks_dir, smollm2_tokenizer
):
    run = smoltrain(*benchmark_args(tmp_path, "with", tasks_dir))
    assert "step 3: arc_easy_local/acc" in run.stdout and "step 6: arc_easy_local/acc" in run.stdout
    assert "  benchmarks  arc_easy_local/acc " in run.stdout  # in the end summary too
    rows = metric_rows(tmp_path / "with")
    bench = [r for r in rows if "arc_easy_local/acc_norm" in r]
    assert [r["step"] for r in bench] == [3, 6] and all(
        "piqa_local/acc" in r and r["tokens"] > 0 for r in bench
    )
    # the loop's scores are those `smoltrain eval` gives for the checkpoint at that step
    direct = eval_cli(
        "--model", str(tmp_path / "with/final"), "--tasks", "arc_easy_local,piqa_local",
        "--include-path", str(tasks_dir), "--limit", "4", "--output", str(tmp_path / "final.json"),
    )  # fmt: skip
    assert direct.returncode == 0, direct.stderr[-2000:]
    final = scores(json.loads((tmp_path / "final.json").read_text()))
    assert all(bench[-1][k] == pytest.approx(v, abs=1e-9) for k, v in final.items())
    # benchmarks leave training alone: the same losses as a run without them
    smoltrain(*benchmark_args(tmp_path, "without", tasks_dir, "benchmarks.tasks=[]"))
    assert losses(tmp_path / "with") == losses(tmp_path / "without")
    # bits per byte: the eval loss over the UTF-8 bytes of the predicted tokens
    evals = [r for r in rows if "eval_bpb" in r]
    assert [r["step"] for r in evals] == [3, 6]
    from smoltrain.data.config import DataConfig
    from smoltrain.data.loader import build_loader

    cfg = DataConfig(
        source=str(tmp_path / "corpus.jsonl"), context_length=32, holdout_every=10, shuffle_buffer=0
    )
    tokens = n_bytes = 0
    for batch, _ in zip(build_loader(cfg, smollm2_tokenizer, 2, "eval"), range(2), strict=False):
        for row in batch["labels"][:, 1:]:
            kept = row[row != -100].tolist()
            tokens += len(kept)
            n_bytes += len(smollm2_tokenizer.decode(kept).encode("utf-8"))
    for r in evals:
        assert r["eval_bpb"] == pytest.approx(r["eval_loss"] * tokens / math.log(2) / n_bytes, rel=1e-5)
    assert (tmp_path / "with/loss.png").stat().st_size > (tmp_path / "without/loss.png").stat().st_size


def test_a_typo_in_eval_tasks_stops_the_run_before_training(tmp_path, tasks_dir):
    run = smoltrain(
        *benchmark_args(tmp_path, "typo", tasks_dir, "benchmarks.tasks=[arc_easy_locl]"), check=False
    )
    assert run.returncode == 1 and "did you mean arc_easy_local" in run.stderr
    assert not (tmp_path / "typo" / "metrics.jsonl").exists() or not metric_rows(tmp_path / "typo")
    missing = f"benchmarks.include_path={tmp_path / 'no-such-folder'}"
    run = smoltrain(*benchmark_args(tmp_path, "typo", tasks_dir, missing, "--overwrite"), check=False)
    assert run.returncode == 1 and "is not a folder of lm-eval task YAMLs" in run.stderr


def test_loglikelihood_scores_on_the_device_and_copies_two_numbers_a_request(micro_model, smollm2_tokenizer):
    """Log-probs and greedy flags are gathered where the logits are; the host reads them once
    a batch (`tolist`), not a scalar per request nor the (B, keep, vocab) fp32 tensor (on a
    GPU each `.item()` is a sync, the tensor a copy of megabytes)."""
    import random

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountScalarReads(TorchDispatchMode):
        reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                CountScalarReads.reads += 1
            return func(*args, **(kwargs or {}))

    rng = random.Random(0)
    requests = [
        (("ctx", "cont"), [rng.randrange(256) for _ in range(rng.randint(3, 12))], [rng.randrange(256)] * k)
        for k in (1, 1, 2, 3, 1, 4)
    ]
    lm = SmolLM(micro_model, smollm2_tokenizer, batch_size=4)
    want = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    with CountScalarReads():
        got = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    assert CountScalarReads.reads == 0
    assert got == want and len(got) == len(requests)
    for (_, ctx, cont), (logprob, greedy) in zip(requests, got, strict=True):
        logits = micro_model(torch.tensor([ctx + cont])).logits[0, len(ctx) - 1 : -1]
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(cont)[:, None]).sum()
        assert abs(logprob - float(expected)) < 1e-4 and greedy == bool(
            (logits.argmax(-1) == torch.tensor(cont)).all()
        )
