import errno

import pytest

from smoltrain.atomic import publish_folder, write_atomic
from smoltrain.errors import WriteError


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "state.json"
    write_atomic(path, "old\n")

    def failing_writer(p):
        p.write_text("half of the new")
        raise OSError(28, "No space left on device")

    with pytest.raises(WriteError, match="could not write state.json: no space left on the device") as e:
        write_atomic(path, failing_writer)
    assert "MB free on the filesystem at" in str(e.value) and "previous version is intact" in str(e.value)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary left behind
    write_atomic(path, b"new\n")
    assert path.read_text() == "new\n"


def test_publish_folder_replaces_or_keeps_the_winner(tmp_path):
    first, second, final = tmp_path / "a.tmp", tmp_path / "b.tmp", tmp_path / "final"
    for folder, text in ((first, "first"), (second, "second")):
        folder.mkdir()
        (folder / "f.txt").write_text(text)
    assert publish_folder(first, final)
    assert not publish_folder(second, final)  # a concurrent writer already published it
    assert (final / "f.txt").read_text() == "first" and not second.exists()
    second.mkdir()
    (second / "f.txt").write_text("second")
    assert publish_folder(second, final, replace=True)
    assert (final / "f.txt").read_text() == "second"


@pytest.mark.parametrize(
    "error, words",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "the disk quota is used up"),
        (OSError(errno.EROFS, "Read-only file system"), "the filesystem is read-only"),
        (OSError(errno.EACCES, "Permission denied"), "no permission to write there"),
        (OSError(errno.EIO, "Input/output error"), "an I/O error on the device"),
        (RuntimeError("Error while serializing: No space left on device (os error 28)"), "no space left"),
    ],
)
def test_every_way_a_write_fails_is_one_message_and_leaves_no_staging_file(tmp_path, error, words):
    """ENOSPC, EDQUOT, EROFS, EACCES and EIO, as OSError or in safetensors' words, from any
    writer (GGUF, JSON, plots and shards all write through write_atomic)."""

    def failing_writer(p):
        p.write_bytes(b"partial")
        raise error

    with pytest.raises(WriteError, match=f"could not write out.bin: {words}") as e:
        write_atomic(tmp_path / "out.bin", failing_writer)
    assert "MB free on the filesystem at" in str(e.value) and "nothing was written" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_a_staged_folder_is_published_whole_or_not_at_all(tmp_path):
    from smoltrain.atomic import staged_folder

    final = tmp_path / "final"
    with staged_folder(final) as folder:
        (folder / "config.json").write_text("old")
    with pytest.raises(ValueError, match="not a write failure"):  # any other error: as it was
        with staged_folder(final) as folder:
            (folder / "config.json").write_text("new")
            raise ValueError("not a write failure")
    assert [p.name for p in tmp_path.iterdir()] == ["final"]  # no staging folder left
    assert (final / "config.json").read_text() == "old"
