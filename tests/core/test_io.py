"""Atomic writes: the final name appears whole, with the permissions the umask gives a plain write."""

import os
import stat

import pytest

from manu_core.io import atomic_dir, atomic_file, atomic_write_json


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_(mask: int) -> None:
        os.umask(mask)

    yield set_
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                        (0o002, 0o664, 0o775)])
def test_outputs_honour_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    f = atomic_write_json(tmp_path / "a.json", {"x": 1})
    with atomic_file(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"data")
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "inner.txt").write_text("hi")
    assert mode(f) == file_mode and mode(tmp_path / "b.bin") == file_mode
    assert mode(tmp_path / "folder") == dir_mode
    assert (tmp_path / "folder" / "inner.txt").read_text() == "hi"
    if mask == 0o022:  # world-readable: another user of a lab server can read both
        assert mode(f) & stat.S_IROTH and mode(tmp_path / "folder") & stat.S_IROTH


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "x.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
