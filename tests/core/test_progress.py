"""Progress of long loops: tqdm's live bar on a terminal; a plain line every few percent anywhere else
(a log file, a Prefect worker), where carriage-return updates pile up into one enormous line."""

import io
import re
import subprocess
import sys

from tqdm import tqdm

from manu_core.progress import LineProgress, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_the_live_bar():
    term = Terminal()
    bar = progress(total=50, desc="extract", unit="batch", file=term)
    assert isinstance(bar, tqdm)
    for _ in range(50):
        bar.update(1)
    bar.close()
    out = term.getvalue()
    assert "\r" in out and "extract" in out and "50/50" in out  # redrawn in place


def test_a_log_gets_a_plain_line_every_ten_percent():
    log = io.StringIO()  # not a terminal: a file, a pipe, a worker's relayed output
    bar = progress(total=200, desc="generate", unit="q", file=log)
    assert isinstance(bar, LineProgress)
    for i in range(200):
        if i == 99:
            bar.set_postfix(loss="0.123")  # shown from the next line on
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 10, lines
    assert [int(re.match(r"generate: +(\d+)%", line).group(1)) for line in lines] == list(range(10, 101, 10))
    assert re.fullmatch(r"generate: +50% \(100/200 q, \d+ s, ~\d+ s left, loss=0\.123\)", lines[4]), lines[4]
    assert re.fullmatch(r"generate: 100% \(200/200 q, \d+ s, loss=0\.123\)", lines[-1]), lines[-1]


def test_an_iterable_reports_as_it_goes_and_where_it_stopped():
    log = io.StringIO()
    assert list(progress(range(7), desc="lens", unit="sample", file=log, every=25)) == list(range(7))
    pcts = [int(re.match(r"lens: +(\d+)%", line).group(1)) for line in log.getvalue().splitlines()]
    assert pcts == [29, 57, 86, 100]  # the first count at or past each multiple of 25%, once each
    # big steps cross several multiples at once: one line each time, not one per multiple
    log = io.StringIO()
    bar = progress(total=10, desc="sums", file=log, every=5)
    bar.update(6)
    bar.update(4)
    bar.close()
    assert len(log.getvalue().splitlines()) == 2
    # a loop left early says where it stopped
    log = io.StringIO()
    for i in progress(range(100), desc="train", unit="step", file=log):
        if i == 14:
            break
    assert log.getvalue().splitlines()[-1].startswith("train:  14% (14/100 step")  # 14 done, the 15th under way


def test_disabled_writes_nothing():
    log, term = io.StringIO(), Terminal()
    for stream in (log, term):
        bar = progress(total=3, desc="x", disable=True, file=stream)
        bar.update(3)
        bar.close()
        assert list(progress(range(3), disable=True, file=stream)) == [0, 1, 2]
    assert log.getvalue() == term.getvalue() == ""


def test_the_default_stream_is_stderr_at_call_time():
    """A worker's relayed output: stderr is a pipe, and the pipeline's progress comes out as lines."""
    code = ("from manu_core.progress import progress\n"
            "bar = progress(total=40, desc='extract forget/text', unit='batch')\n"
            "for _ in range(40): bar.update(1)\n"
            "bar.close()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 10 and "\r" not in out.stderr, out.stderr
    assert lines[-1].startswith("extract forget/text: 100% (40/40 batch")
