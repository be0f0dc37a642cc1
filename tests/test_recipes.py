"""Recipes: a tokenizer trained on the corpus, the SmolLM2 presets and their configs, and the
demo's two legs (pre-training with that tokenizer, continued pre-training of SmolLM2)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from smoltrain.model.config import get_preset
from smoltrain.tokenizer import SPECIAL_TOKENS, load_tokenizer
from smoltrain.train.config import load_config
from tests.formats.test_gguf import TEXT, llama_cpp
from tests.test_cli_errors import assert_clean_error, command
from tests.train.test_train import REPO, metric_rows, small_run_args, smoltrain, write_corpus


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    corpus = write_corpus(folder / "corpus.jsonl", n=400)
    result = command(
        "tokenizer", "train", str(corpus), str(folder / "tok"), "--vocab-size", "400", "--chat-template"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return folder


def test_a_trained_tokenizer_round_trips_and_is_deterministic(trained):
    again = trained / "again"
    assert (
        command(
            "tokenizer",
            "train",
            str(trained / "corpus.jsonl"),
            str(again),
            "--vocab-size",
            "400",
            "--chat-template",
        ).returncode
        == 0
    )
    assert (trained / "tok/tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()
    tokenizer = load_tokenizer(trained / "tok")
    assert 259 < len(tokenizer) <= 400  # a small corpus runs out of pairs seen twice before 400
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == 0
    ids = tokenizer(TEXT)["input_ids"]
    assert tokenizer.decode(ids) == TEXT  # byte-level: any text, no unknown token
    assert tokenizer.tokenize(" model 2024") == ["Ġmodel", "Ġ", "2", "0", "2", "4"]  # digits one by one
    learned = {t for t in tokenizer.get_vocab() if len(t) > 1 and t not in SPECIAL_TOKENS}
    assert "Ġmodel" in learned  # the corpus's words became tokens
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n"


def test_held_out_documents_do_not_train_the_tokenizer(tmp_path):
    from smoltrain.data.sources import is_eval_document, training_documents

    corpus = write_corpus(tmp_path / "corpus.jsonl", n=300)
    kept = list(training_documents(str(corpus), holdout_every=5))
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    assert kept == [t for t in texts if not is_eval_document(t, 5)] and len(kept) < len(texts)


def test_tokenizer_train_refuses_bad_requests(trained, tmp_path):
    corpus = str(trained / "corpus.jsonl")
    result = command("tokenizer", "train", corpus, str(tmp_path / "t"), "--vocab-size", "100")
    assert_clean_error(result, "--vocab-size 100 leaves no room", "259")
    assert_clean_error(
        command("tokenizer", "train", corpus, str(trained), "--vocab-size", "400"), "not empty", "--overwrite"
    )
    assert_clean_error(
        command(
            "tokenizer", "train", str(tmp_path / "none.jsonl"), str(tmp_path / "t"), "--vocab-size", "400"
        ),
        "matches no file",
    )


def test_a_model_trained_with_it_follows_its_vocabulary_and_exports_to_llama_cpp(trained, tmp_path):
    """tokenizer: OUT_DIR in a config: the model's embedding has the tokenizer's rows (rounded
    up to 64), and the GGUF of the result tokenizes in llama.cpp as our tokenizer does."""
    args = small_run_args(
        tmp_path, "run", "--max-steps", "2", f"tokenizer={trained / 'tok'}", "export.gguf=f32"
    )
    smoltrain(*args)
    config = json.loads((tmp_path / "run/final/config.json").read_text())
    tokenizer = load_tokenizer(trained / "tok")
    assert config["vocab_size"] == -(-len(tokenizer) // 64) * 64 < 49152  # rounded up to a multiple of 64
    result = llama_cpp(tmp_path / "run/final.gguf", TEXT, tmp_path)
    assert result["ids"].tolist() == tokenizer(TEXT)["input_ids"]
    assert str(result["decoded"]) == TEXT


@pytest.mark.parametrize(
    "preset, released",
    [("smollm2-135m", 134_515_008), ("smollm2-360m", 361_821_120), ("smollm2-1.7b", 1_711_376_384)],
)
def test_presets_have_the_released_models_parameter_counts(preset, released):
    """The counts of HuggingFaceTB/SmolLM2-135M, -360M and -1.7B (tied embeddings)."""
    assert get_preset(preset).num_params() == released


def test_every_shipped_config_loads_and_leaves_precision_to_the_machine():
    """No shipped config pins a precision: bf16 pinned for one CPU with bf16 units made the
    quickstart 17x slower on a CPU without them (`auto` measures which is fast)."""
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(str(path))
        assert cfg.model.build_config().num_params() > 0, path
        assert cfg.train.precision == "auto", path
    for size in ("360m", "1.7b"):
        cfg = load_config(str(REPO / f"configs/continue-smollm2-{size}.yaml"))
        assert cfg.model.init_from == f"HuggingFaceTB/SmolLM2-{size.upper()}"
        assert (cfg.optim.lr, cfg.schedule.kind, cfg.schedule.warmup_steps) == (5e-5, "wsd", 1000)
        assert cfg.schedule.max_steps * cfg.schedule.decay_fraction == 10_000  # a 10k-step decay to 0


@pytest.mark.slow
def test_the_demos_configs_run(trained, tmp_path):
    """The quickstart's config with a trained tokenizer and make demo's overrides, and
    the continued pre-training of the bundled SmolLM2 with its eval before the first step, a
    few steps each."""
    makefile = (REPO / "Makefile").read_text()
    demo_line = next(line for line in makefile.splitlines() if "train --config configs/quickstart" in line)
    demo_overrides = [arg for arg in demo_line.split() if "=" in arg and not arg.startswith("-")]
    assert "schedule.max_minutes=2" in demo_overrides  # fitted to the machine
    quick = [
        "--config",
        str(REPO / "configs/quickstart.yaml"),
        *demo_overrides,
        "--output-dir",
        str(tmp_path / "quick"),
        f"tokenizer={trained / 'tok'}",
        "--max-steps",
        "3",
        "log.progress_bar=false",
    ]
    smoltrain(*quick, "log.sample_every=3", "log.sample_quantize=int8")  # samples from int8 weights
    assert (tmp_path / "quick/final/model.safetensors").is_file()
    assert any("sample" in r for r in metric_rows(tmp_path / "quick"))
    # a model trained with the quickstart decodes quantized (int8: its samples above)
    args = ["--model", str(tmp_path / "quick/final"), "--prompt", "The list", "--max-new-tokens", "8"]
    decoded = subprocess.run(
        [sys.executable, "-m", "smoltrain", "generate", *args, "--quantize", "int4"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert decoded.returncode == 0 and decoded.stdout.startswith("The list"), decoded.stderr[-2000:]
    cont = [
        "--config",
        str(REPO / "configs/continue-smollm2.yaml"),
        "--output-dir",
        str(tmp_path / "cont"),
        "--max-steps",
        "2",
        "log.eval_every=2",
        "log.eval_batches=2",
        "log.progress_bar=false",
    ]
    result = smoltrain(*cont)
    evals = [r for r in metric_rows(tmp_path / "cont") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert f"(from {evals[0]['eval_loss']:.3f} at step 0)" in result.stdout
    sft = ["--config", str(REPO / "configs/sft-python-docs.yaml"), "--output-dir", str(tmp_path / "sft")]
    result = smoltrain(*sft, *cont[4:], "log.sample_every=2", "log.sample_tokens=4")
    rows = metric_rows(tmp_path / "sft")
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]  # the replies' loss, before and after
    assert len(evals) == 2 and f"(from {evals[0]:.3f} at step 0)" in result.stdout
    sample = next(r["sample"] for r in rows if "sample" in r)
    assert sample.startswith("user: What does `json.dumps()` do?\nassistant: ")  # a reply in the template


def test_make_demo_trains_the_tokenizer_first():
    """make demo's first leg needs the tokenizer its config names: the Makefile makes it."""
    makefile = (REPO / "Makefile").read_text()
    quickstart = load_config(str(REPO / "configs/quickstart.yaml"))
    demo = makefile[makefile.index("demo:") :]
    assert f"tokenizer train builtin:python-docs {quickstart.tokenizer}" in demo
    dry = subprocess.run(["make", "-n", "demo"], cwd=REPO, capture_output=True, text=True)
    assert dry.returncode == 0 and "continue-smollm2.yaml" in dry.stdout, dry.stderr


