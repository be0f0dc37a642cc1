"""Pre-tokenized shards: `smoltrain prepare SOURCE OUT_DIR` writes them, `data.source=OUT_DIR`
trains from them.

Layout of OUT_DIR (numpy `.npy` files, memory-mapped when read: no extra dependency, any
tool reads them, and a block is one slice of a page-cached file):

    shard-00000.train.npy       token ids, EOS after every document (uint16 when the
    shard-00000.train.docs.npy  vocabulary fits, else uint32); document start offsets + end
    shard-00000.eval.npy        the held-out documents of the same chunk, likewise
    shard-00000.eval.docs.npy
    shard-00000.*.mask.npy      chat data (--format chat): 1 where a token is the assistant's
                                (trained on), per token; conversations carry no EOS
    shard-00000.json            the shard's counts, written after its arrays: "this one is done"
    prepare.json                what is being prepared (source, tokenizer, split): resume key
    manifest.json               written last and atomically: the dataset is complete

Shard i holds source documents [i * shard_documents, (i + 1) * shard_documents), whatever
the number of workers, so 1 and N workers write the same bytes, and an interrupted prepare
resumes at the first shard without its .json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from smoltrain.atomic import FolderLock, refuse_foreign_files, write_atomic
from smoltrain.data.chat import conversation, conversation_key, render_conversation
from smoltrain.data.sources import MANIFEST, PROGRESS, check_text, is_eval_document, open_source
from smoltrain.tokenizer import chat_template, load_tokenizer

FORMAT = "smoltrain-shards/1"
SPLITS = ("train", "eval")


def is_prepared(spec: str | Path) -> bool:
    """A folder written by `smoltrain prepare` (a data.source of that kind)."""
    return not str(spec).startswith(("hf:", "builtin:")) and (Path(spec).expanduser() / MANIFEST).is_file()


def read_manifest(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder).expanduser() / MANIFEST).read_text())


def tokenizer_identity(tokenizer) -> dict[str, Any]:
    """What makes token ids mean the same: a hash of the tokenizer's full definition (its
    `tokenizer.json`), its EOS id and size. Two specs naming the same tokenizer match."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        from tokenizers import Tokenizer

        # without the padding and truncation a call like tokenizer(texts, padding=True) leaves
        # in the definition: they change no id (the same tokenizer hashed two ways, by test order)
        definition = Tokenizer.from_str(backend.to_str())
        definition.no_padding()
        definition.no_truncation()
        text = definition.to_str()
    else:
        text = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return {
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "eos_token_id": tokenizer.eos_token_id,
        "size": len(tokenizer),
    }


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


# ------------------------------------------------------------------------------ writing


@dataclass
class PrepareJob:
    """What `prepare` writes; the fields that decide the bytes are the resume key."""

    source: str
    out_dir: str
    tokenizer: str = "smollm2"
    workers: int = 1
    eval_every: int = 200  # hold out 1 in N documents (by content hash, as in training); 0: none
    text_column: str = "text"
    txt_documents: str = "file"
    data_format: str = "text"  # "chat": conversations, with the mask of the assistant's tokens
    shard_documents: int = 10_000  # source documents per shard
    tokenize_batch: int = 256  # documents per call to the fast tokenizer

    def key(self, identity: dict[str, Any]) -> dict[str, Any]:
        fields = asdict(self)
        for transient in ("out_dir", "workers", "tokenize_batch"):
            del fields[transient]
        return {"format": FORMAT, **fields, "tokenizer_sha256": identity["sha256"]}


_worker_tokenizer: Any = None


def _init_worker(tokenizer_spec: str, threads: bool = False) -> None:
    global _worker_tokenizer
    if not threads:  # several processes are the parallelism; one process uses the tokenizer's threads
        os.environ["TOKENIZERS_PARALLELISM"] = "false"

    _worker_tokenizer = load_tokenizer(tokenizer_spec)


