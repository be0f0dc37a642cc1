"""`smoltrain prepare` and training from its shards."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from smoltrain.data.config import DataConfig
from smoltrain.data.loader import build_loader
from smoltrain.data.shard_set import ShardSet
from smoltrain.data.shards import MANIFEST, PrepareJob, prepare
from tests.data.test_data import make_docs, write_jsonl
from tests.train.test_train import losses, small_run_args, smoltrain


def prepare_cli(*args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "smoltrain", "prepare", *args, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def shard_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of a prepared folder but the timings in the manifest."""
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != MANIFEST}
    manifest = json.loads((folder / MANIFEST).read_text())
    del manifest["prepare_seconds"], manifest["tokens_per_second"]
    return {**files, MANIFEST: json.dumps(manifest).encode()}


@pytest.fixture(scope="module")
def docs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("docs") / "docs.jsonl", make_docs(400))


def test_one_and_two_workers_write_the_same_bytes(tmp_path, docs_file, smollm2_tokenizer):
    one = prepare_cli(str(docs_file), str(tmp_path / "one"), "--shard-documents", "70", "--eval-every", "10")
    prepare_cli(
        str(docs_file),
        str(tmp_path / "two"),
        "--shard-documents",
        "70",
        "--eval-every",
        "10",
        "--workers",
        "2",
    )
    assert "tokens/s" in one.stdout
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")
    manifest = json.loads((tmp_path / "one" / MANIFEST).read_text())
    assert len(manifest["shards"]) == 6 and manifest["dtype"] == "uint16"  # 49,152 ids fit
    assert manifest["documents"] + manifest["eval_documents"] == 400 and manifest["eval_documents"] > 10
    # the tokens are the documents' own, EOS after each, offsets at the document starts
    texts = [json.loads(line)["text"] for line in docs_file.read_text().splitlines()]
    from smoltrain.data.sources import is_eval_document

    train = [t for t in texts[:70] if not is_eval_document(t, 10)]
    tokens = np.load(tmp_path / "one" / "shard-00000.train.npy")
    offsets = np.load(tmp_path / "one" / "shard-00000.train.docs.npy")
    ids = smollm2_tokenizer(train[1], add_special_tokens=False)["input_ids"]
    assert tokens[offsets[1] : offsets[2]].tolist() == [*ids, smollm2_tokenizer.eos_token_id]
    assert len(offsets) == len(train) + 1 and offsets[-1] == len(tokens)


