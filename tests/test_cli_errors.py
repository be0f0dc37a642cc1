"""Bad input through the CLI, as a user hits it: a one-paragraph error naming the key and the
fix, no traceback, exit code non-zero, and nothing written before is touched."""

import json

import pytest

from tests.train.test_train import metric_rows, small_run_args, smoltrain


def folder_bytes(folder) -> dict[str, bytes]:
    """Every file's bytes, but the lock's (it names whichever run last held the folder)."""
    files = (p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock")
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


def assert_clean_error(result, *words: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: "), message
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["schedule.kind=cosin"], ["schedule.kind 'cosin' is unknown", "cosine"]),
        (["train.grad_accum_steps=0"], ["train.grad_accum_steps must be at least 1"]),
        (["--max-steps", "0"], ["schedule.max_steps must be at least 1"]),
        (["optim.lr=0"], ["optim.lr must be above 0"]),
        (["optim.lr=abc"], ["optim.lr", "'abc'", "Float"]),
        (["log.eval_every=0"], ["log.eval_every must be at least 1"]),
        (["train.precision=fp8"], ["train.precision 'fp8' is unknown"]),
        (["optim.beta2=1.5"], ["optim.beta2 must be in [0, 1]"]),
        (["log.sample_quantize=int3"], ["log.sample_quantize 'int3' is unknown", "int4"]),
    ],
)
def test_nonsense_config_values_are_refused_at_load(tmp_path, overrides, words):
    """They trained (loss 0.0 at grad_accum_steps=0, random weights exported at 0 steps) or
    failed late (a misspelled schedule.kind at the end of warmup)."""
    result = smoltrain(*small_run_args(tmp_path, "run", *overrides), check=False)
    assert_clean_error(result, "bad config", *words)
    assert not (tmp_path / "run").exists()  # refused before any folder was made


def test_a_yaml_syntax_error_names_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  micro_batch_size: 4\n   grad_accum_steps: [\n")
    args = small_run_args(tmp_path, "run")
    args[1] = str(bad)
    assert_clean_error(smoltrain(*args, check=False), str(bad), "line 3, column", "YAML syntax")


def test_warmup_past_the_schedule_is_warned_about(tmp_path):
    result = smoltrain(*small_run_args(tmp_path, "run", "--max-steps", "2", "schedule.warmup_steps=5"))
    assert "warning: schedule.warmup_steps 5 >= schedule.max_steps 2" in result.stderr


def test_overwrite_with_a_typo_keeps_the_finished_run(tmp_path):
    """--overwrite deleted the old run before checking the new data source."""
    smoltrain(*small_run_args(tmp_path, "run", "--max-steps", "2"))
    before = folder_bytes(tmp_path / "run")
    assert "final/model.safetensors" in before
    typo = smoltrain(
        *small_run_args(tmp_path, "run", "--max-steps", "2", f"data.source={tmp_path}/nope.jsonl"),
        "--overwrite",
        check=False,
    )
    assert_clean_error(typo, "nope.jsonl")
    assert folder_bytes(tmp_path / "run") == before
    smoltrain(*small_run_args(tmp_path, "run", "--max-steps", "3"), "--overwrite")  # a real one replaces it
    steps = [r["step"] for r in metric_rows(tmp_path / "run") if "loss" in r]
    assert steps[-1] == 3 and steps == sorted(set(steps))  # the old run's rows are gone


def test_a_failed_start_leaves_no_run_that_blocks_the_rerun(tmp_path):
    """A start that failed before its first step left an empty metrics.jsonl, and the rerun
    was refused ("already holds a run")."""
    failed = smoltrain(*small_run_args(tmp_path, "run", "data.context_length=100000"), check=False)
    assert_clean_error(failed, "context")
    assert not (tmp_path / "run").exists()  # nor a lock file in a folder made for nothing
    rerun = smoltrain(*small_run_args(tmp_path, "run", "--max-steps", "2"))
    assert "done: step 2" in rerun.stdout


def test_debug_shows_the_traceback(tmp_path):
    result = smoltrain(*small_run_args(tmp_path, "run", "schedule.kind=cosin"), "--debug", check=False)
    assert result.returncode != 0 and "Traceback" in result.stderr and "schedule.kind" in result.stderr


def command(*args: str):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "smoltrain", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "args, words",
    [
        (["--prompt", ""], ["--prompt is empty"]),
        (["--prompt", "hi", "--max-new-tokens", "0"], ["--max-new-tokens must be at least 1"]),
        (["--prompt", "hi", "--do-sample", "--temperature", "0"], ["leave out --do-sample"]),
    ],
)
def test_generate_refuses_what_means_nothing(args, words):
    """An empty prompt was a traceback, 0 new tokens exited 0 with nothing, and the greedy
    advice named a flag the CLI does not have."""
    assert_clean_error(command("generate", "--model", "smollm2", *args), *words)


