"""The data pipeline: a text stream -> held-out split -> on-the-fly tokenization -> seeded
shuffle buffer -> packed blocks (or padded rows) -> a resumable DataLoader.

Sources are `datasets.IterableDataset`s read in streaming mode, from the hub
(`hf:HuggingFaceTB/smollm-corpus:cosmopedia-v2`), local files (.jsonl/.json, .parquet, .txt,
folders and globs) or `builtin:python-docs`, a corpus built from the Python installation.

Every stage after the source keeps its state in plain Python values (the source's own
`state_dict()`, the shuffle buffer and its RNG, the packer's leftover tokens), so
`torchdata`'s StatefulDataLoader can snapshot it per worker and a restored loader yields
exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import codecs
import copy
import functools
import glob
import hashlib
import json
import logging
import math
import os
import platform
import random
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from smoltrain.shards import MANIFEST, PROGRESS

log = logging.getLogger(__name__)

BUILTIN_PYTHON_DOCS = "builtin:python-docs"
REFERENCE_SOURCE = "hf:HuggingFaceTB/smollm-corpus:cosmopedia-v2"
_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


@dataclass
class MixtureEntry:
    source: str = BUILTIN_PYTHON_DOCS  # anything data.source accepts, prepared shards included
    weight: float = 1.0  # relative share of training sequences (tokens, in pack mode)


@dataclass
class Stage:
    until_step: int | None = None  # the stage's last step (None: to the end; the last one runs on)
    mixture: list[MixtureEntry] = field(default_factory=list)


@dataclass
class DataConfig:
    source: str = BUILTIN_PYTHON_DOCS  # hf:NAME[:CONFIG], a file, folder or glob, or builtin:python-docs
    text_column: str = "text"  # column holding the documents (jsonl, parquet, hub)
    txt_documents: str = "file"  # .txt files: one document per "file" or per blank-line "paragraph"
    context_length: int = 256  # tokens per training sequence
    mode: str = "pack"  # "pack": concatenate into full blocks; "pad": one document per row, padded
    document_mask: bool = False  # pack mode: forbid attention across documents inside a block
    shuffle_buffer: int = 1000  # documents in the seeded shuffle buffer (0: stream order)
    seed: int = 0  # shuffle seed; epoch k uses seed + k
    eval_every: int = 200  # hold out 1 in N documents (by a hash of the text) for evaluation
    eval_source: str | None = None  # a separate evaluation source instead of the held-out split
    num_workers: int = 0  # DataLoader worker processes per rank
    # How ranks share the stream. "micro_batch": every rank reads the same stream and rank r
    # takes micro-batches r, r+W, ...: a run (and its checkpoints) is the same for any process
    # count. "document": each rank reads and tokenizes only its own part of the source (W
    # times less work per rank); its position resumes only on the same process count.
    # "auto": document on several GPUs (8 H200s eat more tokens than one rank's tokenizer
    # makes), micro_batch otherwise.
    rank_split: str = "auto"
    tokenize_batch: int = 64  # documents per call to the fast tokenizer
    # Weighted sources instead of `source` (see smoltrain/mixture.py): sequences are drawn
    # in a fixed interleave whose shares are the weights; each source has its own epochs.
    mixture: list[MixtureEntry] = field(default_factory=list)
    # Mixtures by training step (annealing, continued pre-training): stage i runs until
    # its until_step, then stage i+1's mixture takes over.
    stages: list[Stage] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in ("pack", "pad"):
            raise ValueError(f"data.mode must be 'pack' or 'pad', got '{self.mode}'")
        if self.txt_documents not in ("file", "paragraph"):
            raise ValueError(f"data.txt_documents must be 'file' or 'paragraph', got '{self.txt_documents}'")
        if self.context_length < 2:
            raise ValueError(f"data.context_length must be >= 2, got {self.context_length}")
        if self.rank_split not in ("auto", "micro_batch", "document"):
            raise ValueError(
                f"data.rank_split must be 'auto', 'micro_batch' or 'document', got '{self.rank_split}'"
            )
        if self.eval_every < 2:
            raise ValueError(
                f"data.eval_every must be >= 2 (1 in N documents held out), got {self.eval_every}"
            )

        if self.mixture and self.stages:
            raise ValueError(
                "give data.mixture or data.stages (each stage has its own mixture), not both; with "
                "data.stages, set data.mixture=[] (a resumed run keeps its checkpoint's mixture otherwise)"
            )
        for where, mixture in [("data.mixture", self.mixture)] + [
            (f"data.stages[{i}].mixture", s.mixture) for i, s in enumerate(self.stages)
        ]:
            if where != "data.mixture" and not mixture:
                raise ValueError(f"{where} is empty; give each stage at least one source")
            for entry in mixture:
                if not (entry.weight > 0 and math.isfinite(entry.weight)):
                    raise ValueError(
                        f"{where}: the weight of '{entry.source}' must be a finite number above 0, "
                        f"got {entry.weight}"
                    )
            specs = [e.source for e in mixture]
            if len(set(specs)) != len(specs):
                raise ValueError(
                    f"{where} names a source twice ({specs}); give each once, with its total weight"
                )
        untils = [s.until_step for s in self.stages[:-1]]
        if any(u is None for u in untils):
            raise ValueError("data.stages: every stage but the last needs an until_step")
        if any(u < 1 for u in untils) or untils != sorted(set(untils)):
            raise ValueError(
                f"data.stages: until_step must be at least 1 and increase from stage to stage, got {untils}"
            )

    def source_for(self, split: str) -> str:
        """The source a split reads: eval_source for "eval" when set, else the source."""
        return self.eval_source if split == "eval" and self.eval_source else self.source


# ----------------------------------------------------------------------------- sources


def _expand_files(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if (path / PROGRESS).is_file() and not (path / MANIFEST).is_file():
        raise ValueError(
            f"'{spec}' holds a `smoltrain prepare` that has not finished (no manifest.json); run the "
            "same prepare command again to finish it, then train from it"
        )
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in _LOADERS and p.is_file())
        if not files:
            raise ValueError(f"folder '{spec}' has no .jsonl, .json, .parquet or .txt files")
        return files
    if path.is_file():
        return [path]
    files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not files:
        raise FileNotFoundError(
            f"data source '{spec}' matches no file; give an existing file, folder or glob, "
            f"'{BUILTIN_PYTHON_DOCS}', or a hub dataset as hf:NAME[:CONFIG]"
        )
    return files


TXT_PIECE = 1 << 22  # characters: a longer text document is cut at line ends into pieces this long


def _txt_documents(handle, per_paragraph: bool) -> Iterator[str]:
    """The documents of a binary text file, read 1 MiB at a time: whole (per file) or per
    blank-line paragraph, and a document longer than `TXT_PIECE` cut at line ends, so that
    memory stays bounded whatever the file's size (a 2 GB file was one 8 GB document)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    buffer = ""
    while True:
        block = handle.read(1 << 20)
        buffer += decoder.decode(block, final=not block)
        if per_paragraph:
            *paragraphs, buffer = buffer.split("\n\n")
            yield from paragraphs
        while len(buffer) > TXT_PIECE:
            cut = buffer.rfind("\n", 0, TXT_PIECE)
            cut = cut if cut > 0 else TXT_PIECE
            yield buffer[:cut]
            buffer = buffer[cut:]
        if not block:
            yield buffer
            return