def _tokenize(texts: list[str], tokenizer, dtype: str, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of `texts` (EOS after each) and the document offsets (starts, then the end)."""
    eos, pieces, lengths = tokenizer.eos_token_id, [], [0]
    for i in range(0, len(texts), batch):
        for ids in tokenizer(texts[i : i + batch], add_special_tokens=False)["input_ids"]:
            pieces.append(np.asarray([*ids, eos], dtype=dtype))
            lengths.append(len(ids) + 1)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    return tokens, np.cumsum(lengths, dtype=np.int64)


def _render_chat(conversations: list[list[dict[str, str]]], tokenizer, dtype: str):
    """Token ids of conversations in the chat template, the document offsets, the mask of
    the assistant's tokens, and how many had no assistant turn (left out)."""
    template, pieces, masks, lengths, silent = chat_template(tokenizer), [], [], [0], 0
    for messages in conversations:
        rendered = render_conversation(tokenizer, template, messages)
        if rendered is None:
            silent += 1
            continue
        pieces.append(np.asarray(rendered[0], dtype=dtype))
        masks.append(np.asarray(rendered[1], dtype=np.uint8))
        lengths.append(len(rendered[0]))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    mask = np.concatenate(masks) if masks else np.zeros(0, dtype=np.uint8)
    return tokens, np.cumsum(lengths, dtype=np.int64), mask, silent


def _write_chat_shard(
    out: str, index: int, conversations: list, job: dict[str, Any], dtype: str
) -> dict[str, int]:
    """`_write_shard` for conversations: their tokens, offsets and loss mask per split."""
    every = job["eval_every"]
    held_out = [bool(every) and is_eval_document(conversation_key(c), every) for c in conversations]
    counts = {"index": index, "empty_documents": 0}
    for split, wanted in (("train", False), ("eval", True)):
        part = [c for c, h in zip(conversations, held_out, strict=True) if h == wanted]
        tokens, offsets, mask, silent = _render_chat(part, _worker_tokenizer, dtype)
        stem = Path(out) / f"shard-{index:05d}.{split}"
        for ext, array in ((".npy", tokens), (".docs.npy", offsets), (".mask.npy", mask)):
            write_atomic(stem.with_name(stem.name + ext), lambda p, a=array: _save_npy(p, a))
        prefix = "" if split == "train" else "eval_"
        counts.update({f"{prefix}documents": len(offsets) - 1, f"{prefix}tokens": int(len(tokens))})
        counts["empty_documents"] += silent  # conversations with no reply to train on
    write_atomic(Path(out) / f"shard-{index:05d}.json", json.dumps(counts) + "\n")
    return counts


def _write_shard(out: str, index: int, texts: list, job: dict[str, Any], dtype: str) -> dict[str, int]:
    """Tokenize one chunk of documents and write its files, the .json last (in a worker)."""
    if job["data_format"] == "chat":
        return _write_chat_shard(out, index, texts, job, dtype)
    every = job["eval_every"]
    empty = sum(not t for t in texts)
    texts = [t for t in texts if t]  # an empty document holds no tokens: nothing to train on
    held_out = [bool(every) and is_eval_document(t, every) for t in texts]
    parts = {
        "train": [t for t, h in zip(texts, held_out, strict=True) if not h],
        "eval": [t for t, h in zip(texts, held_out, strict=True) if h],
    }
    counts = {"index": index, "empty_documents": empty}
    for split, docs in parts.items():
        tokens, offsets = _tokenize(docs, _worker_tokenizer, dtype, job["tokenize_batch"])
        stem = Path(out) / f"shard-{index:05d}.{split}"
        write_atomic(stem.with_name(stem.name + ".npy"), lambda p, a=tokens: _save_npy(p, a))
        write_atomic(stem.with_name(stem.name + ".docs.npy"), lambda p, a=offsets: _save_npy(p, a))
        prefix = "" if split == "train" else "eval_"
        counts.update({f"{prefix}documents": len(docs), f"{prefix}tokens": int(len(tokens))})
    write_atomic(Path(out) / f"shard-{index:05d}.json", json.dumps(counts) + "\n")
    return counts


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # np.save(path) would add ".npy" to the staging name
        np.save(f, array, allow_pickle=False)


def _chunks(job: PrepareJob, done: set[int]) -> Iterator[tuple[int, list]]:
    """(shard index, its documents or conversations) in source order; finished shards are
    read past, not kept."""

    chunk, index = [], 0
    rows = open_source(job.source, job.text_column, job.txt_documents, job.data_format)
    for n, row in enumerate(rows):
        index = n // job.shard_documents
        if index in done:
            continue
        if job.data_format == "chat":
            chunk.append(conversation(row, job.source))
        else:
            chunk.append(check_text(row["text"], job.source, job.text_column, n))
        if len(chunk) == job.shard_documents:
            yield index, chunk
            chunk = []
    if chunk:
        yield index, chunk


def _open_out_dir(out: Path) -> FolderLock:
    """Create OUT_DIR and lock it: two prepares never write one folder."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"'{out}' is a file; give prepare a folder (new, or one it is resuming)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        return FolderLock(out, advice="or prepare into another OUT_DIR")
    except OSError as e:
        raise ValueError(
            f"cannot write to '{out}' ({e.strerror or e}); give an OUT_DIR you can write to"
        ) from None


def _check_out_dir(out: Path, key: dict[str, Any], overwrite: bool) -> None:
    """Refuse to mix a new dataset into a folder that holds something else."""
    content = [p for p in out.iterdir() if p.name != FolderLock.NAME]
    if content:
        if overwrite:
            refuse_foreign_files(out, (MANIFEST, PROGRESS, "shard-*"), "a prepared dataset")
            (out / MANIFEST).unlink(missing_ok=True)  # first: a half-replaced folder is never "complete"
            for path in content:
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            return
        elif (out / MANIFEST).is_file():
            raise ValueError(
                f"'{out}' already holds a prepared dataset; pass --overwrite to replace it, or "
                "give another OUT_DIR"
            )
        elif not (out / PROGRESS).is_file():
            raise ValueError(
                f"'{out}' is not empty and holds no prepare in progress; give a new or empty "
                "OUT_DIR, or pass --overwrite to replace its content"
            )
        else:
            started = json.loads((out / PROGRESS).read_text())
            changed = sorted(k for k in set(key) | set(started) if key.get(k) != started.get(k))
            if changed:
                was = ", ".join(f"{k}={started.get(k)!r}" for k in changed)
                raise ValueError(
                    f"'{out}' holds an interrupted prepare with other settings ({was}); run it again "
                    "with those to resume it, or pass --overwrite to start over"
                )


def _done_shards(out: Path, data_format: str) -> dict[int, dict[str, int]]:
    done = {}
    exts = (".npy", ".docs.npy") + ((".mask.npy",) if data_format == "chat" else ())
    for marker in sorted(out.glob("shard-*.json")):
        counts = json.loads(marker.read_text())
        if all((out / f"shard-{counts['index']:05d}.{s}{ext}").is_file() for s in SPLITS for ext in exts):
            done[counts["index"]] = counts
    return done


def prepare(job: PrepareJob, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Tokenize `job.source` into shards in `job.out_dir` with `job.workers` processes and
    write the manifest; resumes an interrupted prepare of the same job. Returns the manifest."""

    if job.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {job.workers}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if job.workers > cores:  # each holds a tokenizer and its batch: 64 on a small machine took 9 GB
        print(f"note: --workers {job.workers} capped at this machine's {cores} cores", file=sys.stderr)
        job = dataclasses.replace(job, workers=cores)
    if job.eval_every == 1 or job.eval_every < 0:
        raise ValueError(f"--holdout-every must be 0 (hold nothing out) or at least 2, got {job.eval_every}")
    if job.shard_documents < 1:
        raise ValueError(f"--shard-documents must be at least 1, got {job.shard_documents}")
    out = Path(job.out_dir).expanduser()
    tokenizer = load_tokenizer(job.tokenizer)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer '{job.tokenizer}' has no EOS token; documents need one as separator")
    identity = tokenizer_identity(tokenizer)
    key = job.key(identity)
    if job.data_format not in ("text", "chat"):
        raise ValueError(f"--format must be text or chat, got '{job.data_format}'")
    # a bad source fails before OUT_DIR exists
    open_source(job.source, job.text_column, job.txt_documents, job.data_format)
    lock = _open_out_dir(out)
    try:
        return _prepare_locked(job, out, key, identity, overwrite, progress)
    finally:
        lock.path.unlink(missing_ok=True)  # a dataset folder holds the dataset only
        lock.release()


def _prepare_locked(
    job: PrepareJob, out: Path, key: dict[str, Any], identity: dict[str, Any], overwrite: bool, progress: bool
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    _check_out_dir(out, key, overwrite)
    write_atomic(out / PROGRESS, json.dumps(key, indent=2) + "\n")
    for leftover in out.glob(".*.tmp-*"):  # a killed writer's staging file
        leftover.unlink(missing_ok=True)
    done = _done_shards(out, job.data_format)
    dtype = token_dtype(identity["size"])
    args = {
        "eval_every": job.eval_every,
        "tokenize_batch": job.tokenize_batch,
        "data_format": job.data_format,
    }
    bar = tqdm(unit="tok", unit_scale=True, disable=not progress, desc="prepare", smoothing=0.1)
    if done:
        bar.write(f"resuming: {len(done)} shard(s) already written are kept")
    new_tokens, start = 0, time.perf_counter()

    def finished(counts: dict[str, int]) -> None:
        nonlocal new_tokens
        done[counts["index"]] = counts
        new_tokens += counts["tokens"] + counts["eval_tokens"]
        bar.update(counts["tokens"] + counts["eval_tokens"])
        bar.set_postfix(
            shards=len(done), docs=sum(c["documents"] + c["eval_documents"] for c in done.values())
        )

    if job.workers == 1:
        _init_worker(job.tokenizer, threads=True)
        for index, texts in _chunks(job, set(done)):
            finished(_write_shard(str(out), index, texts, args, dtype))
    else:
        # processes, not threads: the tokenizer's Python side holds the GIL. At most two
        # chunks per worker in flight, so a large source is never read into memory whole.
        context = multiprocessing.get_context("spawn")
        with context.Pool(job.workers, initializer=_init_worker, initargs=(job.tokenizer,)) as pool:
            pending: deque = deque()
            for index, texts in _chunks(job, set(done)):
                pending.append(pool.apply_async(_write_shard, (str(out), index, texts, args, dtype)))
                while len(pending) >= 2 * job.workers:
                    finished(pending.popleft().get())
            while pending:
                finished(pending.popleft().get())
    bar.close()
    shards = [done[i] for i in sorted(done)]
    if not shards or sum(s["documents"] + s["eval_documents"] for s in shards) == 0:
        (out / PROGRESS).unlink()  # nothing to resume: the folder is empty again
        empty = sum(s.get("empty_documents", 0) for s in shards)
        empty = f" ({empty} empty documents, which hold no tokens)" if empty else ""
        raise ValueError(
            f"data source '{job.source}' holds no documents{empty}; check the path and its text column"
        )
    seconds = time.perf_counter() - start
    manifest = {
        **key,
        "tokenizer_identity": identity,
        "dtype": dtype,
        "documents": sum(s["documents"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "eval_documents": sum(s["eval_documents"] for s in shards),
        "eval_tokens": sum(s["eval_tokens"] for s in shards),
        "empty_documents": sum(s.get("empty_documents", 0) for s in shards),  # left out
        "shards": shards,
        "prepare_seconds": round(seconds, 3),
        "tokens_per_second": round(new_tokens / seconds) if seconds > 0 else None,
    }
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest
