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
    shared server must still be able to load the pruned model (issue 29)."""
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
