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


def test_every_file_inside_an_atomic_folder_gets_the_umask(tmp_path, umask):
    """Whatever mode a writer gives the files it creates inside the temporary folder (safetensors:
    0600), the folder appears with the modes `open()` and `mkdir()` give under the umask; an
    executable stays executable, a symlink is left alone."""
    umask(0o022)
    outside = tmp_path / "outside.txt"
    outside.write_text("not ours")
    os.chmod(outside, 0o600)
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "sub").mkdir(mode=0o700)
        for p, m in ((tmp / "weights.bin", 0o600), (tmp / "sub" / "deep.bin", 0o400), (tmp / "run.sh", 0o700)):
            p.write_bytes(b"x")
            os.chmod(p, m)
        (tmp / "link").symlink_to(outside)
    out = tmp_path / "model"
    assert mode(out) == mode(out / "sub") == 0o755
    assert mode(out / "weights.bin") == mode(out / "sub" / "deep.bin") == 0o644
    assert mode(out / "run.sh") == 0o755
    assert mode(outside) == 0o600  # not followed through the link


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)],
                         ids=["umask022", "umask077"])
def test_a_saved_pruned_model_is_readable_as_the_umask_allows(tmp_path, umask, mask, file_mode, dir_mode):
    """safetensors writes model.safetensors 0600 whatever the umask; under umask 022 a colleague on a
    shared server must still be able to load the pruned model."""
    from manu_core import data as mdata
    from manu_core.models import TinySpec, build_processor, build_tiny_model, train_tokenizer
    from manu_core.prune import prune_units, save_pruned
    from tests.core.helpers import SMALL

    ds = mdata.build_dataset(forget=["001"], n_profiles=2, n_celebrities=0)
    tok = train_tokenizer([f"{s.question} {s.answer}" for p in ds.profiles for s in mdata.samples(p)], 256)
    spec = TinySpec(arch="llava", **SMALL)
    model, proc = build_tiny_model(spec, tok, seed=0).eval(), build_processor(spec, tok)
    selection = [("language", 0, 1), ("language", 1, 2)]
    umask(mask)
    out = save_pruned(model, proc, selection, tmp_path / "pruned", report=prune_units(model, selection))
    assert (out / "model.safetensors").is_file()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {mode(p) for p in files} == {file_mode}, {p.name: oct(mode(p)) for p in files}
    assert mode(out) == dir_mode


# The lock rule the pipeline relies on (a task key's lock, a preset's training; on shared storage, across
# hosts): `file_lock` is flock(2), so two processes exclude each other, and a holder that dies, even by
# kill -9, releases the lock with its open file; there is no stale lock to clear.

_TAKER = """import json, sys, time
from pathlib import Path
from manu_core.io import file_lock

lock, go, log = sys.argv[1:4]
Path(log + ".ready").touch()
while not Path(go).exists():
    time.sleep(0.002)
spans = []
for _ in range(3):
    tried = time.monotonic()
    with file_lock(lock):
        entered = time.monotonic()
        time.sleep(0.1)
        spans.append((tried, entered, time.monotonic()))
Path(log).write_text(json.dumps(spans))
"""