def test_a_cooldown_branch_leaves_its_run_untouched_and_resumes_exactly(tmp_path):
    from tests.test_cli_errors import folder_bytes

    wsd = ["schedule.kind=wsd", "schedule.warmup_steps=2", "--max-steps", "12", "log.checkpoint_every=6"]
    smoltrain(*small_run_args(tmp_path, "run", *wsd, "log.eval_every=3", "log.log_every=1"))
    before = folder_bytes(tmp_path / "run")
    step6 = str(tmp_path / "run/checkpoints/step-6")
    smoltrain("--phase", "cooldown", "--checkpoint", step6, "--steps", "4", "log.log_every=1")
    branch = tmp_path / "run-cooldown-step6-4"
    assert folder_bytes(tmp_path / "run") == before  # the source run, byte for byte
    rows = metric_rows(branch)
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert [r["step"] for r in rows if "lr" in r] == [7, 8, 9, 10] and lrs == sorted(lrs, reverse=True)
    assert lrs[-1] == 0.0 and any(r["step"] == 10 and "eval_loss" in r for r in rows)
    assert (branch / "branches.png").is_file() and (branch / "final/model.safetensors").is_file()
    # the branch resumes as itself: stopped after one step, resumed, the same losses
    other = str(tmp_path / "again")
    smoltrain(
        "--phase",
        "cooldown",
        "--checkpoint",
        step6,
        "--steps",
        "4",
        "log.log_every=1",
        "--output-dir",
        other,
        "--stop-at-step",
        "7",
    )
    smoltrain("--phase", "resume", "--checkpoint", other)
    from tests.train.test_train import losses

    assert losses(tmp_path / "again") == losses(branch)
    result = smoltrain("--phase", "cooldown", "--checkpoint", step6, "--steps", "4", check=False)
    assert_clean_error(result, "already holds a run", "--overwrite")
    cosine = small_run_args(tmp_path, "cosine", "--max-steps", "2")
    smoltrain(*cosine)
    result = smoltrain(
        "--phase", "cooldown", "--checkpoint", str(tmp_path / "cosine"), "--steps", "2", check=False
    )
    assert_clean_error(result, "schedule.kind: wsd")
