"""The content-addressed cache policy, without a Prefect server."""

import json

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
