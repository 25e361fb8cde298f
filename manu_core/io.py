"""Atomic writes: every output is written under a temporary name in its final folder, then renamed,
so a run that dies never leaves a half-written file under the final name.

Permissions follow the process umask, as `open()` and `mkdir()` would give: mkstemp/mkdtemp create
0600/0700 entries, and safetensors' writer creates every `model.safetensors` 0600 whatever the umask,
which would keep a lab's other users, Dask workers on shared storage and report viewers out. So
before the rename, the temporary file, or every file and folder inside the temporary folder, is
chmod'ed to 0666 (0777 for folders and executables) minus the umask.

`file_lock(path)`: the advisory lock that keeps two processes from writing one output at once (a
pipeline task's key, a preset's training). `python -m manu_core.io --check-lock FOLDER` checks that a
folder gives it what it needs (run on two hosts: does the lock reach across them)."""

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


# errno values by which a filesystem refuses flock altogether (NFSv3 without lockd: ENOLCK; some FUSE
# and cluster filesystems: EOPNOTSUPP, ENOSYS, EINVAL).
_NO_FLOCK = {"ENOLCK", "EOPNOTSUPP", "ENOTSUP", "ENOSYS", "EINVAL"}


def _flock_refused(path: Path, err: OSError) -> OSError:
    return OSError(err.errno, f"cannot lock {path}: the filesystem refused flock ({err.strerror}). The artifacts "
                   "folder must give flock() across every host that shares it (local disk; NFSv4; NFSv3 with lockd; "
                   "not a `nolock` or `local_lock=flock|all` mount). Check with `python -m manu_core.io --check-lock "
                   f"{path.parent}` on two hosts (README: \"Running on several servers\").")


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if missing): other processes and threads
    taking the same lock wait here. `fcntl.flock`: the kernel releases it when the holder exits or is
    killed (kill -9 included), so a dead holder never leaves a stale lock. On NFS, Linux emulates flock
    with a POSIX lock on the whole file (since 2.6.12), held by the server, so it excludes across hosts
    on NFSv4 (and NFSv3 with lockd); a `nolock` or `local_lock=flock|all` mount keeps it per host."""
    import errno
    import fcntl  # POSIX; imported here so that the rest of this module works everywhere

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _THREAD_LOCKS_GUARD:  # flock is per open file: threads of one process also need a lock
        thread_lock = _THREAD_LOCKS.setdefault(str(path.resolve()), threading.Lock())
    # Opened for writing ("a"): NFS's emulation takes LOCK_EX as a write lock, which needs a writable file.
    with thread_lock, open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:
            if errno.errorcode.get(e.errno) in _NO_FLOCK:
                raise _flock_refused(path, e) from e
            raise
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def lock_held(path: str | Path) -> bool:
    """Whether some process holds `file_lock(path)` now (False where the file does not exist): a
    non-blocking try of the same flock, released at once. A holder that died holds nothing (the kernel,
    or the NFS server once the client's lease ends, dropped its lock), which is what makes this a
    liveness probe for a process on another machine that shares the folder."""
    import fcntl

    if not Path(path).is_file():
        return False
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def _mount_of(path: Path) -> tuple[str, str, set[str]]:
    """(mount point, filesystem type, mount and superblock options) of the mount holding `path`, read
    from /proc/self/mountinfo (Linux); ("?", "?", set()) elsewhere."""
    real, best = str(path.resolve()), ("?", "?", set())
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return best
    for line in lines:  # "<id> <parent> <dev> <root> <point> <options> ... - <type> <source> <super options>"
        fields, tail = line.partition(" - ")[0].split(), line.partition(" - ")[2].split()
        point = fields[4].replace("\\040", " ")
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(tail) >= 3 \
                and (best[0] == "?" or len(point) >= len(best[0])):
            best = (point, tail[0], set(fields[5].split(",")) | set(tail[2].split(",")))
    return best


# A second process of this host tries the lock the checking process holds: exit 0 when kept out.
_SECOND_TAKER = """import fcntl, sys
with open(sys.argv[1], "a") as f:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(0)
sys.exit(3)"""


def _probe_holder(f) -> dict:
    """The holder a check wrote in the probe file ({} when empty or unreadable)."""
    f.seek(0)
    try:
        holder = json.loads(f.read() or "{}")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def check_lock(folder: str | Path, hold: float = 60.0, out=print) -> int:
    """Check from this host what `file_lock` needs from `folder`: flock works, a second process here
    is kept out, the mount does not keep locks per host (NFS `nolock`, `local_lock=flock|all`), and no
    other host holds the probe lock (`folder/.manu-lock-check`) while this one got it. Then hold the
    probe lock for `hold` seconds with this host and pid written in it: the same command run meanwhile
    on another host must say "kept out". 0 when all held, else 1 (each reason printed)."""
    import fcntl
    import socket
    import subprocess
    import sys
    import time

    folder, host, bad = Path(folder), socket.gethostname(), []
    probe = folder / ".manu-lock-check"
    if not folder.is_dir():
        out(f"check-lock: FAIL: {folder} is not a folder (give the artifacts folder, as every host mounts it)")
        return 1
    point, fstype, opts = _mount_of(folder)
    out(f"check-lock: {folder} on {point} ({fstype}), host {host}")
    if fstype.startswith("nfs") and (local := sorted(opts & {"nolock", "local_lock=flock", "local_lock=all"})):
        bad.append(f"{point} is mounted with {','.join(local)}: flock is local to each host there")
    if fstype.startswith("fuse"):
        out("check-lock: a FUSE filesystem: many keep flock per host; only the check from a second host tells")
    with open(probe, "a+") as f:  # a+: written and read back by the holder, read by a second taker
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _probe_holder(f)
            where = ("this host: run it from another host to check across hosts" if holder.get("host") == host
                     else "another host: flock excludes across these hosts")
            out(f"check-lock: kept out (OK): host {holder.get('host', '?')} pid {holder.get('pid', '?')} holds the "
                f"probe lock, on {where}")
            for reason in bad:
                out(f"check-lock: FAIL: {reason}")
            return 1 if bad else 0
        except OSError as e:
            out(f"check-lock: FAIL: {_flock_refused(probe, e).strerror}")
            return 1
        try:
            holder = _probe_holder(f)
            if holder.get("host", host) != host and holder.get("until", 0) > time.time():
                bad.append(f"host {holder['host']} pid {holder.get('pid')} holds the probe lock until "
                           f"{time.ctime(holder['until'])}, yet this host got it too: flock does not reach across "
                           "hosts on this mount (or that check was killed: retry after that time)")
            if subprocess.run([sys.executable, "-c", _SECOND_TAKER, str(probe)]).returncode != 0:
                bad.append("a second process on this host got the lock this one holds")
            for reason in bad:
                out(f"check-lock: FAIL: {reason}")
            if bad:
                return 1
            out("check-lock: OK on this host: flock works and a second process is kept out")
            if hold > 0:
                f.truncate(0)
                f.write(json.dumps({"host": host, "pid": os.getpid(), "until": time.time() + hold}) + "\n")
                f.flush()
                os.fsync(f.fileno())
                out(f"check-lock: holding the probe lock for {hold:g} s: run the same command now on another host "
                    "that mounts this folder; it must say \"kept out\"")
                time.sleep(hold)
            return 0
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m manu_core.io", description="Check that a folder (the "
                                     "artifacts folder on shared storage) gives the file lock the pipeline needs.")
    parser.add_argument("--check-lock", metavar="FOLDER", required=True, type=Path)
    parser.add_argument("--hold", type=float, default=60.0, metavar="SECONDS",
                        help="how long to hold the probe lock for the check from another host (0: this host only)")
    args = parser.parse_args()
    raise SystemExit(check_lock(args.check_lock, args.hold))
