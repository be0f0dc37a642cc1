"""Every file and folder the project writes goes through here: a crash, a kill or a full
disk leaves the old version or the new one, never half of one."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from smoltrain.errors import FolderInUse, WriteError


def cache_dir() -> Path:
    """Where derived files are kept between runs: converted GGUF weights and tokenizers, the
    built-in corpus, this machine's measured matmul speeds ($SMOLTRAIN_CACHE moves it)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "smoltrain"
    return Path(os.environ.get("SMOLTRAIN_CACHE") or default).expanduser()


def plain_permissions(path: Path) -> None:
    """The permissions a plain open() gives (0644 under the usual umask): safetensors makes
    its files 0600, unreadable to the colleague the other files are shared with."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def check_cache_dir() -> None:
    """The cache folder is writable, or one message says so at once (it was named nowhere,
    20-40 s into a run, when the first converted model or measurement was stored)."""
    import tempfile

    path = cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        set_by = "$SMOLTRAIN_CACHE" if os.environ.get("SMOLTRAIN_CACHE") else "the default"
        raise WriteError(
            f"the cache folder {path} ({set_by}) is not writable ({e.strerror}); point SMOLTRAIN_CACHE "
            "at a folder you can write"
        ) from None


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


_WRITE_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "no permission to write there",
    errno.EPERM: "no permission to write there",
    errno.EIO: "an I/O error on the device",
}


def _mount_point(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


def write_failure(e: BaseException, path: str | Path) -> str | None:
    """What a failed write of `path` means, in words, with the filesystem and its free space;
    None when `e` is no write failure. safetensors and torch.save do not raise OSError:
    safetensors names the OS error's number, torch.save's message never says "disk"."""
    if isinstance(e, WriteError) and e.__cause__ is not None:  # write_atomic's, raised through
        e = e.__cause__
    code = getattr(e, "errno", None) if isinstance(e, OSError) else None
    found = re.search(r"os error (\d+)", str(e))
    if code is None and found:
        code = int(found.group(1))
    mount = _mount_point(Path(path))
    free = shutil.disk_usage(mount).free
    if code is None and ("inline_container" in str(e) or "StreamWriter" in str(e)):
        code = errno.ENOSPC if free < 64 << 20 else errno.EIO
    if code not in _WRITE_ERRORS:
        return None
    return f"{_WRITE_ERRORS[code]} (writing {path}; {free >> 20} MB free on the filesystem at {mount})"


def raise_write_failure(e: BaseException, path: str | Path, advice: str) -> None:
    """Raise `e` again as one message naming the failure and `advice`, or as it was."""
    failure = write_failure(e, path)
    if failure is None:
        raise e
    cause = e.__cause__ if isinstance(e, WriteError) and e.__cause__ is not None else e
    raise WriteError(f"could not write {Path(path).name}: {failure}; {advice}") from cause


def write_atomic(path: str | Path, content: str | bytes | Callable[[Path], object]) -> None:
    """Write `path` with `content` (text, bytes, or a function that writes the file it is
    given, such as `lambda p: torch.save(obj, p)`): into a temporary file beside it, flushed
    to disk, then renamed over it. A failed write (full disk, read-only filesystem...) leaves
    the old file and no temporary one, and raises one message that says so."""
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
        plain_permissions(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)  # the rename itself
    except Exception as e:  # `finally` removes the staging file
        kept = "the previous version is intact" if path.exists() else "nothing was written"
        raise_write_failure(e, path, f"{kept}; free space (or fix the permissions) and run it again")
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def staged_folder(final: str | Path) -> Iterator[Path]:
    """A staging folder beside `final` to write into; published over `final` in one rename
    when the block ends, removed when it fails: a kill, a full disk or an error leaves the
    old `final` (or none), never part of a new one."""
    final = Path(final)
    tmp = staging_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        publish_folder(tmp, final, replace=True)
    except Exception as e:  # `finally` removes the staging folder
        kept = "the previous version is intact" if final.exists() else "nothing was written"
        raise_write_failure(e, final, f"{kept}; free space (or fix the permissions) and run it again")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


# What smoltrain writes into a model or tokenizer folder (and transformers beside it)
HF_FOLDER_FILES = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def foreign_files(folder: Path, ours: tuple[str, ...]) -> list[str]:
    """Names in `folder` that match none of the patterns of what smoltrain writes there (its
    staging files and lock included): files a user put there, which --overwrite must not
    delete."""
    import fnmatch

    patterns = (*ours, ".*.tmp-*", FolderLock.NAME)
    return sorted(p.name for p in folder.iterdir() if not any(fnmatch.fnmatch(p.name, q) for q in patterns))


def refuse_foreign_files(folder: Path, ours: tuple[str, ...], what: str) -> None:
    foreign = foreign_files(folder, ours)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(
            f"'{folder}' holds files smoltrain did not write ({shown}); --overwrite replaces only "
            f"{what}: move those files away, or give another folder"
        )


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
            raise FolderInUse(
                f"output folder '{folder}' is in use by {holder}; wait for it to end (or stop it), {advice}"
            ) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()

    def release(self) -> None:
        if not self.file.closed:
            self.file.close()  # closing drops the flock
