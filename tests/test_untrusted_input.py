"""A checkpoint is data, not code, and every input is checked before it can hurt: through
the CLI, as a user (or someone handing them a file) would meet it. Each case: exit code,
the message's key words, no traceback, and the files already written left byte-identical."""

import shutil

import pytest
import torch

from tests.test_cli_errors import assert_clean_error, folder_bytes
from tests.train.test_train import small_run_args, smoltrain


class RunsCode:
    """Unpickling this runs a shell command: what a crafted checkpoint file would hold."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A finished 2-step run with a checkpoint, and one of a wider model."""
    root = tmp_path_factory.mktemp("runs")
    smoltrain(*small_run_args(root, "small", "--max-steps", "2", "log.checkpoint_every=2"))
    wider = ["model.overrides.hidden_size=96", "model.overrides.intermediate_size=192"]
    smoltrain(*small_run_args(root, "wide", "--max-steps", "2", "log.checkpoint_every=2", *wider))
    return root


def copy_run(two_runs, tmp_path, name: str = "small"):
    run = tmp_path / name
    shutil.copytree(two_runs / name, run)
    return run, run / "checkpoints/step-2"


def resume(run):
    return smoltrain("--phase", "resume", "--checkpoint", str(run), check=False)


@pytest.mark.parametrize("name", ["optimizer.pt", "rng-rank0.pt", "data.pt"])
def test_a_checkpoint_file_that_would_run_code_is_refused(two_runs, tmp_path, name):
    """torch.load(weights_only=False) ran a crafted rng-rank0.pt's command on resume (exit 0)."""
    run, step = copy_run(two_runs, tmp_path)
    marker = tmp_path / "ran"
    torch.save({"state": RunsCode(marker)}, step / name)
    before = folder_bytes(run)
    assert_clean_error(resume(run), name, "runs no code stored in one")
    assert not marker.exists()
    assert folder_bytes(run) == before


def test_an_optimizer_state_of_another_model_is_refused(two_runs, tmp_path):
    """From a smaller model the process died (segmentation fault); from a larger one it
    trained on and saved misshapen optimizer state into the next checkpoint."""
    run, step = copy_run(two_runs, tmp_path)
    wide_run, wide_step = copy_run(two_runs, tmp_path, "wide")
    shutil.copy(wide_step / "optimizer.pt", step / "optimizer.pt")
    shutil.copy(two_runs / "small/checkpoints/step-2/optimizer.pt", wide_step / "optimizer.pt")
    for folder in (run, wide_run):
        before = folder_bytes(folder)
        assert_clean_error(resume(folder), "step-2/optimizer.pt does not fit this model", "exp_avg")
        assert folder_bytes(folder) == before


def test_weights_of_another_shape_are_named_not_a_size_mismatch_traceback(two_runs, tmp_path):
    run, step = copy_run(two_runs, tmp_path)
    shutil.copy(two_runs / "wide/checkpoints/step-2/model.safetensors", step / "model.safetensors")
    before = folder_bytes(run)
    assert_clean_error(resume(run), "model.safetensors does not fit this model", "96)", "64)")
    assert folder_bytes(run) == before


def test_a_checkpoint_written_before_resumes(two_runs, tmp_path):
    """Checkpoints written before 2026-12 hold numpy's RNG state as an array: still data."""
    import numpy as np

    run, step = copy_run(two_runs, tmp_path)
    rng = torch.load(step / "rng-rank0.pt", weights_only=True)
    name, keys, *rest = rng["numpy"]
    rng["numpy"] = (name, np.asarray(keys, dtype=np.uint32), *rest)
    torch.save(rng, step / "rng-rank0.pt")
    resumed = smoltrain(
        "--phase", "resume", "--checkpoint", str(run), "--max-steps", "3", "--allow-config-changes"
    )
    assert "done: step 3" in resumed.stdout


FULL_DISK = """
import shutil, sys
from collections import namedtuple
import numpy as np
from safetensors import SafetensorError
from smoltrain.formats import model_io
from smoltrain.train import checkpoint
from smoltrain.cli import main

def disk_full(*args, **kwargs):
    shutil.disk_usage = lambda path: namedtuple("usage", "total used free")(10**9, 10**9, 0)
    raise {error}

{target} = disk_full
main(sys.argv[1:])
"""
# how safetensors words ENOSPC
SAFETENSORS_FULL = 'SafetensorError("Error while serializing: No space left on device (os error 28)")'


