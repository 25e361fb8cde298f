"""Atomic writes: every output is written under a temporary name in its final folder, then renamed,
so a run that dies never leaves a half-written file under the final name.

Permissions follow the process umask, as `open()` and `mkdir()` would give: mkstemp/mkdtemp create
0600/0700 entries, and safetensors' writer creates every `model.safetensors` 0600 whatever the umask,
which would keep a lab's other users, Dask workers on shared storage and report viewers out. So
before the rename, the temporary file, or every file and folder inside the temporary folder, is
chmod'ed to 0666 (0777 for folders and executables) minus the umask.

`file_lock(path)`: the advisory lock that keeps two processes from writing one output at once (a
pipeline task's key, a preset's training)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    """The process umask, read without changing it (Linux: /proc/self/status); elsewhere set and
    restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _as_created(path: Path, umask: int | None = None) -> None:
    """Give `path` the mode `open()` or `mkdir()` would have given it under the umask: 0666 minus the
    umask for a file (0777 for a folder, or a file with an execute bit); a symlink is left alone."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return
    full = 0o777 if stat.S_ISDIR(st.st_mode) or st.st_mode & 0o111 else 0o666
    os.chmod(path, full & ~(_umask() if umask is None else umask))


def _as_created_tree(root: Path) -> None:
    """`_as_created` for `root` and everything inside it (symlinks are not followed)."""
    umask = _umask()
    _as_created(root, umask)
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            _as_created(Path(folder) / name, umask)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (a dot-name, so no reader globbing `part-*` or the
    final name sees it); when the block succeeds it is fsync'ed and renamed onto `path`, otherwise
    removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _as_created(tmp)  # after the block: a writer may have replaced the file with one of its own mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path` (old content removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        _as_created_tree(tmp)  # mkdtemp's 0700, and the 0600 of every model.safetensors inside
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if missing): other processes and threads
    taking the same lock wait here. `fcntl.flock`, so on a shared filesystem it holds where the
    filesystem supports flock (NFSv4, Lustre, local disks)."""
    import fcntl  # POSIX; imported here so that the rest of this module works everywhere

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _THREAD_LOCKS_GUARD:  # flock is per open file: threads of one process also need a lock
        thread_lock = _THREAD_LOCKS.setdefault(str(path.resolve()), threading.Lock())
    with thread_lock, open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