def _wait_for(path, proc, timeout=20.0):
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the lock taker exited early ({proc.returncode})"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def test_two_processes_hold_a_file_lock_in_turn(tmp_path):
    """Two processes, started together, each take the same lock three times: no two holds overlap
    (CLOCK_MONOTONIC is one clock for every process of the host), and they did contend."""
    import json
    import subprocess
    import sys

    lock, go = tmp_path / "pipeline" / "task" / ".key.lock", tmp_path / "go"
    logs = [tmp_path / f"taker{i}.json" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", _TAKER, str(lock), str(go), str(log)]) for log in logs]
    try:
        for proc, log in zip(procs, logs):
            _wait_for(log.with_name(log.name + ".ready"), proc)
        go.touch()
        assert [p.wait(timeout=30) for p in procs] == [0, 0]
    finally:
        for p in procs:
            p.kill() if p.poll() is None else None
            p.wait()
    spans = sorted((entered, left, i) for i, log in enumerate(logs) for _, entered, left in json.loads(log.read_text()))
    for (_, left, _), (entered, _, _) in zip(spans, spans[1:]):
        assert entered >= left, spans
    waited = max(entered - tried for log in logs for tried, entered, _ in json.loads(log.read_text()))
    assert waited > 0.05, "the two processes never contended for the lock: the test proved nothing"


def test_a_lock_whose_holder_was_killed_is_free_at_once(tmp_path):
    """The stale-lock rule: a holder killed by SIGKILL (no cleanup runs) leaves no lock behind; the
    next taker gets it at once. `lock_held`, the fanned-out sweep's liveness probe, reads the same."""
    import fcntl
    import signal
    import subprocess
    import sys
    import threading
    import time

    from manu_core.io import file_lock, lock_held

    lock, held = tmp_path / ".key.lock", tmp_path / "held"
    assert not lock_held(lock) and not lock.exists()  # no file: nobody holds it, and the probe makes none
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from manu_core.io import file_lock\nwith file_lock(sys.argv[1]):\n"
                               "    Path(sys.argv[2]).touch()\n    time.sleep(120)", str(lock), str(held)])
    try:
        _wait_for(held, holder)
        with open(lock, "a") as f:  # flock conflicts between open files, even in one process
            with pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert lock_held(lock)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        assert not lock_held(lock)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    took = []

    def take():
        t0 = time.monotonic()
        with file_lock(lock):
            took.append(time.monotonic() - t0)

    t = threading.Thread(target=take, daemon=True)
    t.start()
    t.join(timeout=5)
    assert took and took[0] < 1.0, f"the lock of a killed holder was not released: {took}"


def test_a_filesystem_that_refuses_flock_gets_the_rule_and_the_check(tmp_path, monkeypatch):
    """NFSv3 without lockd answers flock with ENOLCK: the error says what the folder must give and
    how to check it, not a bare "No locks available"."""
    import errno
    import fcntl

    from manu_core.io import file_lock

    def refuse(f, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", refuse)
    with pytest.raises(OSError, match=r"refused flock \(No locks available\).*NFSv4.*--check-lock") as e:
        with file_lock(tmp_path / ".key.lock"):
            pass
    assert e.value.errno == errno.ENOLCK


def test_check_lock_here_and_against_a_holder(tmp_path):
    """`python -m manu_core.io --check-lock`: passes on a local folder; says "kept out" while another
    check holds the probe lock; fails when it got the lock that another host's check says it holds
    (what a `nolock` NFS mount would let happen)."""
    import json
    import subprocess
    import sys
    import time

    from manu_core.io import check_lock

    lines = []
    assert check_lock(tmp_path, hold=0, out=lines.append) == 0, lines
    assert "OK on this host" in lines[-1]

    holder = subprocess.Popen([sys.executable, "-m", "manu_core.io", "--check-lock", str(tmp_path), "--hold", "60"],
                              stdout=subprocess.PIPE, text=True)
    try:
        while "holding the probe lock" not in (line := holder.stdout.readline()):
            assert line, "the holding check exited early"
        lines = []
        assert check_lock(tmp_path, hold=0, out=lines.append) == 0, lines
        assert f"kept out (OK): host {os.uname().nodename} pid {holder.pid}" in lines[-1], lines
    finally:
        holder.kill()
        holder.wait()

    (tmp_path / ".manu-lock-check").write_text(json.dumps({"host": "other-host", "pid": 7, "until": time.time() + 60}))
    lines = []
    assert check_lock(tmp_path, hold=0, out=lines.append) == 1
    assert any("host other-host pid 7" in line and "does not reach across hosts" in line for line in lines), lines