def test_quantize_names_a_width_int4_cannot_take(tmp_path):
    """A model whose hidden size is no multiple of 32 was a reshape's traceback under int4."""
    from smoltrain.formats.model_io import save_model
    from smoltrain.model import CustomLLM
    from tests.conftest import micro_config

    odd = CustomLLM(micro_config(hidden_size=48, num_attention_heads=3, num_key_value_heads=1))
    save_model(odd, tmp_path / "odd")
    result = command("generate", "--model", str(tmp_path / "odd"), "--prompt", "hi", "--quantize", "int4")
    assert_clean_error(result, "cannot quantize this model", "multiples of 32; this model has 48")


def test_generate_says_greedy_ignores_sampling_settings():
    result = command("generate", "--prompt", "Hi", "--max-new-tokens", "2", "--temperature", "0.5")
    assert result.returncode == 0
    assert "warning: --temperature only act with --do-sample; decoding greedily" in result.stderr


def test_convert_refuses_a_file_and_a_full_folder_without_overwrite(tmp_path):
    """Onto a file it was a traceback; into a full folder it mixed old and new files."""
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    assert_clean_error(command("convert", "smollm2", str(file)), "is a file")
    assert file.read_text() == "mine"
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    assert_clean_error(command("convert", "smollm2", str(folder)), "not empty", "--overwrite")
    assert folder_bytes(folder) == {"keep.txt": b"mine"}
    # --overwrite replaces a model folder, never the user's own files in it
    assert_clean_error(command("convert", "smollm2", str(folder), "--overwrite"), "keep.txt")
    (folder / "keep.txt").rename(tmp_path / "keep.txt")
    (folder / "config.json").write_text("{}")  # an older conversion's
    assert command("convert", "smollm2", str(folder), "--overwrite").returncode == 0
    assert (folder / "model.safetensors").is_file() and json.loads((folder / "config.json").read_text())


def test_a_second_run_into_a_busy_folder_is_refused_and_a_killed_one_frees_it(tmp_path):
    """Two trainings into one folder both ran, interleaving metrics.jsonl and overwriting each
    other's checkpoints; the lock is the OS's, so a SIGKILLed holder leaves nothing stuck."""
    import signal
    import subprocess
    import sys
    import time

    args = small_run_args(tmp_path, "run", "--max-steps", "100000", "log.log_every=1")
    first = subprocess.Popen(
        [sys.executable, "-m", "smoltrain", "train", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    metrics = tmp_path / "run/metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and '"loss"' in metrics.read_text()) and time.time() < deadline:
        time.sleep(0.5)
    second = smoltrain(*small_run_args(tmp_path, "run", "--max-steps", "2"), "--overwrite", check=False)
    assert first.poll() is None  # the first run was left alone
    assert_clean_error(second, "is in use by PID", str(first.pid), "another --output-dir")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    third = smoltrain(*small_run_args(tmp_path, "run", "--max-steps", "2"), "--overwrite")
    assert "done: step 2" in third.stdout


def test_resuming_from_a_truncated_checkpoint_names_the_file_and_the_older_one(tmp_path):
    smoltrain(*small_run_args(tmp_path, "run", "--max-steps", "4", "log.checkpoint_every=2"))
    weights = tmp_path / "run/checkpoints/step-4/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    before = folder_bytes(tmp_path / "run")
    result = smoltrain("--phase", "resume", "--checkpoint", str(tmp_path / "run"), check=False)
    assert_clean_error(result, "step-4: model.safetensors is unreadable", "--checkpoint", "step-2")
    assert folder_bytes(tmp_path / "run") == before


def test_data_too_small_fails_at_start_up(tmp_path):
    """An empty eval split was found at the first evaluation (now before the first step); a
    corpus smaller than one block trained on (72 s for the first step, re-reading it over and
    over), now refused at start-up too, after one pass over it."""
    import json

    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("hello world", "short")))
    # 1 in 10^6 held out of 200 documents: none
    args = small_run_args(tmp_path, "run", "data.holdout_every=1000000")
    assert_clean_error(smoltrain(*args, check=False), "yielded no eval documents")
    args = small_run_args(tmp_path, "run", f"data.source={tiny}", f"data.eval_source={tiny}")
    assert_clean_error(smoltrain(*args, check=False), "fewer than one block of data.context_length=32")
    assert not (tmp_path / "run/metrics.jsonl").exists()  # refused before the run began


