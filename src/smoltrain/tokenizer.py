"""Tokenizers: the bundled SmolLM2 one by default, or any folder, GGUF file or hub name."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from smoltrain.hf import BUNDLED_NAME, resolve_checkpoint


def cache_dir() -> Path:
    root = os.environ.get("SMOLTRAIN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "smoltrain"
    return Path(root).expanduser()


def _gguf_tokenizer(path: Path):
    """Tokenizer from a GGUF's metadata; parsing it takes seconds, so the converted fast
    tokenizer is cached on disk, keyed by the file's path, size and mtime."""
    from transformers import AutoTokenizer

    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir() / "tokenizers" / f"{path.stem}-{key}"
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tmp = cached.with_name(cached.name + f".tmp-{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(cached)  # atomic: a concurrent or killed writer never leaves half a folder
    except OSError:
        pass  # another process got there first
    return tokenizer


def load_tokenizer(spec: str | Path = BUNDLED_NAME):
    """`smollm2` (the tokenizer inside the bundled GGUF), a model or tokenizer folder, a
    `.gguf` file, or a hub name. Returns a transformers fast tokenizer."""
    from transformers import AutoTokenizer

    path = Path(spec).expanduser()
    if path.is_dir() and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return AutoTokenizer.from_pretrained(path)
    resolved = resolve_checkpoint(spec)
    if resolved.suffix == ".gguf":
        return _gguf_tokenizer(resolved)
    if not any((resolved / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(
            f"{resolved} has no tokenizer files (tokenizer.json); pass `--tokenizer smollm2` "
            "or a folder that has them"
        )
    return AutoTokenizer.from_pretrained(resolved)
