"""Every file and folder the project writes goes through here: a crash, a kill or a full
disk leaves the old version or the new one, never half of one."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

from smoltrain.errors import TrainingError


def cache_dir() -> Path:
    """Where derived files are kept between runs: converted GGUF weights and tokenizers, the
    built-in corpus, this machine's measured matmul speeds ($SMOLTRAIN_CACHE moves it)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "smoltrain"
    return Path(os.environ.get("SMOLTRAIN_CACHE") or default).expanduser()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_path(final: Path) -> Path:
    """Where this process writes `final`'s content before it is renamed into place: a hidden
    sibling, on the same filesystem, that no other process picks."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def write_atomic(path: str | Path, content: str | bytes | Callable[[Path], object]) -> None:
    """Write `path` with `content` (text, bytes, or a function that writes the file it is
    given, such as `lambda p: torch.save(obj, p)`): into a temporary file beside it, flushed
    to disk, then renamed over it."""
    path = Path(path)
    tmp = staging_path(path)
    try:
        if isinstance(content, str):
            tmp.write_text(content)
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            content(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)  # the rename itself
    finally:
        tmp.unlink(missing_ok=True)


def publish_folder(tmp: Path, final: Path, replace: bool = False) -> bool:
    """Move the fully written folder `tmp` to `final` in one rename, its files flushed to disk
    first. An existing `final` is replaced when `replace`; otherwise it is kept (a concurrent
    writer of the same cached result won) and `tmp` removed. Returns whether `tmp` moved."""
    for file in tmp.rglob("*"):
        if file.is_file():
            _fsync(file)
    final.parent.mkdir(parents=True, exist_ok=True)
    if replace and final.exists():
        shutil.rmtree(final)
    try:
        tmp.rename(final)
    except OSError:
        if replace:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    _fsync(final.parent)
    return True


class FolderLock:
    """An exclusive lock on a run's output folder for the run's lifetime: `flock` on
    `folder/.lock`, which the OS releases when the holder exits, however it dies (SIGKILL
    included), so a dead run never leaves it stuck. The file names the holder for the
    message a second run gets."""

    NAME = ".lock"

    def __init__(self, folder: Path, advice: str = "or train into another --output-dir") -> None:
        self.path = Path(folder) / self.NAME
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise TrainingError(
                f"output folder '{folder}' is in use by {holder}; wait for it to end (or stop it), {advice}"
            ) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()

    def release(self) -> None:
        if not self.file.closed:
            self.file.close()  # closing drops the flock
