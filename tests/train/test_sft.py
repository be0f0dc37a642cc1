"""Instruction tuning through the CLI: a tiny model learns, from chat data, a skill it could
not do before, scored on held-out inputs by lm-eval in the chat template."""

import itertools
import json
import random
import re
from pathlib import Path

import pytest

from tests.train.test_train import REPO, losses, metric_rows, small_run_args, smoltrain

LETTERS = "abcdefgh"


def reverse_task(folder: Path) -> tuple[Path, Path, Path]:
    """Chat rows "reverse: c a f" -> "f a c" over 3 of 8 letters; 48 of the 512 inputs held
    out as an lm-eval generate_until task; a 300-token BPE with ChatML learned on the inputs."""
    from smoltrain.tokenizer import train_tokenizer

    items = [" ".join(p) for p in itertools.product(LETTERS, repeat=3)]
    random.Random(0).shuffle(items)
    held_out, train = items[:48], items[48:]
    rows = folder / "train.jsonl"
    with open(rows, "w") as f:
        for s in train:
            reply = " ".join(reversed(s.split()))
            messages = [{"role": "user", "content": f"reverse: {s}"}, {"role": "assistant", "content": reply}]
            f.write(json.dumps({"messages": messages}) + "\n")
    tasks = folder / "tasks"
    tasks.mkdir()
    with open(tasks / "reverse.jsonl", "w") as f:
        for s in held_out:
            f.write(json.dumps({"input": s, "target": " ".join(reversed(s.split()))}) + "\n")
    (tasks / "reverse.yaml").write_text(
        "task: reverse\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tasks / 'reverse.jsonl'}\ntest_split: test\n"
        'output_type: generate_until\ndoc_to_text: "reverse: {{input}}"\ndoc_to_target: "{{target}}"\n'
        'generation_kwargs:\n  until: ["<|im_end|>"]\n  do_sample: false\n  max_gen_toks: 8\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    tokenizer = folder / "tokenizer"
    train_tokenizer([f"reverse: {s}" for s in items] * 3, 300, chat_template=True).save_pretrained(tokenizer)
    return rows, tasks, tokenizer


@pytest.mark.slow
def test_a_tiny_model_learns_a_skill_from_chat_data(tmp_path):
    rows, tasks, tokenizer = reverse_task(tmp_path)
    out = tmp_path / "run"
    result = smoltrain(
        "--config",
        str(REPO / "configs/quickstart.yaml"),
        "--output-dir",
        str(out),
        "--device",
        "cpu",
        f"data.source={rows}",
        "data.format=chat",
        f"tokenizer={tokenizer}",
        "data.context_length=64",
        "data.shuffle_buffer=64",
        "data.holdout_every=20",
        "model.overrides.num_hidden_layers=2",
        "model.overrides.hidden_size=64",
        "model.overrides.intermediate_size=256",
        "train.micro_batch_size=16",
        "train.precision=fp32",
        "train.spike_factor=0",  # the loss falls in sudden drops as the skill is found
        "schedule.max_steps=240",
        "schedule.warmup_steps=20",
        "optim.lr=3e-3",
        "log.eval_at_start=true",
        "log.eval_every=1000",
        "log.checkpoint_every=1000",
        "log.sample_every=1000",
        "log.sample_prompt='reverse: a b c'",
        "log.sample_temperature=0",
        "log.sample_tokens=8",
        "log.progress_bar=false",
        "benchmarks.tasks=[reverse]",
        f"benchmarks.include_path={tasks}",
        "benchmarks.apply_chat_template=true",
        "benchmarks.every=1000",
        timeout=600,
    )
    scores = {r["step"]: r["reverse/exact_match"] for r in metric_rows(out) if "reverse/exact_match" in r}
    print(f"held-out reverse accuracy: {scores[0]:.3f} before, {scores[240]:.3f} after 240 steps")
    assert scores[0] <= 0.1 and scores[240] >= 0.75, scores
    assert re.search(r"step 0: reverse/exact_match 0\.\d+", result.stdout)  # printed before and after
    assert f"benchmarks  reverse/exact_match {scores[240]:.3f}" in result.stdout
    # the sample is the reply in the chat template, stopped at its end of turn
    sample = next(r["sample"] for r in metric_rows(out) if "sample" in r)
    assert sample == "user: reverse: a b c\nassistant: c b a", sample


def test_a_chat_run_resumes_bitwise(tmp_path):
    """The stream's state carries the packed conversations' loss mask across a checkpoint."""
    rows = tmp_path / "chat.jsonl"
    with open(rows, "w") as f:
        for i in range(60):
            question = f"question {i}" + " more" * (i % 7)
            messages = [
                {"role": "user", "content": question},
                {"role": "assistant", "content": f"answer {i}"},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
        silent = [{"role": "user", "content": "hello?"}]  # (in the training split)
        rambling = [{"role": "user", "content": "talk"}, {"role": "assistant", "content": "la " * 100}]
        for messages in (silent, rambling):
            f.write(json.dumps({"messages": messages}) + "\n")
    args = [f"data.source={rows}", "data.format=chat", "data.context_length=64", "--max-steps", "6"]
    straight = smoltrain(*small_run_args(tmp_path, "straight", *args, "log.log_every=1"))
    # the summary counts them (the stream read the whole file in its first steps)
    assert "conversations so far: 1 longer than the context" in straight.stdout
    assert "1 with no assistant turn (left out)" in straight.stdout
    smoltrain(*small_run_args(tmp_path, "resumed", *args, "log.log_every=1", "--stop-at-step", "3"))
    smoltrain("--phase", "resume", "--checkpoint", str(tmp_path / "resumed/checkpoints/latest"))
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert [straight[s] for s in range(4, 7)] == [resumed[s] for s in range(4, 7)]