def test_a_killed_prepare_resumes_to_the_same_bytes(tmp_path, docs_file):
    args = ["--shard-documents", "1", "--holdout-every", "20"]  # 400 shards: a few seconds to write
    prepare_in_process(str(docs_file), str(tmp_path / "whole"), *args)
    cmd = [sys.executable, "-m", "smoltrain", "prepare", str(docs_file), str(tmp_path / "killed"), *args]
    proc = subprocess.Popen([*cmd, "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list((tmp_path / "killed").glob("shard-*.json"))) < 30 and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((tmp_path / "killed").glob("shard-*.json")))
    assert 30 <= done < 400 and not (tmp_path / "killed" / MANIFEST).exists()  # killed mid-way
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # with the bar
    assert resumed.returncode == 0 and f"resuming: {done} shard(s)" in resumed.stdout
    assert shard_bytes(tmp_path / "killed") == shard_bytes(tmp_path / "whole")


def prepare_in_process(*args: str) -> None:
    from smoltrain.cli import main

    main(["prepare", *args, "--no-progress"])


def prepare_error(*args: str) -> str:
    """The message `smoltrain prepare` exits with (its CLI, run in this process)."""
    with pytest.raises(SystemExit) as exit_info:
        prepare_in_process(*args)
    message = str(exit_info.value)
    assert message.startswith("error: ") and "Traceback" not in message
    return message


def test_prepare_errors_name_the_problem(tmp_path, docs_file):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert "cannot write to" in prepare_error(str(docs_file), str(blocker / "out"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    message = prepare_error(str(docs_file), str(other))
    assert "is not empty" in message and "--overwrite" in message
    assert (other / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "empty" in prepare_error(str(empty), str(tmp_path / "e"))
    assert not (tmp_path / "e").exists()  # a bad source fails before OUT_DIR is made
    done = tmp_path / "done"
    prepare_in_process(str(docs_file), str(done))
    assert "already holds a prepared dataset" in prepare_error(str(docs_file), str(done))
    prepare_in_process(str(docs_file), str(done), "--overwrite", "--eval-every", "0")
    assert json.loads((done / MANIFEST).read_text())["eval_documents"] == 0
    # an interrupted prepare resumes only with the same settings
    (done / MANIFEST).unlink()
    message = prepare_error(str(docs_file), str(done), "--eval-every", "50")
    assert "interrupted prepare with other settings" in message and "eval_every=0" in message
    assert "--workers must be at least 1" in prepare_error(
        str(docs_file), str(tmp_path / "w"), "--workers", "0"
    )
    # the CLI as a user runs it: exit status 1, the message alone
    bad = prepare_cli(str(docs_file), str(other), check=False)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_prepare_streams_a_hub_dataset(tmp_path, monkeypatch, smollm2_tokenizer):
    """The hub path (hf:NAME:CONFIG, streamed) on a local parquet file shaped like cosmopedia-v2."""
    import pandas as pd

    from smoltrain.data import sources as data_mod

    texts = make_docs(50)
    parquet = tmp_path / "train-00000-of-00001.parquet"
    pd.DataFrame(
        {"prompt": ["Write a textbook"] * 50, "text": texts, "audience": ["college"] * 50}
    ).to_parquet(parquet)
    calls, real = [], data_mod.load_dataset

    def hub_standin(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return real("parquet", data_files=[str(parquet)], **kwargs)

    monkeypatch.setattr(data_mod, "load_dataset", hub_standin)
    job = PrepareJob("hf:HuggingFaceTB/smollm-corpus:cosmopedia-v2", str(tmp_path / "out"), eval_every=0)
    manifest = prepare(job, progress=False)
    assert calls[0] == ("HuggingFaceTB/smollm-corpus", "cosmopedia-v2", {"split": "train", "streaming": True})
    assert manifest["documents"] == 50 and manifest["source"] == job.source
    tokens = np.load(tmp_path / "out" / "shard-00000.train.npy")
    eos = smollm2_tokenizer.eos_token_id
    expected = [
        t for text in texts for t in [*smollm2_tokenizer(text, add_special_tokens=False)["input_ids"], eos]
    ]
    assert tokens.tolist() == expected


def test_shards_without_a_held_out_split_need_an_eval_source(tmp_path, docs_file):
    prepare_cli(str(docs_file), str(tmp_path / "shards"), "--eval-every", "0")
    args = small_run_args(tmp_path, "run", f"data.source={tmp_path / 'shards'}", "--max-steps", "2")
    run = smoltrain(*args, check=False)
    assert (
        run.returncode == 1 and "holds no held-out documents" in run.stderr and "Traceback" not in run.stderr
    )
    smoltrain(*args, f"data.eval_source={docs_file}")  # the fix the message names


def test_a_second_prepare_and_training_on_an_unfinished_one_are_refused(tmp_path, docs_file):
    from smoltrain.atomic import FolderLock

    out = tmp_path / "shards"
    out.mkdir()
    lock = FolderLock(out)  # a prepare at work in it
    message = prepare_error(str(docs_file), str(out))
    assert "is in use by PID" in message and "another OUT_DIR" in message
    lock.release()
    prepare_in_process(str(docs_file), str(out))
    (out / MANIFEST).unlink()  # as a kill before the manifest leaves it
    run = smoltrain(*small_run_args(tmp_path, "run", f"data.source={out}"), check=False)
    assert run.returncode == 1 and "has not finished" in run.stderr and "Traceback" not in run.stderr


def test_training_refuses_shards_of_another_tokenizer(tmp_path, docs_file, smollm2_tokenizer):
    other = tmp_path / "other-tokenizer"
    smollm2_tokenizer.save_pretrained(other)
    tokenizer_json = json.loads((other / "tokenizer.json").read_text())
    tokenizer_json["added_tokens"][-1]["content"] = "<renamed>"  # same size, another tokenizer
    (other / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    prepare_cli(str(docs_file), str(tmp_path / "shards"), "--tokenizer", str(other))
    run = smoltrain(*small_run_args(tmp_path, "run", f"data.source={tmp_path / 'shards'}"), check=False)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "was prepared with tokenizer" in run.stderr and f"set tokenizer: {other}" in run.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def blocks_of(folder, context_length, split="train"):
    blocks = ShardSet(folder, split, context_length)
    return blocks, [tuple(blocks.block(b)["tokens"].tolist()) for b in range(blocks.num_blocks)]


@pytest.mark.parametrize("shard_documents", [33, 1])  # 1: blocks span many shards, some empty
def test_shards_serve_the_blocks_the_stream_packs(tmp_path, docs_file, smollm2_tokenizer, shard_documents):
    """In stream order (shuffle_buffer=0) the shard loader's batches are the on-the-fly
    pipeline's, document ids and positions included: the same data, tokenized once."""
    job = PrepareJob(str(docs_file), str(tmp_path / "shards"), eval_every=10, shard_documents=shard_documents)
    prepare(job, progress=False)
    for split in ("train", "eval"):
        stream = DataConfig(source=str(docs_file), context_length=48, shuffle_buffer=0, holdout_every=10)
        stream.document_mask = True
        shards = DataConfig(
            source=str(tmp_path / "shards"), context_length=48, shuffle_buffer=0, document_mask=True
        )
        a = build_loader(stream, smollm2_tokenizer, 4, split)
        b = build_loader(shards, smollm2_tokenizer, 4, split)
        n = 0
        for x, y in zip(a, b, strict=split == "eval"):
            assert x.keys() == y.keys() == {"input_ids", "labels", "position_ids", "document_ids"}
            for key in x:
                assert torch.equal(x[key], y[key]), (split, n, key)
            n += 1
            if n == 60:  # train is endless: 60 batches cross several shards and an epoch
                break
        assert n > 3


def test_an_epoch_sees_every_block_once_and_ranks_never_overlap(tmp_path, docs_file, smollm2_tokenizer):
    prepare(PrepareJob(str(docs_file), str(tmp_path / "shards"), shard_documents=50), progress=False)
    cfg = DataConfig(source=str(tmp_path / "shards"), context_length=32, seed=3)
    shards, all_blocks = blocks_of(tmp_path / "shards", 32)
    n = shards.num_blocks
    B, W = 4, 2
    per_rank = n // (B * W)  # whole groups of W micro-batches within the epoch
    seen = {}
    for rank in range(W):
        loader = iter(build_loader(cfg, smollm2_tokenizer, B, "train", rank, W))
        seen[rank] = [tuple(row.tolist()) for _ in range(per_rank) for row in next(loader)["input_ids"]]
    assert not set(seen[0]) & set(seen[1])
    everything = seen[0] + seen[1]
    assert len(set(everything)) == len(everything) == per_rank * B * W
    assert set(everything) <= set(all_blocks)
    one = iter(build_loader(cfg, smollm2_tokenizer, n, "train"))
    epoch0, epoch1 = next(one)["input_ids"], next(one)["input_ids"]
    assert sorted(tuple(r.tolist()) for r in epoch0) == sorted(all_blocks)  # each block once
    assert sorted(tuple(r.tolist()) for r in epoch1) == sorted(all_blocks)
    assert not torch.equal(epoch0, epoch1)  # a new permutation each epoch


def shard_run_args(tmp_path, out, *extra):
    if not (tmp_path / "shards" / MANIFEST).exists():
        docs = write_jsonl(tmp_path / "docs.jsonl", make_docs(300))
        prepare(
            PrepareJob(str(docs), str(tmp_path / "shards"), eval_every=10, shard_documents=64), progress=False
        )
    return small_run_args(tmp_path, out, f"data.source={tmp_path / 'shards'}", "log.log_every=1", *extra)


def test_stop_and_resume_from_shards_is_bitwise(tmp_path):
    smoltrain(*shard_run_args(tmp_path, "straight", "--max-steps", "8"))
    smoltrain(*shard_run_args(tmp_path, "resumed", "--max-steps", "8", "--stop-at-step", "3"))
    data_state = torch.load(tmp_path / "resumed/checkpoints/step-3/data.pt", weights_only=False)
    assert data_state["samples"] == 3 * 2 * 2  # the position is a sample count
    smoltrain("--phase", "resume", "--checkpoint", str(tmp_path / "resumed"))
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert list(resumed) == list(range(1, 9))
    assert all(straight[s] == resumed[s] for s in range(1, 9)), (straight, resumed)


def test_the_tokenizer_identity_ignores_padding_settings():
    """tokenizer(texts, padding=True) writes its padding into the tokenizer's definition: the
    same tokenizer then hashed differently, and prepared data was refused (by test order)."""
    from smoltrain.data.shards import tokenizer_identity
    from smoltrain.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    before = tokenizer_identity(tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer(["a", "bb cc"], padding=True, truncation=True, max_length=4)
    assert tokenizer_identity(tokenizer) == before