def _read_txt(files: list[str], per_paragraph: bool) -> Iterator[dict[str, str]]:
    skipped = 0
    for name in files:
        with open(name, "rb") as handle:
            try:
                for doc in _txt_documents(handle, per_paragraph):
                    if doc.strip():
                        yield {"text": doc.strip("\n")}
            except UnicodeDecodeError as e:
                skipped += 1
                log.warning(
                    "skipped (the rest of) %s: not UTF-8 (%s); %d file(s) skipped so far",
                    name,
                    e.reason,
                    skipped,
                )


def load_dataset(*args, **kwargs):
    """`datasets.load_dataset`, looked up here so tests can stand a local file in for the hub."""
    import datasets

    return datasets.load_dataset(*args, **kwargs)


def _check_json_lines(ds, spec: str, files: list[Path]) -> None:
    try:
        next(iter(ds.take(1)), None)
    except ValueError as e:  # pyarrow's ArrowInvalid: "JSON parse error: Invalid value. in row 0"
        named = ", ".join(f.name for f in files[:3]) + (", ..." if len(files) > 3 else "")
        raise ValueError(
            f"data source '{spec}' is not JSON Lines ({str(e).splitlines()[0]}; its files: {named}): "
            'each line must be one JSON object, such as {"text": "..."}'
        ) from None