def run_with_a_full_disk(tmp_path, target: str, error: str, *args: str):
    """The CLI with `target` raising `error` as on a full disk, which reports 0 bytes free."""
    import subprocess
    import sys

    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK.format(target=target, error=error))
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)


def staging_files(folder) -> list[str]:
    return [str(p) for p in folder.rglob("*") if ".tmp" in p.name]


def test_a_full_disk_at_the_first_checkpoint_names_it_and_leaves_no_partial_folder(tmp_path):
    """safetensors' SafetensorError was a traceback, and checkpoints/.step-1.tmp stayed."""
    args = small_run_args(tmp_path, "run", "--max-steps", "2", "log.checkpoint_every=1")
    result = run_with_a_full_disk(tmp_path, "checkpoint.save_file", SAFETENSORS_FULL, "train", *args)
    assert_clean_error(result, "could not write checkpoint step-1: no space left on the device", "MB free")
    assert not staging_files(tmp_path / "run")


def test_a_full_disk_while_exporting_final_keeps_the_checkpoint_and_leaves_no_half_folder(tmp_path):
    """final/ was written in place: a kill or a full disk left it with config.json alone."""
    args = small_run_args(tmp_path, "run", "--max-steps", "2", "log.checkpoint_every=2")
    result = run_with_a_full_disk(tmp_path, "model_io.save_file", SAFETENSORS_FULL, "train", *args)
    assert_clean_error(result, "could not write final: no space left on the device", "nothing was written")
    assert not (tmp_path / "run/final").exists() and not staging_files(tmp_path / "run")
    assert (tmp_path / "run/checkpoints/step-2/COMPLETE").is_file()


def test_a_full_disk_while_preparing_shards_leaves_no_staging_file(tmp_path):
    from tests.data.test_data import make_docs, write_jsonl

    docs = write_jsonl(tmp_path / "docs.jsonl", make_docs(20))
    out = tmp_path / "shards"
    error = "OSError(28, 'No space left on device')"
    result = run_with_a_full_disk(tmp_path, "np.save", error, "prepare", str(docs), str(out), "--no-progress")
    assert_clean_error(result, "could not write shard-00000", "no space left on the device", "MB free")
    assert not staging_files(out)


@pytest.mark.parametrize(
    "damage, words",
    [
        ("manifest", ["shard-00000.train.npy holds", "manifest.json says", "edited or damaged"]),
        ("halved", ["shard-00001.train.npy is cut short", "bytes where its header promises"]),
        ("emptied", ["shard-00001.train.docs.npy is not a readable .npy file"]),
    ],
)
def test_a_damaged_prepared_folder_is_named_at_start_up(tmp_path, damage, words):
    """A manifest claiming 10x the tokens trained on masked rows (grad norm 0.0), exit 0; a
    shard cut in half failed later ("mmap length is greater than file size"); an emptied one
    gave an EOFError traceback."""
    import json

    from tests.data.test_data import make_docs, write_jsonl
    from tests.data.test_shards import prepare_in_process

    docs = write_jsonl(tmp_path / "docs.jsonl", make_docs(200))
    shards = tmp_path / "shards"
    prepare_in_process(str(docs), str(shards), "--shard-documents", "100", "--eval-every", "10")
    if damage == "manifest":
        manifest = json.loads((shards / "manifest.json").read_text())
        manifest["shards"][0]["tokens"] *= 10
        (shards / "manifest.json").write_text(json.dumps(manifest))
    elif damage == "halved":
        shard = shards / "shard-00001.train.npy"
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:
        (shards / "shard-00001.train.docs.npy").write_bytes(b"")
    result = smoltrain(*small_run_args(tmp_path, "run", f"data.source={shards}"), check=False)
    assert_clean_error(result, *words, "smoltrain prepare")
    assert not (tmp_path / "run/metrics.jsonl").exists()


