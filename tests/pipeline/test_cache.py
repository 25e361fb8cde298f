"""The content-addressed cache policy (and, where said, its key lock in a flow)."""

import json
from pathlib import Path

import pytest

from tasks.cache import check_done, code_digest, content_digest, finish, stage_key


def test_content_digest_follows_bytes_not_names(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "x.bin").write_bytes(b"same")
    assert content_digest(a) == content_digest(b)
    (b / "x.bin").write_bytes(b"diff")
    assert content_digest(a) != content_digest(b)
    f = tmp_path / "f.txt"
    f.write_text("1")
    d1 = content_digest(f)
    f.write_text("2")  # rewritten in place: another digest
    assert content_digest(f) != d1
    with pytest.raises(FileNotFoundError, match="must be an existing file or folder"):
        content_digest(tmp_path / "missing")


def test_finished_folder_is_named_by_its_record(tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "p.parquet").write_bytes(b"abc")
    extra = tmp_path / "model"
    extra.mkdir()
    (extra / "w.safetensors").write_bytes(b"weights")
    finish(out, outputs=[extra])
    record = json.loads((out / "_manu_done.json").read_text())
    assert {f["path"] for f in record["files"]} == {"sub/p.parquet", str(extra / "w.safetensors")}
    assert content_digest(out).startswith("done:")
    assert check_done(out) is None
    (out / "sub" / "p.parquet").write_bytes(b"ab")  # damaged (truncated)
    assert "has 2 bytes, 3 were written" in check_done(out)
    (out / "sub" / "p.parquet").write_bytes(b"abc")
    assert check_done(out) is None  # rewritten with the same bytes: content checked, still whole
    (out / "sub" / "p.parquet").write_bytes(b"abd")  # damaged, same size
    assert "was changed after it was written (its sha256 differs" in check_done(out)
    (out / "sub" / "p.parquet").write_bytes(b"abc")
    (extra / "w.safetensors").unlink()  # an output elsewhere deleted
    assert "was deleted" in check_done(out)
    assert "is missing" in check_done(tmp_path)


def test_stage_key_covers_parameters_paths_and_code(tmp_path):
    f = tmp_path / "in.txt"
    f.write_text("x")
    k = stage_key("t", {"p": f"{f}", "alpha": 0.1, "progress": True}, paths=("p",), ignore=("progress",))
    assert k.startswith("t-") and k == stage_key("t", {"p": str(f), "alpha": 0.1, "progress": False},
                                                 paths=("p",), ignore=("progress",))
    assert k != stage_key("t", {"p": str(f), "alpha": 0.2}, paths=("p",))
    assert k != stage_key("u", {"p": str(f), "alpha": 0.1}, paths=("p",))
    f.write_text("y")
    assert k != stage_key("t", {"p": str(f), "alpha": 0.1}, paths=("p",))
    assert len(code_digest()) == 64


def test_presentation_code_is_hashed_only_by_the_report_tasks(tmp_path):
    """Restyling a figure must not rerun extraction or evaluation: the figure/report modules are
    left out of every other task's code digest (and each listed file exists, so a rename can't
    silently put one back)."""
    from tasks.cache import PRESENTATION, REPO

    assert all((REPO / p).is_file() for p in PRESENTATION)
    assert code_digest(False) != code_digest(True)
    inputs = {"alpha": 0.1}
    assert stage_key("t", inputs) == stage_key("t", inputs, presentation=False) != stage_key("t", inputs, presentation=True)


@pytest.mark.usefixtures("prefect_harness")
def test_two_runs_of_one_key_write_one_at_a_time(tmp_path):
    """Two task runs with the same cache key at once (two users, or a retry beside a slow first
    attempt): the key lock lets one write at a time, and both end with the same complete folder."""
    import threading
    import time

    from prefect import flow

    from tasks.cache import stage_dir
    from tasks.stages import manu_task

    guard, active, peak = threading.Lock(), [0], [0]

    @manu_task(name="lock_probe")
    def probe(x: int, token: str) -> str:
        out = stage_dir()
        with guard:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.3)
        (out / "value.txt").write_text(str(x))
        with guard:
            active[0] -= 1
        return str(finish(out))

    @flow
    def twice(token: str):
        a, b = probe.submit(7, token), probe.submit(7, token)
        return a.result(), b.result()

    first, second = twice(str(tmp_path))  # a fresh key per test session
    assert first == second and peak[0] == 1
    assert (Path(first) / "value.txt").read_text() == "7" and check_done(first) is None