def test_resume_with_a_changed_batch_is_refused_unless_allowed(tmp_path):
    """Resuming with --config silently replaced the run's batch, schedule and precision."""
    smoltrain(*small_run_args(tmp_path, "run", "--max-steps", "2"))
    before = folder_bytes(tmp_path / "run")
    resume = ["--phase", "resume", "--checkpoint", str(tmp_path / "run")]
    changed = smoltrain(*resume, "train.micro_batch_size=4", "optim.lr=1e-3", "log.log_every=1", check=False)
    assert_clean_error(changed, "train.micro_batch_size: 2 -> 4", "optim.lr", "--allow-config-changes")
    assert "log.log_every" not in changed.stderr  # how a run is watched may change
    assert folder_bytes(tmp_path / "run") == before
    allowed = smoltrain(*resume, "train.micro_batch_size=4", "--allow-config-changes")
    assert "done: step" in allowed.stdout


FULL_DISK = """
import shutil, sys
from collections import namedtuple
import torch
from smoltrain.cli import main
real_save, saves = torch.save, []
def save(obj, f, *args, **kwargs):
    if "step-4" in str(f):  # the second checkpoint: the disk is full
        shutil.disk_usage = lambda path: namedtuple("usage", "total used free")(10**9, 10**9, 0)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
    return real_save(obj, f, *args, **kwargs)
torch.save = save
main(["train", *sys.argv[1:]])
"""


def test_a_full_disk_says_so_and_keeps_the_last_checkpoint(tmp_path):
    """torch.save's message for a full disk never says "disk", and the partial folder stayed,
    keeping the disk full."""
    import subprocess
    import sys

    script = tmp_path / "full.py"
    script.write_text(FULL_DISK)
    args = small_run_args(tmp_path, "run", "--max-steps", "6", "log.checkpoint_every=2")
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert_clean_error(result, "could not write checkpoint step-4: no space left on the device", "step-2")
    checkpoints = tmp_path / "run/checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-2"]  # no partial folder
    assert (checkpoints / "latest").read_text().strip() == "step-2"
    resumed = smoltrain("--phase", "resume", "--checkpoint", str(tmp_path / "run"))
    assert "done: step 6" in resumed.stdout


POISON = """
import os, sys
from smoltrain import model as model_module
POISON, WINDOW = float(os.environ["POISON"]), int(os.environ["WINDOW"])
from smoltrain.cli import main
real_forward, calls = model_module.CustomLLM.forward, []
def forward(self, *args, **kwargs):
    out = real_forward(self, *args, **kwargs)
    if self.training:
        calls.append(1)
        if 2 * 25 < len(calls) <= 2 * (25 + WINDOW) and out.loss is not None:  # 2 micro-batches a step
            out.loss = out.loss * POISON  # a poisoned window of the data
    return out
model_module.CustomLLM.forward = forward
main(["train", *sys.argv[1:]])
"""


