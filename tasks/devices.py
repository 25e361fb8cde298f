"""Where model tasks run: device slots, the model and judge each slot keeps loaded, and which process
owns which GPU.

A run's `device` expands to slots (`slot_devices`): `cuda` = every visible GPU, `cuda:k` = that GPU,
anything else itself, each $MANU_DEVICE_SLOTS times (default 1). A model task holds one slot
(`device_slot`) while it runs and has that slot's model (`load`) and judge (`judge_on`) to itself;
the others queue.

Several processes on one machine (a Dask cluster's workers, two flow runs of a process worker) would
each see every GPU and all start on `cuda:0`. So a CUDA slot is *claimed* across processes: the first
task of a process that needs a slot takes an exclusive lock on that slot's file under
$MANU_SLOT_LOCKS (default `<tmp>/manu-slots-<uid>`, one file per host, GPU and copy) and keeps it,
with the model it loads there, for the life of the process; a process claims another slot only when
all of its own are busy, and waits while other processes own them all. So a Dask cluster of as many
workers as GPUs gets one GPU per worker. CPU slots are not claimed (a CPU is shared anyway) unless
$MANU_SLOT_CLAIM=1, which the tests use to stand CPU slots in for GPUs. $MANU_SLOT_RECORD names a
file that gets one JSON line per slot hold (host, pid, slot, device, task): which device each model
task ran on.
"""

from __future__ import annotations

import collections
import gc
import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prefect.context import TaskRunContext

log = logging.getLogger(__name__)

SLOTS_ENV = "MANU_DEVICE_SLOTS"  # slots per device (default 1)
CLAIM_ENV = "MANU_SLOT_CLAIM"  # "1": claim CPU slots across processes too (CUDA slots always are)
LOCKS_ENV = "MANU_SLOT_LOCKS"  # folder of the slot lock files (default <tmp>/manu-slots-<uid>)
RECORD_ENV = "MANU_SLOT_RECORD"  # a file that gets a JSON line per slot hold


@dataclass(frozen=True)
class Slot:
    """One place a model task runs: a concrete device (`cuda:1`, `cpu`), its index among the slots of
    its pool and which copy of that device it is (with $MANU_DEVICE_SLOTS > 1)."""

    index: int
    device: str
    copy: int = 0

    @property
    def claim_name(self) -> str:
        """The slot's lock file name: the same GPU copy under any pool (`cuda` or `cuda:1`)."""
        return f"{socket.gethostname()}-{self.device.replace(':', '')}-{self.copy}.lock"


def slot_devices(device: str) -> list[str]:
    """The slots behind a run's `device`: `cuda` = every visible GPU (`cuda:0`, `cuda:1`, ...), `cuda:k`
    = that GPU, anything else itself; each $MANU_DEVICE_SLOTS times (default 1: one model task per
    device at a time, the others queue)."""
    import torch

    per_device = max(1, int(os.environ.get(SLOTS_ENV) or 1))
    if device == "cuda" and torch.cuda.device_count() > 0:
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    else:
        devices = [device]
    return [d for d in devices for _ in range(per_device)]


def _slots(device: str) -> list[Slot]:
    seen: collections.Counter = collections.Counter()
    slots = []
    for i, d in enumerate(slot_devices(device)):
        slots.append(Slot(i, d, seen[d]))
        seen[d] += 1
    return slots


def _claiming(slot: Slot) -> bool:
    return slot.device.startswith("cuda") or os.environ.get(CLAIM_ENV) == "1"


def locks_dir() -> Path:
    return Path(os.environ.get(LOCKS_ENV) or Path(tempfile.gettempdir()) / f"manu-slots-{os.getuid()}")


_CLAIMED: dict[str, object] = {}  # claim name -> the open, locked file (held for the process's life)


def _try_claim(slot: Slot) -> bool:
    """Take `slot`'s lock without waiting; True when this process owns it (now or already)."""
    import fcntl

    if slot.claim_name in _CLAIMED:
        return True
    path = locks_dir() / slot.claim_name
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return False
    f.truncate(0)
    f.write(f"{socket.gethostname()} {os.getpid()}\n")  # who holds it, for a person looking
    f.flush()
    _CLAIMED[slot.claim_name] = f
    log.info("slot %s (%s) claimed by process %d (%s)", slot.index, slot.device, os.getpid(), path)
    return True


class _Pool:
    """The free slots of one `device` in this process; taking one prefers a slot this process has
    already claimed (its model may still be loaded there), then claims a free one."""

    def __init__(self, slots: list[Slot]):
        self.free, self.cond, self.waiting_logged = list(slots), threading.Condition(), False

    def take(self) -> Slot:
        with self.cond:
            while True:
                mine = [s for s in self.free if not _claiming(s) or s.claim_name in _CLAIMED]
                slot = mine[0] if mine else next((s for s in self.free if _try_claim(s)), None)
                if slot is not None:
                    self.free.remove(slot)
                    return slot
                if self.free and not self.waiting_logged:
                    log.warning("every slot of %s is claimed by another process (lock files in %s); waiting",
                                [s.device for s in self.free], locks_dir())
                    self.waiting_logged = True
                self.cond.wait(timeout=1.0 if self.free else None)  # poll: another process may exit

    def give(self, slot: Slot) -> None:
        with self.cond:
            self.free.append(slot)
            self.free.sort(key=lambda s: s.index)
            self.cond.notify()