def open_source(spec: str, text_column: str = "text", txt_documents: str = "file"):
    """A streaming `datasets.IterableDataset` with one column, `text`."""
    import datasets

    if spec == BUILTIN_PYTHON_DOCS:
        spec = str(python_docs_dir())  # a folder of .jsonl shards, read like any other
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        ds = load_dataset(name, config or None, split="train", streaming=True)
    else:
        files = _expand_files(spec)
        kinds = {_LOADERS.get(f.suffix) for f in files}
        if None in kinds or len(kinds) != 1:
            raise ValueError(
                f"data source '{spec}' mixes or has unsupported file types "
                f"({sorted({f.suffix for f in files})}); use one of .jsonl, .json, .parquet, .txt"
            )
        kind = kinds.pop()
        if all(f.stat().st_size == 0 for f in files):
            raise ValueError(f"data source '{spec}' is empty: its files hold no documents")
        if kind == "text":
            per_paragraph = txt_documents == "paragraph"
            ds = datasets.IterableDataset.from_generator(
                _read_txt, gen_kwargs={"files": [str(f) for f in files], "per_paragraph": per_paragraph}
            )
        else:
            ds = load_dataset(kind, data_files=[str(f) for f in files], split="train", streaming=True)
            if kind == "json":  # a file that is not JSON Lines fails at the first row: say so now
                _check_json_lines(ds, spec, files)
    columns = ds.column_names
    if columns is None:  # some streaming builders only know their columns after a first row
        first = next(iter(ds), None)
        if first is None:
            raise ValueError(f"data source '{spec}' is empty: it holds no documents")
        columns = list(first.keys())
    if text_column not in columns:
        raise ValueError(
            f"data source '{spec}' has no column '{text_column}'; its columns are {columns}: "
            "set data.text_column to one of them"
        )
    ds = ds.select_columns([text_column])
    return ds.rename_column(text_column, "text") if text_column != "text" else ds


# ----------------------------------------------------------------------- builtin corpus

# Modules whose import opens a browser, prints, needs a display or is not documentation.
_SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "ensurepip"}


