"""Progress of the loops a person waits on (training, extraction, evaluation, the logit lens, sums).

    for batch in progress(batches, desc="extract", unit="batch"): ...
    bar = progress(total=n, desc="generate", unit="q"); bar.update(k); bar.set_postfix(loss="0.12"); bar.close()

On a terminal (and in a notebook) this is tqdm's live bar. Anywhere else (a log file, a Prefect worker
relaying a flow run's output, CI) tqdm's carriage-return updates pile up into one line of megabytes, so
there it writes a plain line every `every` percent instead, to the same stream:

    extract forget/multimodal: 40% (16/40 batch, 12 s, ~18 s left)

The object has the part of tqdm's interface the project uses: iteration, `update`, `set_postfix`,
`close`, and `with`.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Iterable, Optional

from tqdm import tqdm


def _is_terminal(stream: IO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _in_notebook(stream: IO) -> bool:
    """A Jupyter kernel's output stream (not a tty, but it shows tqdm.auto's widget bar)."""
    return type(stream).__module__.split(".")[0] == "ipykernel"


def progress(iterable: Optional[Iterable] = None, *, total: Optional[float] = None, desc: str = "",
             unit: str = "it", disable: bool = False, every: float = 10.0, file: Optional[IO] = None):
    """tqdm on a terminal (tqdm.auto in a notebook), else `LineProgress`: a plain line each `every` percent.
    `file`: the stream (default: sys.stderr at call time, as tqdm's)."""
    file = file if file is not None else sys.stderr
    if disable:
        return tqdm(iterable, total=total, disable=True)
    if _in_notebook(file):
        from tqdm.auto import tqdm as tqdm_auto  # the widget bar (imports IPython: only here)

        return tqdm_auto(iterable, total=total, desc=desc, unit=unit)
    if _is_terminal(file):
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=file)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, every=every, file=file)


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


class LineProgress:
    """A progress report in plain lines: one each time the count crosses a multiple of `every` percent of
    `total` (and at the end); without a total, one every `interval` seconds and at the end."""

    def __init__(self, iterable: Optional[Iterable] = None, *, total: Optional[float] = None, desc: str = "",
                 unit: str = "it", every: float = 10.0, file: Optional[IO] = None, interval: float = 30.0):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc or "progress", unit
        self.every, self.interval = every, interval
        self.file = file if file is not None else sys.stderr
        self.n = 0
        self.postfix = ""
        self.start = self.last_time = time.monotonic()
        self.next_pct = every  # the next percentage that gets a line
        self.written = -1  # the count of the last line written
        self.closed = False

    def __iter__(self):
        try:
            for item in self.iterable:  # type: ignore[union-attr]
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix(self, **kw) -> None:
        """Shown after the counts of the next line (a loss, an epoch)."""
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.total:
            pct = 100.0 * self.n / self.total
            if pct >= self.next_pct or self.n >= self.total:
                self.next_pct = (pct // self.every + 1) * self.every  # one line, however many steps were crossed
                self._write(now)
        elif now - self.last_time >= self.interval:
            self._write(now)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n != self.written:  # the last count gets its line (an unfinished loop says where it stopped)
                self._write(time.monotonic())

    def line(self, now: Optional[float] = None) -> str:
        elapsed = (now if now is not None else time.monotonic()) - self.start
        n = f"{self.n:g}"
        if self.total:
            parts = [f"{n}/{self.total:g} {self.unit}", _seconds(elapsed)]
            if 0 < self.n < self.total:
                parts.append(f"~{_seconds(elapsed * (self.total - self.n) / self.n)} left")
            head = f"{self.desc}: {100.0 * self.n / self.total:3.0f}%"
        else:
            parts, head = [f"{n} {self.unit}", _seconds(elapsed)], f"{self.desc}:"
        if self.postfix:
            parts.append(self.postfix)
        return f"{head} ({', '.join(parts)})"

    def _write(self, now: float) -> None:
        self.file.write(self.line(now) + "\n")
        self.file.flush()
        self.written, self.last_time = self.n, now