_POOLS: dict[str, _Pool] = {}
_POOLS_LOCK = threading.Lock()
_SLOT_MODELS: dict[tuple[str, int], tuple[tuple, object]] = {}
_SLOT_JUDGES: dict[tuple[str, int], tuple[tuple, object]] = {}
_HOLDS: collections.deque = collections.deque(maxlen=100_000)  # (task name, start, end) per slot hold


def quiet_library_bars() -> None:
    """Where stderr is not a terminal (a worker's log, a log file), transformers' and datasets' own
    progress bars ("Loading weights", "Writing model shards", "Casting the dataset") would write their
    carriage-return updates into it; turn them off there (manu_core.progress logs the project's own
    loops as plain lines). A terminal keeps them."""
    if sys.stderr.isatty():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


def slot_holds() -> list[tuple[str, float, float]]:
    """(task name, start, end) in time.time() seconds of the latest device-slot holds in this process:
    how long each model task had its device, without the time it queued for a free slot (a task run's
    Prefect span includes that wait). bench/bench_pipeline.py times the flow's stages with it."""
    return list(_HOLDS)


def _record(slot: Slot, task: str) -> None:
    path = os.environ.get(RECORD_ENV)
    if path:  # one short line per hold, appended in one write (O_APPEND: lines of processes never interleave)
        line = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "slot": slot.index,
                           "device": slot.device, "copy": slot.copy, "task": task}) + "\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


@contextmanager
def device_slot(device: str = "cpu"):
    """Hold one slot of `device` (see `slot_devices`) while running a model; yields the `Slot`. A task
    holding a slot has that slot's model to itself: nothing else runs on it or hooks it meanwhile."""
    with _POOLS_LOCK:
        if device not in _POOLS:
            _POOLS[device] = _Pool(_slots(device))
            quiet_library_bars()  # once per process and device (a Dask worker's first model task)
        pool = _POOLS[device]
    slot = pool.take()
    ctx = TaskRunContext.get()
    name = ctx.task.name if ctx is not None else ""
    _record(slot, name)
    start = time.time()
    try:
        yield slot
    finally:
        _HOLDS.append((name, start, time.time()))
        pool.give(slot)


def load(model_dir: str, slot: Slot, dtype: str | None, device: str = ""):
    """The model at `model_dir` on `slot`'s device, kept loaded in that slot for the next task that
    asks for the same one (one model per slot; `device` names the pool the slot came from)."""
    from manu_core.models import load_model

    key = (str(model_dir), slot.device, dtype)
    held = _SLOT_MODELS.get((device, slot.index))
    if held is None or held[0] != key:
        _SLOT_MODELS.pop((device, slot.index), None)  # free the slot's previous model first
        _SLOT_MODELS[(device, slot.index)] = (key, load_model(model_dir, device=slot.device, dtype=dtype))
    return _SLOT_MODELS[(device, slot.index)][1]


def release(slot: Slot) -> None:
    """Free every model and judge this process keeps on `slot`'s device (whichever pool loaded them):
    before a task loads private copies there (a baseline's trained and frozen models, a relearning)."""
    for cache in (_SLOT_MODELS, _SLOT_JUDGES):
        for key, (held, _) in list(cache.items()):
            if held[1] == slot.device:  # held = (model or judge spec, device, ...)
                cache.pop(key, None)
    gc.collect()
    if slot.device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# The judge: its credential policy and one loaded judge per slot

JUDGE_KEY_ENV = ("MANU_JUDGE_API_KEY", "OPENAI_API_KEY")  # the first one set is the judge's API key
JUDGE_ENDPOINTS_ENV = "MANU_JUDGE_ENDPOINTS"  # hosts the worker lets that key go to (comma-separated)


def judge_for(spec: str, device: str = "cpu"):
    """The judge of an evaluation, with the worker's key and allow-list from its environment
    (manu_core.judge reads none: an endpoint judge gets both from here)."""
    from manu_core.judge import make_judge

    key = next((os.environ[k] for k in JUDGE_KEY_ENV if os.environ.get(k)), None)
    allowed = tuple(h.strip() for h in os.environ.get(JUDGE_ENDPOINTS_ENV, "").split(",") if h.strip())
    return make_judge(spec, device=device, api_key=key, allowed=allowed)


def check_judge(spec: str) -> None:
    """Build the judge `spec` as a run would (the key's destination checked) without loading a model,
    and check that an endpoint judge answers: a bad judge fails before the first model loads."""
    from manu_core.judge import OpenAIJudge, check_reachable

    judge = judge_for(spec)
    if isinstance(judge, OpenAIJudge):
        check_reachable(judge.base_url)


def judge_on(spec: str | None, slot: Slot, device: str = ""):
    """The judge `spec` on `slot`, built once per slot and kept (an `hf:` judge is a model: loading it
    for every evaluation unit would cost a load per unit)."""
    key = (spec, slot.device)
    held = _SLOT_JUDGES.get((device, slot.index))
    if held is None or held[0] != key:
        _SLOT_JUDGES.pop((device, slot.index), None)
        _SLOT_JUDGES[(device, slot.index)] = (key, judge_for(spec, device=slot.device))
    return _SLOT_JUDGES[(device, slot.index)][1]
