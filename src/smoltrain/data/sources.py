"""Where documents come from: the hub, local files (.jsonl/.json, .parquet, .txt, folders and globs) and
`builtin:python-docs`; and the held-out split, 1 in `data.holdout_every` documents by content hash."""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import logging
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from smoltrain.data.config import _LOADERS, BUILTIN_PYTHON_CHAT, BUILTIN_PYTHON_DOCS

log = logging.getLogger(__name__)

# the files of a folder `smoltrain prepare` writes (smoltrain.data.shards)
MANIFEST = "manifest.json"
PROGRESS = "prepare.json"

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


def open_source(spec: str, text_column: str = "text", txt_documents: str = "file", data_format: str = "text"):
    """A streaming `datasets.IterableDataset` with one column, `text`; for chat data, the
    columns that hold the conversations (`messages`, or `prompt` and `completion`)."""
    import datasets

    if spec in (BUILTIN_PYTHON_DOCS, BUILTIN_PYTHON_CHAT):
        spec = str(python_docs_dir(chat=spec == BUILTIN_PYTHON_CHAT))  # .jsonl shards, read like any other
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
    if data_format == "chat":
        from smoltrain.data.chat import conversation_columns

        return ds.select_columns(conversation_columns(columns, spec))
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


def _stdlib_modules() -> Iterator[tuple[str, Any]]:
    """The standard library's public modules that import quietly, by name."""
    import contextlib
    import importlib
    import io

    for mod_name in sorted(sys.stdlib_module_names):
        if mod_name.startswith("_") or mod_name in _SKIP_MODULES:
            continue
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                yield mod_name, importlib.import_module(mod_name)
        except Exception:
            continue


def _write_shards(out_dir: str, rows: list[dict[str, Any]], shards: int = 8) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for s in range(shards):  # several files, so ranks and workers split by shard
        with open(out / f"shard-{s:02d}.jsonl", "w", encoding="utf-8") as f:
            for row in rows[s::shards]:
                f.write(json.dumps(row) + "\n")


def _collect_python_docs(out_dir: str) -> None:
    """Runs in a child process (imports have side effects): the pydoc topics and the
    docstrings of the standard library, one document per topic or module, sorted."""
    import inspect
    import pydoc_data.topics

    docs = [f"{name}\n\n{text.strip()}" for name, text in sorted(pydoc_data.topics.topics.items())]
    for mod_name, module in _stdlib_modules():
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
    _write_shards(out_dir, [{"text": doc} for doc in docs])


# How the chat set asks about a function; which one, by a hash of its name.
_QUESTIONS = [
    "What does `{}` do in Python?",
    "Explain the Python function `{}`.",
    "In Python's standard library, what is `{}` for?",
    "Briefly, what does `{}` do?",
]


def _collect_python_chat(out_dir: str) -> None:
    """Runs in a child process: one conversation per documented public function of the
    standard library, a question about it answered by its docstring's first paragraph."""
    import inspect

    rows = []
    for mod_name, module in _stdlib_modules():
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or getattr(obj, "__module__", None) != mod_name:
                continue
            if not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            answer = (inspect.getdoc(obj) or "").split("\n\n")[0].strip()
            if not 20 <= len(answer) <= 600:
                continue
            qualified = f"{mod_name}.{name}()"
            question = _QUESTIONS[hashlib.blake2b(qualified.encode(), digest_size=1).digest()[0] % 4]
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": question.format(qualified)},
                        {"role": "assistant", "content": answer},
                    ]
                }
            )
    _write_shards(out_dir, rows)


def python_docs_dir(chat: bool = False) -> Path:
    """The `builtin:python-docs` corpus (`chat`: `builtin:python-docs-chat`), built once per
    Python version and cached."""
    from smoltrain.atomic import cache_dir, publish_folder, staging_path

    version = f"{sys.implementation.name}-{platform.python_version()}"
    kind = "python-docs-chat" if chat else "python-docs"
    final = cache_dir() / "corpora" / f"{kind}-{version}"
    if final.is_dir():
        return final
    tmp = staging_path(final)
    collect = "_collect_python_chat" if chat else "_collect_python_docs"
    code = f"from smoltrain.data.sources import {collect}; {collect}({str(tmp)!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"building builtin:{kind} failed:\n{result.stderr[-2000:]}")
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


def training_documents(
    source: str, holdout_every: int, text_column: str = "text", txt_documents: str = "file"
):
    """A source's documents but the held-out ones (the tokenizer must not have seen the text
    the eval loss is measured on): the same 1-in-`holdout_every` split as data.holdout_every."""
    for row in open_source(source, text_column, txt_documents):
        if row["text"] and not (holdout_every and is_eval_document(row["text"], holdout_every)):
            yield row["text"]