@pytest.mark.slow
def test_the_spike_guard_skips_a_poisoned_window_and_rolls_back(tmp_path):
    """Four poisoned steps (loss x1e15, unclipped): unguarded, Adam's second moment takes the
    blow and the run is still behind 90 steps later; guarded, the spikes are skipped, the
    third rolls the run back to its step-20 checkpoint, the data moves past the poison (the
    fourth poisoned step, met again, is skipped too) and the run tracks the clean one."""
    import os
    import subprocess
    import sys

    from tests.train.test_train import losses, small_vocabulary

    script = tmp_path / "poison.py"
    script.write_text(POISON)
    common = ["--max-steps", "120", "log.log_every=1", "log.checkpoint_every=20", "optim.grad_clip=0"]
    common.append(small_vocabulary())

    def run(name, *extra, poison="1e15", window="4", check=True):
        cmd = [sys.executable, str(script), *small_run_args(tmp_path, name, *common, *extra)]
        env = {**os.environ, "POISON": poison, "WINDOW": window}
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0 or not check, result.stderr[-3000:]
        return result, losses(tmp_path / name)

    smoltrain(*small_run_args(tmp_path, "clean", *common, "train.spike_factor=0"))
    clean = losses(tmp_path / "clean")
    _, unguarded = run("unguarded", "train.spike_factor=0")  # the quickstart's guard off
    guarded_run, guarded = run("guarded", "train.spike_factor=3", "train.spike_window=10")
    assert "rolled back to step 20" in guarded_run.stderr and "loss spikes skipped" in guarded_run.stdout
    events = [r for r in metric_rows(tmp_path / "guarded") if r.get("event") == "rolled_back"]
    assert events and events[0]["spike_steps"] == [26, 27, 28]
    tail = {
        name: sum(curve[s] for s in range(101, 121)) / 20
        for name, curve in (("clean", clean), ("unguarded", unguarded), ("guarded", guarded))
    }
    assert tail["unguarded"] > tail["guarded"] + 0.1, tail  # 90 steps later, still behind
    assert abs(tail["guarded"] - tail["clean"]) < 0.1, tail
    # a window of 6 NaN losses: the unguarded run stops at max_bad_steps (5); the guard rolls
    # back (twice: the window is met again after the first) and the run reaches its end
    died, _ = run("nan-unguarded", "train.spike_factor=0", poison="nan", window="6", check=False)
    assert_clean_error(died, "5 non-finite steps in a row")
    lived, _ = run("nan-guarded", "train.spike_factor=3", "train.spike_window=10", poison="nan", window="6")
    assert "rolled back to step 20" in lived.stderr and "done: step 120" in lived.stdout


def test_chat_data_that_cannot_be_trained_on_is_named(tmp_path, smollm2_tokenizer):
    """data.format=chat on rows with no conversation, and on a role the chat template refuses."""
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"text": "a document, not a chat"}) + "\n")
    result = smoltrain(
        *small_run_args(tmp_path, "plain", f"data.source={plain}", "data.format=chat"), check=False
    )
    assert_clean_error(result, f"data source '{plain}' has no 'messages' column", "its columns are ['text']")
    assert "set data.format=text" in result.stderr

    strict = tmp_path / "strict-tokenizer"
    smollm2_tokenizer.save_pretrained(strict)
    config = json.loads((strict / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('Unknown role ' + m['role']) }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    (strict / "tokenizer_config.json").write_text(json.dumps(config))
    (strict / "chat_template.jinja").unlink(missing_ok=True)  # transformers 5 keeps it apart
    tools = tmp_path / "tools.jsonl"
    row = {"messages": [{"role": "tool", "content": "42"}, {"role": "assistant", "content": "it is 42"}]}
    tools.write_text((json.dumps(row) + "\n") * 20)
    args = small_run_args(
        tmp_path, "tools", f"data.source={tools}", "data.format=chat", f"tokenizer={strict}"
    )
    result = smoltrain(*args, check=False)
    assert_clean_error(
        result,
        f"data source '{tools}'",
        "refuses a conversation with the roles ['tool', 'assistant']",
        "Unknown role tool",
    )