def _collect_python_docs(out_dir: str, shards: int = 8) -> None:
    """Runs in a child process (imports have side effects): the pydoc topics and the
    docstrings of the standard library, one document per topic or module, sorted."""
    import contextlib
    import importlib
    import inspect
    import io
    import pydoc_data.topics

    docs = [f"{name}\n\n{text.strip()}" for name, text in sorted(pydoc_data.topics.topics.items())]
    for mod_name in sorted(sys.stdlib_module_names):
        if mod_name.startswith("_") or mod_name in _SKIP_MODULES:
            continue
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                module = importlib.import_module(mod_name)
        except Exception:
            continue
        # One document for the module and its functions, one per class with its methods.
        module_part = [f"Module {mod_name}\n\n{inspect.getdoc(module) or ''}".strip()]
        class_docs = []
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or getattr(obj, "__module__", None) != mod_name:
                continue
            doc = inspect.getdoc(obj) if callable(obj) else None
            if inspect.isclass(obj):
                parts = [f"class {mod_name}.{name}\n\n{doc or ''}".strip()]
                for meth_name, meth in sorted(vars(obj).items()):
                    meth_doc = None if meth_name.startswith("_") else inspect.getdoc(meth)
                    if meth_doc and callable(meth):
                        parts.append(f"{name}.{meth_name}\n\n{meth_doc}")
                if doc or len(parts) > 1:
                    class_docs.append("\n\n".join(parts))
            elif doc and (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                module_part.append(f"{mod_name}.{name}\n\n{doc}")
        if len(module_part) > 1 or len(module_part[0]) > 200:
            docs.append("\n\n".join(module_part))
        docs.extend(class_docs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for s in range(shards):  # several files, so ranks and workers split by shard
        with open(out / f"shard-{s:02d}.jsonl", "w", encoding="utf-8") as f:
            for doc in docs[s::shards]:
                f.write(json.dumps({"text": doc}) + "\n")


def python_docs_dir() -> Path:
    """The `builtin:python-docs` corpus, built once per Python version and cached."""
    from smoltrain.atomic import cache_dir, publish_folder, staging_path

    version = f"{sys.implementation.name}-{platform.python_version()}"
    final = cache_dir() / "corpora" / f"python-docs-{version}"
    if final.is_dir():
        return final
    tmp = staging_path(final)
    code = f"from smoltrain.data import _collect_python_docs; _collect_python_docs({str(tmp)!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"building {BUILTIN_PYTHON_DOCS} failed:\n{result.stderr[-2000:]}")
    publish_folder(tmp, final)
    return final


# --------------------------------------------------------------------- the token stream


def check_text(value: Any, source: str, column: str, row: int | None = None) -> str:
    """A document's text, or a clear error for a value that is not text (a number, a list, a
    null), which the tokenizer and the held-out hash would stumble on."""
    if isinstance(value, str):
        return value
    where = f" in row {row}" if row is not None else ""
    raise ValueError(
        f"data source '{source}' has a {type(value).__name__} value{where} of its text column '{column}' "
        f"({str(value)[:40]!r}), where documents must be text: fix those rows, or set data.text_column "
        "to the column that holds the text"
    )


def is_eval_document(text: str, every: int) -> bool:
    """Deterministic 1-in-`every` held-out split by content hash: the same document is held
    out in every run, on every rank, whatever the order it arrives in."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") % every == 0


class TokenStream(IterableDataset):
    """Documents -> (held-out filter) -> tokens + EOS -> shuffle buffer -> examples.

    Examples are packed blocks (`input_ids`, `labels`, `position_ids`, each exactly
    `context_length` long) or, in pad mode, single documents cut into rows of at most
    `context_length` tokens. Each (rank, worker) pair reads its own part of the source.
    """

    def __init__(
        self,
        open_fn: Callable[[], Any],
        tokenizer,
        cfg: DataConfig,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        infinite: bool = True,
    ) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; documents need one as separator")
        self.open_fn, self.tokenizer, self.cfg = open_fn, tokenizer, cfg
        self.split, self.rank, self.world_size, self.infinite = split, rank, world_size, infinite
        self._state: dict[str, Any] = {}
        self._resume: dict[str, Any] | None = None

    # The StatefulDataLoader protocol: the state right after the last example yielded.
    def state_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, list) else v for k, v in self._state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = state

    def _open_part(self, epoch: int):
        from datasets.distributed import split_dataset_by_node

        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        ds = self.open_fn()
        ds = split_dataset_by_node(
            ds, rank=self.rank * workers + worker, world_size=self.world_size * workers
        )
        ds.set_epoch(epoch)
        return ds, workers * self.world_size

    def _keep(self, text: str) -> bool:
        if self.cfg.eval_source is not None:
            return True  # the evaluation set is a separate source
        held_out = is_eval_document(text, self.cfg.eval_every)
        return held_out if self.split == "eval" else not held_out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        fresh = {"epoch": 0, "epoch_docs": 0, "source": None, "rng": None}
        lists = {"pending": [], "buffer": [], "carry": [], "starts": [], "rows": []}
        st = self._resume or {**fresh, **lists}
        self._resume = None
        self._state = st
        eos = self.tokenizer.eos_token_id
        while True:
            ds, parts = self._open_part(st["epoch"])
            whole_epoch, epoch_tokens = st["source"] is None, 0  # read from its start here
            if st["source"] is not None:
                ds.load_state_dict(st["source"])
            rng = random.Random(cfg.seed + st["epoch"])
            if st["rng"] is not None:
                rng.setstate(_tuplify(st["rng"]))
            # `iter(batch_size=)`, not `iter(ds)`: inside a DataLoader worker a datasets stream
            # splits its shards among the workers again, on top of `_open_part`'s split (a
            # worker then read 1/W of its part, or nothing from a one-file source)
            source, exhausted = ds.iter(batch_size=cfg.tokenize_batch), False
            while True:
                # 1. emit what is ready: full blocks (pack) or rows (pad)
                while len(st["carry"]) >= cfg.context_length:
                    yield self._block(st, cfg.context_length)
                if st["rows"]:
                    yield {"input_ids": st["rows"].pop(0)}
                    continue
                # 2. route one tokenized document through the shuffle buffer
                if st["pending"]:
                    doc = st["pending"].pop(0)
                    if cfg.shuffle_buffer > 0:
                        if len(st["buffer"]) < cfg.shuffle_buffer:
                            st["buffer"].append(doc)
                            continue
                        i = rng.randrange(len(st["buffer"]))
                        doc, st["buffer"][i] = st["buffer"][i], doc
                        st["rng"] = rng.getstate()
                    self._add(st, doc)
                    continue
                # 3. read and tokenize the next batch of documents
                if not exhausted:
                    rows = next(source, None)
                    exhausted = rows is None
                    texts = (
                        [check_text(t, cfg.source_for(self.split), cfg.text_column) for t in rows["text"]]
                        if rows
                        else []
                    )
                    empty = sum(not t for t in texts)  # no tokens: not a document to train on
                    texts = [t for t in texts if t and self._keep(t)]
                    st["empty_docs"] = st.get("empty_docs", 0) + empty
                    if texts:
                        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
                        st["pending"] = [np.array(t + [eos], dtype=np.int32) for t in ids]
                        st["epoch_docs"] += len(texts)
                        epoch_tokens += sum(len(t) + 1 for t in ids)
                    st["source"] = ds.state_dict()
                    continue
                # 4. this part of the source is done: drain the buffer in random order
                if st["buffer"]:
                    self._add(st, st["buffer"].pop(rng.randrange(len(st["buffer"]))))
                    st["rng"] = rng.getstate()
                    continue
                break
            if st["epoch_docs"] == 0:
                if parts == 1:
                    empty = (
                        f" ({st['empty_docs']} empty documents, which hold no tokens)"
                        if st.get("empty_docs")
                        else ""
                    )
                    raise ValueError(
                        f"data source '{cfg.source_for(self.split)}' yielded no {self.split} "
                        f"documents{empty}; check that it is not empty, its text column, and data.eval_every"
                    )
                return  # a tiny source left this rank or worker without a part
            if self.infinite and cfg.mode == "pack" and whole_epoch and epoch_tokens < cfg.context_length:
                raise ValueError(
                    f"data source '{cfg.source_for(self.split)}' holds {epoch_tokens} tokens for this "
                    f"rank, fewer than one block of data.context_length={cfg.context_length}; lower "
                    "data.context_length or add documents"
                )
            if not self.infinite:
                if st["carry"]:
                    yield self._block(st, len(st["carry"]))  # the last partial block, padded
                return
            st.update(epoch=st["epoch"] + 1, epoch_docs=0, source=None, rng=None)

    def _add(self, st: dict[str, Any], doc: np.ndarray) -> None:
        if self.cfg.mode == "pack":
            st["starts"].append(len(st["carry"]))
            st["carry"] = st["carry"] + doc.tolist()
        else:  # one document per row; a long one is split into several rows, never dropped
            T = self.cfg.context_length
            st["rows"] = st["rows"] + [doc[i : i + T].tolist() for i in range(0, len(doc), T)]

    def _block(self, st: dict[str, Any], n: int) -> dict[str, Any]:
        tokens, starts = st["carry"][:n], [s for s in st["starts"] if s < n]
        st["carry"] = st["carry"][n:]
        st["starts"] = [s - n for s in st["starts"] if s >= n]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return packed_example(
            np.asarray(tokens, dtype=np.int64),
            np.asarray(starts, dtype=np.int64),
            self.cfg.context_length,
            pad,
        )


def packed_example(tokens: np.ndarray, starts: np.ndarray, T: int, pad: int) -> dict[str, torch.Tensor]:
    """One packed block of `T` (its `tokens`, padded when fewer, with the offsets where
    documents start): position ids restart at every document start (a document continued
    from the previous block restarts at 0 too: its earlier part is not visible here),
    document ids count the documents, the padded tail is -100 in the labels and -1 in the ids."""
    n = len(tokens)
    index = np.arange(T)
    is_start = np.zeros(T, dtype=bool)
    is_start[0] = True
    is_start[starts] = True
    positions = index - np.maximum.accumulate(np.where(is_start, index, 0))
    doc_ids = np.cumsum(is_start) - 1
    doc_ids[n:] = -1
    input_ids = np.full(T, pad, dtype=np.int64)
    input_ids[:n] = tokens
    labels = input_ids.copy()
    labels[n:] = -100
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(positions),
        "doc_ids": torch.from_numpy(doc_ids),
    }


def _tuplify(x):
    # random.Random state round-trips through a checkpoint as nested lists
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------------------- batching


def make_collate(cfg: DataConfig, tokenizer) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Batches that keep attention plain causal wherever that is exact, so that SDPA runs its
    flash kernels: padding goes on the right, where no real token looks (its labels are
    -100), so pad mode needs no mask; document masking sends (B, T) document ids, from which
    the model builds its mask on the device (a FlexAttention block mask on CUDA)."""
    if cfg.mode == "pad":
        from transformers import DataCollatorForLanguageModeling

        tokenizer = copy.deepcopy(tokenizer)  # its own: the run's tokenizer (saved with checkpoints) stays
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        pad = DataCollatorForLanguageModeling(tokenizer, mlm=False)

        def collate_rows(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            batch = pad(examples)
            del batch["attention_mask"]  # right padding under causal attention: nothing to hide
            return dict(batch)

        return collate_rows

    def collate_blocks(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {k: torch.stack([e[k] for e in examples]) for k in ("input_ids", "labels", "position_ids")}
        if cfg.document_mask:
            batch["document_ids"] = torch.stack([e["doc_ids"] for e in examples])
        return batch

    return collate_blocks


def _open_fn(cfg: DataConfig, split: str) -> Callable[[], Any]:
    # a partial, not a lambda: spawned workers (macOS) must pickle it
    return functools.partial(open_source, cfg.source_for(split), cfg.text_column, cfg.txt_documents)


class RankSlice:
    """Rank r of W takes micro-batches r, r+W, r+2W, ... of a stream every rank reads alike.
    At every optimizer step boundary all ranks have pulled the same number of micro-batches,
    so the inner loader's state is one global position, valid for any process count."""

    def __init__(self, loader, rank: int, world_size: int) -> None:
        self.loader, self.rank, self.world_size = loader, rank, world_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        inner = iter(self.loader)
        while True:
            group = []
            for batch in inner:
                group.append(batch)
                if len(group) == self.world_size:
                    break
            if self.rank < len(group):
                yield group[self.rank]
            if len(group) < self.world_size:
                return

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


def resolve_rank_split(rank_split: str, device_type: str, world_size: int) -> str:
    """`auto`: each rank its own documents on several GPUs, the same stream otherwise."""
    if rank_split != "auto":
        return rank_split
    return "document" if device_type == "cuda" and world_size > 1 else "micro_batch"


def build_loader(
    cfg: DataConfig,
    tokenizer,
    batch_size: int,
    split: str = "train",
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    snapshot_every: int = 1,
    samples_per_step: int | None = None,
):
    """A resumable loader (`state_dict()` / `load_state_dict()`) of this rank's micro-batches
    (see `DataConfig.rank_split`, `auto` read as on CPU). The train split is endless (epoch
    after epoch); eval is one pass. `pin_memory` for copies to a GPU that overlap compute.
    Workers send their state (the shuffle buffer included) every `snapshot_every` batches,
    the checkpoint interval in training: a state asked for in between replays the batches
    since the last one on resume, so it stays exact. Prepared shards, mixtures and stages
    (`samples_per_step`: sequences per optimizer step, where stages switch) are served by
    `smoltrain.mixture`, each rank reading its own micro-batches."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    from smoltrain.mixture import build_plan_loader, uses_plan

    warnings.filterwarnings("ignore", message="'set_vital' is deprecated")  # torchdata's own noise
    if uses_plan(cfg):
        return build_plan_loader(
            cfg, tokenizer, batch_size, split, rank, world_size, samples_per_step, pin_memory, snapshot_every
        )

    open_fn = _open_fn(cfg, split)
    open_fn()  # fail here, with the source's message, rather than inside a worker
    if cfg.num_workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are the parallelism
    by_document = resolve_rank_split(cfg.rank_split, "cpu", world_size) == "document"
    stream = TokenStream(
        open_fn,
        tokenizer,
        cfg,
        split,
        rank if by_document else 0,
        world_size if by_document else 1,
        infinite=split == "train",
    )
    loader = StatefulDataLoader(
        stream,
        batch_size=batch_size,
        collate_fn=make_collate(cfg, tokenizer),
        num_workers=cfg.num_workers,
        persistent_workers=False,
        pin_memory=pin_memory,
        snapshot_every_n_steps=max(1, snapshot_every),
    )
    return loader if by_document or world_size == 1 else RankSlice(loader, rank, world_size)
