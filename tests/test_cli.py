import subprocess
import sys

import pytest
import torch

from smoltrain.cli import main
from smoltrain.formats.model_io import save_model
from smoltrain.generate import generate
from tests.conftest import micro_config


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smoltrain", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "flags", [[], ["--compile"], ["--quantize", "int8"], ["--quantize", "int4", "--compile"]]
)
def test_generate_cli_streams_the_greedy_continuation(flags, tmp_path, smollm2_tokenizer):
    from smoltrain.generate import prepare_for_generation
    from smoltrain.model import CustomLLM
    from smoltrain.model.config import get_preset

    torch.manual_seed(0)
    model = CustomLLM(get_preset("tiny", num_hidden_layers=2)).eval()
    save_model(model, tmp_path, tokenizer=smollm2_tokenizer)
    args = ["--model", str(tmp_path), "--prompt", "Hello world", "--max-new-tokens", "8", *flags]
    result = run_cli("generate", *args)
    assert result.returncode == 0, result.stderr
    if "--quantize" in flags:  # the quantized model's own greedy tokens
        model = prepare_for_generation(model, quantize=flags[flags.index("--quantize") + 1])
    ids = smollm2_tokenizer("Hello world", return_tensors="pt")["input_ids"]
    expected = smollm2_tokenizer.decode(
        generate(model, ids, max_new_tokens=8)[0, ids.shape[1] :], skip_special_tokens=True
    )
    assert result.stdout.rstrip("\n") == "Hello world" + expected.rstrip("\n")


def test_generate_cli_chat_with_bundled_model():
    result = run_cli("generate", "--chat", "--prompt", "What is 2+2?", "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) > 5


def test_cli_errors_are_messages_not_tracebacks(tmp_path):
    result = run_cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "x")
    assert result.returncode != 0
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
    torch.manual_seed(0)
    from smoltrain.model import CustomLLM

    save_model(CustomLLM(micro_config()), tmp_path / "m")
    result = run_cli(
        "generate",
        "--model",
        str(tmp_path / "m"),
        "--prompt",
        "x",
        "--chat",
        "--tokenizer",
        "smollm2",
    )
    assert result.returncode != 0
    assert "tokenizer has 49,152 tokens but the model's vocabulary is 256" in result.stderr


def test_main_rejects_unknown_device(capsys):
    import pytest

    with pytest.raises(SystemExit, match="unknown device"):
        main(["generate", "--prompt", "x", "--device", "tpu"])


def test_a_finished_rank_of_a_multi_process_run_exits_without_teardown():
    """A rank whose command finished leaves with os._exit (gloo's threads could abort the
    interpreter's teardown), after its output is flushed; a single process exits as usual."""
    script = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('teardown ran'))\n"
        "sys.argv = ['smoltrain', 'env', '--json']\n"
        "from smoltrain.cli import main\n"
        "main()\n"
    )
    import json
    import os

    for world_size, teardown in (("2", False), ("1", True)):
        env = {**os.environ, "WORLD_SIZE": world_size}
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert ("teardown ran" in result.stdout) == teardown
        json.loads(result.stdout.replace("teardown ran", ""))  # the whole report arrived


def test_only_a_command_line_that_finished_skips_the_teardowns_collections(tmp_path):
    """A command line that finished freezes the garbage collector, so that the interpreter's
    teardown does not walk every object torch made; one that failed (what it left open is
    collected and flushed as usual) and `main` called from Python (a long-lived process) do not."""
    import gc

    from tests.train.test_train import write_corpus

    script = (
        "import atexit, gc\n"
        "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0))\n"
        "from smoltrain.cli import main\n"
        "main()\n"
    )
    corpus = write_corpus(tmp_path / "corpus.jsonl", 50)
    for source, finished in ((corpus, True), (tmp_path / "missing.jsonl", False)):
        args = ["tokenizer", "train", str(source), str(tmp_path / f"tok-{finished}"), "--vocab-size", "300"]
        command = [sys.executable, "-c", script, *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert (result.returncode == 0) == finished, result.stderr[-2000:]
        assert f"frozen at exit: {finished}" in result.stdout
    main(["tokenizer", "train", str(corpus), str(tmp_path / "tok-in-process"), "--vocab-size", "300"])
    assert gc.get_freeze_count() == 0


def test_the_parser_is_built_before_torch_is_imported():
    """`train` on CPU re-executes itself before any work (glibc reads its allocator settings at
    start-up): the command line must be parsed without importing torch, or torch is imported twice
    (a second more for every such command)."""
    from smoltrain.cli_args import QUANTIZE_CHOICES
    from smoltrain.model.kernels.quantized import QUANTIZE_KINDS
    from smoltrain.train.config import CHOICES

    # written out in the parser's module, as in the config's checks
    assert QUANTIZE_CHOICES == QUANTIZE_KINDS == CHOICES["log.sample_quantize"][1:]
    script = (
        "import sys\n"
        "from smoltrain.cli import build_parser  # the module the command line starts in\n"
        "build_parser().parse_known_args(['train', '--config', 'x.yaml', 'train.precision=fp32'])\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "torch imported: False", result.stderr[-2000:]