def test_a_source_of_empty_documents_is_refused_and_empties_are_counted(tmp_path):
    """50 x {"text": ""} with a separate eval source trained on end-of-text tokens, exit 0."""
    import json

    from tests.data.test_data import make_docs, write_jsonl

    empty = tmp_path / "empty.jsonl"
    empty.write_text("".join(json.dumps({"text": ""}) + "\n" for _ in range(50)))
    docs = write_jsonl(tmp_path / "docs.jsonl", make_docs(40))
    args = small_run_args(tmp_path, "run", f"data.source={empty}", f"data.eval_source={docs}")
    assert_clean_error(smoltrain(*args, check=False), "yielded no train documents", "50 empty documents")
    from tests.data.test_shards import prepare_cli

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(empty.read_text() + docs.read_text())
    prepared = prepare_cli(str(mixed), str(tmp_path / "shards"))
    assert "left out 50 empty documents" in prepared.stdout
    manifest = json.loads((tmp_path / "shards/manifest.json").read_text())
    assert manifest["documents"] + manifest["eval_documents"] == 40 and manifest["empty_documents"] == 50
    refused = prepare_cli(str(empty), str(tmp_path / "none"), check=False)
    assert_clean_error(refused, "holds no documents (50 empty documents")


@pytest.mark.parametrize("command", ["train", "prepare"])
def test_a_document_that_is_not_text_names_the_column(tmp_path, command):
    """A number in the text column was an "'int' object has no attribute 'encode'" traceback."""
    import json

    from tests.data.test_shards import prepare_cli

    source = tmp_path / "numbers.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a document", 17, "another"]))
    if command == "train":
        result = smoltrain(*small_run_args(tmp_path, "run", f"data.source={source}"), check=False)
    else:
        result = prepare_cli(str(source), str(tmp_path / "shards"), check=False)
    assert_clean_error(result, "has a int value", "text column 'text'", "data.text_column")


