"""Device slots claimed across processes (tasks/devices.py): two processes never share a slot, a
third waits for one to exit; CPU slots stand in for GPUs (MANU_SLOT_CLAIM=1)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tasks import devices

REPO = Path(__file__).resolve().parents[2]
HOLDER = """
import json, sys, time
from pathlib import Path
from tasks.devices import device_slot
out, release = Path(sys.argv[1]), Path(sys.argv[2])
with device_slot("cpu") as slot:
    pass
with device_slot("cpu") as again:  # a second task of the same process: the slot it already owns
    pass
out.write_text(json.dumps([slot.index, again.index, time.time()]))
while not release.exists():
    time.sleep(0.05)
"""


def _start(tmp: Path, name: str, env: dict) -> tuple[subprocess.Popen, Path, Path]:
    out, release = tmp / f"{name}.json", tmp / f"{name}.release"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(release)], cwd=REPO, env=env)
    return proc, out, release


def _wait(path: Path, timeout: float = 60.0) -> list:
    end = time.time() + timeout
    while not path.exists() or not path.read_text():
        assert time.time() < end, f"{path} never written"
        time.sleep(0.05)
    return json.loads(path.read_text())


def test_processes_claim_distinct_slots_and_wait_for_a_free_one(tmp_path):
    env = {**os.environ, "MANU_DEVICE_SLOTS": "2", "MANU_SLOT_CLAIM": "1", "MANU_SLOT_LOCKS": str(tmp_path / "locks"),
           "OMP_NUM_THREADS": "1"}
    a, a_out, a_release = _start(tmp_path, "a", env)
    b, b_out, b_release = _start(tmp_path, "b", env)
    c = None
    try:
        first, second = _wait(a_out), _wait(b_out)
        assert first[0] == first[1] and second[0] == second[1]  # each process keeps its own slot
        assert {first[0], second[0]} == {0, 1}  # and no two share one
        holders = {int(f.read_text().split()[1]) for f in (tmp_path / "locks").iterdir()}
        assert holders == {a.pid, b.pid}  # each lock file names the process holding it
        c, c_out, c_release = _start(tmp_path, "c", env)
        time.sleep(3)
        assert not c_out.exists()  # both slots owned by live processes: the third waits
        freed = first[0]
        a_release.touch()
        a.wait(timeout=30)
        third = _wait(c_out)
        assert third[0] == freed and third[2] > first[2]  # it got the slot the exited process held
        b_release.touch()
        c_release.touch()
    finally:
        for p in (a, b, c):
            if p is not None:
                p.kill() if p.poll() is None else None


def test_cpu_slots_are_not_claimed_by_default(tmp_path, monkeypatch):
    """Without MANU_SLOT_CLAIM a CPU slot takes no lock (every process may share the CPU)."""
    monkeypatch.delenv("MANU_SLOT_CLAIM", raising=False)
    monkeypatch.setenv("MANU_SLOT_LOCKS", str(tmp_path / "locks"))
    monkeypatch.setattr(devices, "_POOLS", {})
    with devices.device_slot("cpu") as slot:
        assert slot.device == "cpu"
    assert not (tmp_path / "locks").exists()


def test_slot_record_names_the_device_each_hold_ran_on(tmp_path, monkeypatch):
    monkeypatch.setenv("MANU_SLOT_RECORD", str(tmp_path / "slots.jsonl"))
    monkeypatch.setattr(devices, "_POOLS", {})
    with devices.device_slot("cpu"):
        pass
    (line,) = (tmp_path / "slots.jsonl").read_text().splitlines()
    assert json.loads(line) | {"pid": 0, "host": ""} == {"pid": 0, "host": "", "slot": 0, "device": "cpu", "copy": 0,
                                                         "task": ""}


def test_release_frees_the_models_and_judges_on_a_device(monkeypatch):
    slot = devices.Slot(0, "cpu")
    monkeypatch.setattr(devices, "_SLOT_MODELS", {("cpu", 0): (("m", "cpu", None), object()),
                                                  ("cuda", 1): (("m", "cuda:1", None), object())})
    monkeypatch.setattr(devices, "_SLOT_JUDGES", {("cpu", 0): (("hf:/j", "cpu"), object())})
    devices.release(slot)
    assert list(devices._SLOT_MODELS) == [("cuda", 1)] and not devices._SLOT_JUDGES


def test_one_judge_per_slot(monkeypatch):
    built = []
    monkeypatch.setattr(devices, "_SLOT_JUDGES", {})
    monkeypatch.setattr(devices, "judge_for", lambda spec, device="cpu": built.append((spec, device)) or object())
    slot = devices.Slot(0, "cpu")
    j1, j2 = devices.judge_on("hf:/judge", slot, "cpu"), devices.judge_on("hf:/judge", slot, "cpu")
    assert j1 is j2 and built == [("hf:/judge", "cpu")]


def test_library_progress_bars_are_off_in_a_log_and_kept_on_a_terminal(monkeypatch):
    """transformers' and datasets' own bars write carriage returns into a worker's log: off there."""
    import datasets
    from transformers.utils import logging as hf_logging

    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    try:
        hf_logging.enable_progress_bar()
        datasets.enable_progress_bars()
        monkeypatch.setattr("sys.stderr", Stream(True))
        devices.quiet_library_bars()
        assert hf_logging.is_progress_bar_enabled() and datasets.is_progress_bar_enabled()
        monkeypatch.setattr("sys.stderr", Stream(False))
        devices.quiet_library_bars()
        assert not hf_logging.is_progress_bar_enabled() and not datasets.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
        datasets.enable_progress_bars()