def test_a_huge_text_file_is_read_in_bounded_pieces(tmp_path):
    """A 2 GB .txt was read as one document (8 GB+ before the kill). Now 1 MiB at a time,
    a document longer than TXT_PIECE cut at line ends: here a 64 MB file in under 25 MB."""
    import io
    import tracemalloc

    from smoltrain.data import sources as data

    line = "the quick brown fox jumps over the lazy dog, " * 3 + "\n"
    big = tmp_path / "big.txt"
    big.write_text(line * (64_000_000 // len(line)))
    tracemalloc.start()
    lengths = []
    for document in data._read_txt([str(big)], per_paragraph=False):
        lengths.append(len(document["text"]))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(lengths) == -(-big.stat().st_size // data.TXT_PIECE) and max(lengths) <= data.TXT_PIECE
    assert sum(lengths) >= big.stat().st_size - len(lengths)  # only the newlines at the cuts go
    assert peak < 6 * data.TXT_PIECE, peak  # a few pieces' worth, not the file
    # paragraphs come out as the whole text split at blank lines did, across 1 MiB reads
    text = "".join(f"para {i}\n" + "x" * (i * 997 % 5000) + "\n" * (2 + i % 3) for i in range(800))
    pieces = list(data._txt_documents(io.BytesIO(text.encode()), per_paragraph=True))
    assert pieces == text.split("\n\n")


def test_prepare_caps_its_workers_at_the_cores(tmp_path):
    """--workers 64 started 64 tokenizer processes (9 GB+, nothing written in 120 s)."""
    import os

    from tests.data.test_data import make_docs, write_jsonl
    from tests.data.test_shards import prepare_cli

    docs = write_jsonl(tmp_path / "docs.jsonl", make_docs(20))
    result = prepare_cli(str(docs), str(tmp_path / "shards"), "--workers", "64")
    assert f"--workers 64 capped at this machine's {len(os.sched_getaffinity(0))} cores" in result.stderr


def test_a_micro_batch_that_cannot_fit_is_refused_before_allocating(tmp_path):
    """train.micro_batch_size=1000000000 allocated until the kernel killed the process."""
    args = small_run_args(tmp_path, "run", "train.micro_batch_size=1000000000")
    result = smoltrain(*args, check=False, timeout=120)
    assert_clean_error(result, "train.micro_batch_size=1000000000", "GB", "train.grad_accum_steps")
    assert not (tmp_path / "run/metrics.jsonl").exists()


@pytest.mark.parametrize("kind", ["prepare", "convert", "tokenizer"])
def test_overwrite_never_deletes_files_smoltrain_did_not_write(tmp_path, kind):
    """--overwrite deleted whatever the folder held, the user's own files included."""
    from tests.data.test_data import make_docs, write_jsonl
    from tests.test_cli_errors import command

    docs = write_jsonl(tmp_path / "docs.jsonl", make_docs(20))
    out = tmp_path / "out"
    out.mkdir()
    ours = "manifest.json" if kind == "prepare" else "config.json"
    (out / ours).write_text("{}")  # one of ours beside it
    (out / "notes.txt").write_text("my notes")
    before = folder_bytes(out)
    args = {
        "prepare": ["prepare", str(docs), str(out), "--no-progress"],
        "convert": ["convert", "smollm2", str(out)],
        "tokenizer": ["tokenizer", "train", str(docs), str(out), "--vocab-size", "300"],
    }[kind]
    assert_clean_error(command(*args, "--overwrite"), "holds files smoltrain did not write (notes.txt)")
    assert folder_bytes(out) == before


QUICKSTART = "configs/quickstart.yaml"


@pytest.mark.parametrize(
    "case, words",
    [
        ("not_llama", ["model_type 'gpt2' is not supported", "Llama"]),
        ("yaml_tag", ["override 'optim.lr=!!python/object:os.system x'", "give a plain value"]),
        ("binary_jsonl", ["is not JSON Lines", "its files: binary.jsonl"]),
        ("truncated_gguf", ["cut.gguf' is not a whole GGUF file", "export or download it again"]),
        ("output_is_a_file", ["'afile' is a file", "--output-dir"]),
        ("config_is_a_folder", ["is a folder; pass a YAML file"]),
        ("key_of_another_section", ["Did you mean 'optim.lr'?"]),
        ("kernels_on", ["train.kernels 'on' is unknown"]),
        ("tokenizer_not_made", ["'runs/nothere' is not a folder here", "make demo"]),
    ],
)
def test_poor_messages_name_the_problem_and_the_fix(tmp_path, monkeypatch, case, words):
    """Each was a traceback (KeyError, ConstructorError, IndexError) or a message that named
    neither the file nor the fix ("Invalid value. in row 0", "[Errno 17] File exists")."""
    from smoltrain.formats.model_io import bundled_gguf_path
    from tests.test_cli_errors import command
    from tests.train.test_train import REPO

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as offline as CI, wherever it runs
    train = ["train", "--config", str(REPO / QUICKSTART), "tokenizer=smollm2", "--max-steps", "1"]
    if case == "not_llama":
        (tmp_path / "gpt2").mkdir()
        (tmp_path / "gpt2/config.json").write_text('{"model_type": "gpt2", "n_embd": 64}')
        args = ["generate", "--model", "gpt2", "--prompt", "hi"]
    elif case == "yaml_tag":
        args = [*train, "optim.lr=!!python/object:os.system x"]
    elif case == "binary_jsonl":
        (tmp_path / "binary.jsonl").write_bytes(bytes(range(256)) * 2)
        args = [*train, "data.source=binary.jsonl"]
    elif case == "truncated_gguf":
        (tmp_path / "cut.gguf").write_bytes(bundled_gguf_path().read_bytes()[:1000])
        args = ["generate", "--model", "cut.gguf", "--prompt", "hi"]
    elif case == "output_is_a_file":
        (tmp_path / "afile").write_text("")
        args = [*train, "--output-dir", "afile"]
    elif case == "config_is_a_folder":
        args = ["train", "--config", str(tmp_path)]
    elif case == "key_of_another_section":
        args = [*train, "train.lr=1e-3"]
    elif case == "kernels_on":
        args = [*train, "train.kernels=on"]
    else:
        args = [*train[:-3], "tokenizer=runs/nothere", "--max-steps", "1"]
    assert_clean_error(command(*args), *words)


def test_convert_takes_the_common_spellings_of_a_dtype():
    """`--dtype fp16` was refused while bf16 and fp32 passed."""
    import torch

    from smoltrain.cli import _dtype

    spellings = {"fp16": torch.float16, "f16": torch.float16, "half": torch.float16, "f32": torch.float32}
    assert {name: _dtype(name, "cpu") for name in spellings} == spellings


def test_silent_surprises_are_said(two_runs, tmp_path):
    """A resumed finished run trained 50 steps at lr 0.0, a stage past max_steps never ran,
    --max-new-tokens past the context stopped early: each without a word."""
    from tests.test_cli_errors import command

    run, _ = copy_run(two_runs, tmp_path)
    resumed = smoltrain("--phase", "resume", "--checkpoint", str(run), "resume.extra_steps=2")
    assert "finished its schedule at step 2" in resumed.stderr and "weights do not change" in resumed.stderr
    source = f"mixture: [{{source: {tmp_path / 'corpus.jsonl'}}}]"
    stages = f"data.stages=[{{until_step: 5, {source}}}, {{{source}}}]"
    staged = smoltrain(
        *small_run_args(tmp_path, "staged", "--max-steps", "2", stages, "log.progress_bar=true")
    )
    assert "data.stages[1] starts after step 5, at or past schedule.max_steps 2: it never" in staged.stderr
    assert "step/s" not in staged.stderr  # a pipe gets no progress bar
    long = command("generate", "--model", str(run / "final"), "--prompt", "Hi", "--max-new-tokens", "100000")
    assert long.returncode == 0, long.stderr[-500:]
    assert "--max-new-tokens 100,000 runs past the model's context" in long.stderr
    too_long = command("generate", "--model", str(run / "final"), "--prompt", "word " * 5000)
    assert_clean_error(too_long, "tokens but the model's context is", "shorten the prompt")
    assert too_long.stdout == ""  # refused before the 25 kB prompt was echoed


def test_a_mixture_weight_that_is_not_finite_is_refused(tmp_path):
    """A weight of inf failed deep inside with "cannot convert float NaN to integer"."""
    corpus = tmp_path / "corpus.jsonl"
    args = small_run_args(tmp_path, "run", f"data.mixture=[{{source: {corpus}, weight: .inf}}]")
    assert_clean_error(smoltrain(*args, check=False), "must be a finite number above 0, got inf")


def test_latest_pointing_at_a_deleted_step_names_the_newest_intact_one(two_runs, tmp_path):
    run, step = copy_run(two_runs, tmp_path)
    (run / "checkpoints/latest").write_text("step-9\n")  # its folder deleted by hand
    assert_clean_error(resume(run), "points at step-9, which no longer exists", f"--checkpoint {step}")


def test_weight_files_are_as_readable_as_the_others(two_runs):
    """model.safetensors was 0600 (safetensors' own mode) beside 0644 files."""
    for folder in (two_runs / "small/final", two_runs / "small/checkpoints/step-2"):
        modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir() if p.is_file()}
        assert modes["model.safetensors"] == modes["config.json"], modes


def test_a_tokenizer_asked_for_more_than_its_corpus_holds_says_what_it_got(tmp_path):
    """10,000,000 tokens asked of one short document: 276 given, without a word."""
    import json

    from tests.test_cli_errors import command

    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": "a single short document"}) + "\n")
    result = command(
        "tokenizer", "train", str(one), str(tmp_path / "tok"), "--vocab-size", "10000000", "--eval-every", "0"
    )
    assert result.returncode == 0, result.stderr[-1000:]
    assert "note: asked for 10,000,000 tokens, the corpus gave" in result.stderr


def test_serve_on_a_busy_port_says_so_before_loading_the_model(tmp_path):
    """gradio's error came after 15 s of loading, with advice for its Python API."""
    import socket

    from tests.test_cli_errors import command

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        # a model that is not there: the port is checked first, or this would be the error
        result = command("serve", "--port", str(port), "--model", str(tmp_path / "no-model"))
    assert_clean_error(result, f"port {port} on 127.0.0.1 is not free", "--port")


def test_an_unwritable_cache_folder_is_named_at_once(tmp_path):
    """It was named nowhere, 20-40 s into a run, when the first measurement was stored."""
    import os
    import subprocess
    import sys

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {**os.environ, "SMOLTRAIN_CACHE": str(blocker / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "smoltrain", "env"], capture_output=True, text=True, env=env, timeout=120
    )
    assert_clean_error(result, f"the cache folder {blocker / 'cache'} ($SMOLTRAIN_CACHE) is not writable")


def test_data_errors_come_before_the_model_is_loaded(tmp_path):
    """A missing data file was said after SmolLM2 had loaded (8-10 s)."""
    from tests.train.test_train import REPO

    config = str(REPO / "configs/continue-smollm2.yaml")
    args = ["--config", config, "--output-dir", str(tmp_path / "run"), f"data.source={tmp_path}/nope.jsonl"]
    result = smoltrain(*args, "model.init_from=" + str(tmp_path / "no-model"), check=False)
    assert_clean_error(result, "nope.jsonl")  # not the missing model: data came first
