"""The activation store: layout, deterministic atomic writes, schema checks, inspect."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from manu_core.store import (
    ActivationStoreError,
    check_complete,
    format_summary,
    inspect_activations,
    partition_dir,
    write_partition,
)


def put(root, split="forget", form="multimodal", tower="language", layer=0, x=None, part=0, n=3, width=4):
    x = np.arange(n * width, dtype=np.float32).reshape(n, width) / 10 if x is None else x
    ids = [f"{split}-{form}-{part}-{i}" for i in range(len(x))]
    return write_partition(root, split=split, form=form, tower=tower, layer=layer, sample_ids=ids,
                           profile_ids=[f"p{i}" for i in range(len(x))], activations=x, part=part)


def full_store(root, layers=(0, 1), n=3, width=4, vision=True):
    for s in ("forget", "retain"):
        for f in ("multimodal", "text"):
            for layer in layers:
                put(root, s, f, "language", layer, n=n, width=width)
        if vision:
            put(root, s, "multimodal", "vision", 0, n=n, width=2)


def write_raw(path, table):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def ids(n):
    return {"sample_id": [f"s{i}" for i in range(n)], "profile_id": ["p"] * n}


# ----------------------------------------------------------------------------------------------
# Writing


def test_layout_and_round_trip(tmp_path):
    x = np.array([[0.5, -1.0, 2.0], [0.25, 0.0, -3.5]], np.float32)
    path = put(tmp_path, "retain", "text", "language", 7, x=x, part=2)
    assert path == tmp_path / "split=retain/form=text/tower=language/layer=7/part-00002.parquet"
    assert path.parent == partition_dir(tmp_path, "retain", "text", "language", 7)
    t = pq.read_table(path)
    assert t.column_names == ["sample_id", "profile_id", "activation"]
    assert t.schema.field("activation").type.value_type == pa.float32()
    assert t.column("sample_id").to_pylist() == ["retain-text-2-0", "retain-text-2-1"]
    np.testing.assert_array_equal(np.array(t.column("activation").to_pylist(), np.float32), x)
    # Polars reads it straight into an Array column, the form the importance step sums over.
    assert pl.read_parquet(path)["activation"].dtype == pl.Array(pl.Float32, 3)


def test_write_is_byte_deterministic(tmp_path):
    x = np.random.default_rng(0).standard_normal((300, 17)).astype(np.float32)  # > one row group (256 rows)
    a = put(tmp_path / "a", x=x).read_bytes()
    b = put(tmp_path / "b", x=x).read_bytes()
    again = put(tmp_path / "a", x=x).read_bytes()  # rewriting the same part replaces it
    assert a == b == again


def test_a_crash_mid_write_keeps_the_old_file_and_no_part_file_appears(tmp_path, monkeypatch):
    import manu_core.store as store

    old = put(tmp_path, n=2)
    before = old.read_bytes()

    class Crash:  # a ParquetWriter that dies after writing half a file
        def __init__(self, where, schema, **kwargs):
            self.where = where

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write_table(self, table, **kwargs):
            Path(self.where).write_bytes(b"PAR1 half a file")
            raise OSError("disk full")

    monkeypatch.setattr(store.pq, "ParquetWriter", Crash)
    with pytest.raises(OSError, match="disk full"):
        put(tmp_path, n=3)  # rewrite part 0
    with pytest.raises(OSError, match="disk full"):
        put(tmp_path, n=3, part=1)  # a new part
    assert old.read_bytes() == before
    assert sorted(p.name for p in old.parent.iterdir()) == ["part-00000.parquet"]


def test_write_accepts_float64_and_leaves_no_temp_file(tmp_path):
    path = put(tmp_path, x=np.ones((2, 3), np.float64))
    assert sorted(p.name for p in path.parent.iterdir()) == ["part-00000.parquet"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "train"}, "split must be one of forget, retain; got 'train'"),
        ({"form": "image"}, "form must be one of multimodal, text"),
        ({"tower": "audio"}, "tower must be one of language, vision"),
        ({"layer": -1}, "layer must be an integer >= 0; got -1"),
        ({"layer": "3"}, "layer must be an integer"),
        ({"part": -2}, "part must be an integer >= 0"),
        ({"tower": "vision", "form": "text"}, "vision tower has no text-form partition"),
        ({"activations": np.ones(4, np.float32)}, r"shape \(samples, units\)"),
        ({"activations": np.ones((0, 4), np.float32), "sample_ids": [], "profile_ids": []}, "both >= 1"),
        ({"activations": np.ones((2, 2), np.int64)}, "must be a float array"),
        ({"activations": [[1.0, 2.0], [3.0, 4.0]]}, "must be a numpy array"),
        ({"sample_ids": ["a"]}, "sample_ids must have one entry per activation row; got 1 for 2 rows"),
        ({"profile_ids": ["p", 3]}, r"profile_ids\[1\] must be a non-empty string; got 3"),
        ({"sample_ids": "ab"}, "sequence of strings"),
    ],
)
def test_write_rejects_bad_input(tmp_path, kwargs, match):
    args = dict(split="forget", form="multimodal", tower="language", layer=0, sample_ids=["a", "b"],
                profile_ids=["p", "q"], activations=np.ones((2, 2), np.float32))
    with pytest.raises(ActivationStoreError, match=match):
        write_partition(tmp_path, **{**args, **kwargs})


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e39])  # 1e39 overflows float32
def test_write_rejects_non_finite_naming_the_file(tmp_path, bad):
    x = np.ones((2, 3), np.float64)
    x[1, 2] = bad
    with pytest.raises(ActivationStoreError, match=r"row 1, unit 2 of .*layer=0/part-00000\.parquet is (nan|inf|-inf)"):
        put(tmp_path, x=x)
    assert not (tmp_path / "split=forget").exists() or not list((tmp_path / "split=forget").rglob("*.parquet"))


# ----------------------------------------------------------------------------------------------
# Inspect


def test_inspect_and_format_summary(tmp_path):
    full_store(tmp_path, layers=(0, 1, 2), n=3, width=4)
    put(tmp_path, "forget", "multimodal", "language", 0, part=1, n=2)  # a second part: 5 samples there
    s = inspect_activations(tmp_path)
    assert len(s.partitions) == 4 * 3 + 2
    p = s.get("forget", "multimodal", "language", 0)
    assert (p.samples, p.width, [f.part for f in p.parts]) == (5, 4, [0, 1])
    assert s.get("retain", "multimodal", "vision", 0).width == 2
    assert s.get("forget", "text", "vision", 0) is None
    assert s.towers() == ("language", "vision")
    text = format_summary(s)
    lines = text.splitlines()
    assert lines[0].startswith(f"Activations in {tmp_path}: 14 partitions")
    assert lines[1].split() == ["split", "form", "tower", "layers", "#layers", "samples", "width", "files", "size"]
    rows = [line.split()[:8] for line in lines[3:-1]]
    assert ["forget", "multimodal", "language", "0", "1", "5", "4", "2"] in rows
    assert ["forget", "multimodal", "language", "1-2", "2", "3", "4", "2"] in rows
    assert ["retain", "text", "language", "0-2", "3", "3", "4", "3"] in rows
    assert ["retain", "multimodal", "vision", "0", "1", "3", "2", "1"] in rows
    assert "vision has no text form" in lines[-1]


def test_leftover_temp_files_are_ignored(tmp_path):
    path = put(tmp_path)
    (path.parent / ".part-00001.parquet.tmp-123-abcd").write_bytes(b"half a file")
    (path.parent / "part-00002.parquet.tmp").write_bytes(b"half a file")
    (path.parent / "_SUCCESS").write_bytes(b"")
    (tmp_path / ".cache").mkdir()
    s = inspect_activations(tmp_path)
    assert [f.path.name for f in s.partitions[0].parts] == ["part-00000.parquet"]


def test_list_float32_from_another_tool_is_accepted(tmp_path):
    path = partition_dir(tmp_path, "forget", "multimodal", "language", 0) / "part-00000.parquet"
    path.parent.mkdir(parents=True)
    pl.DataFrame({**ids(2), "activation": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], "extra": [1, 2]},
                 schema_overrides={"activation": pl.List(pl.Float32)}).write_parquet(path)
    p = inspect_activations(tmp_path).partitions[0]
    assert (p.samples, p.width, p.parts[0].fixed) == (2, 3, False)


@pytest.mark.parametrize(
    "table, match",
    [
        (pa.table({"sample_id": ["a"], "activation": pa.array([[1.0]], pa.list_(pa.float32()))}), "missing column.s. profile_id"),
        (pa.table({**ids(1), "activation": pa.array([[1.0]], pa.list_(pa.float64()))}), "activation must be a list of float32; got list<element: double>"),
        (pa.table({**ids(1), "activation": pa.array([1.0], pa.float32())}), "activation must be a list of float32; got float"),
        (pa.table({"sample_id": [1], "profile_id": ["p"], "activation": pa.array([[1.0]], pa.list_(pa.float32()))}), "sample_id must be a string; got int64"),
        (pa.table({**ids(2), "activation": pa.array([[1.0, 2.0], [3.0]], pa.list_(pa.float32()))}), r"mismatched widths.*row 1 \(sample 's1'\) has 1\."),
        (pa.table({**ids(2), "activation": pa.array([[1.0], None], pa.list_(pa.float32()))}), r"row 1 \(sample 's1'\) has a null activation list"),
        (pa.table({"sample_id": pa.array([], pa.string()), "profile_id": pa.array([], pa.string()),
                   "activation": pa.array([], pa.list_(pa.float32()))}), "empty part file"),
    ],
)
def test_inspect_rejects_bad_files_naming_them(tmp_path, table, match):
    path = write_raw(partition_dir(tmp_path, "forget", "multimodal", "language", 0) / "part-00000.parquet", table)
    with pytest.raises(ActivationStoreError, match=match) as e:
        inspect_activations(tmp_path)
    assert str(path) in str(e.value)


def test_inspect_rejects_corrupt_file(tmp_path):
    path = put(tmp_path)
    path.write_bytes(path.read_bytes()[:100])  # what a non-atomic writer could leave behind
    with pytest.raises(ActivationStoreError, match=f"{path}: not a readable Parquet file"):
        inspect_activations(tmp_path)


def test_inspect_rejects_mismatched_widths_across_parts(tmp_path):
    put(tmp_path, part=0, width=4)
    second = put(tmp_path, part=1, width=5)
    with pytest.raises(ActivationStoreError, match=f"{second}: width 5 differs from part-00000.parquet's 4.*across parts"):
        inspect_activations(tmp_path)


def test_inspect_rejects_bad_layout(tmp_path):
    with pytest.raises(ActivationStoreError, match="does not exist"):
        inspect_activations(tmp_path / "nope")
    with pytest.raises(ActivationStoreError, match="no activation partitions found"):
        inspect_activations(tmp_path)
    (tmp_path / "split=train").mkdir()
    with pytest.raises(ActivationStoreError, match="split=train: split must be one of forget, retain; got 'train'"):
        inspect_activations(tmp_path)
    (tmp_path / "split=train").rmdir()
    (tmp_path / "split=forget/form=text/tower=language/layer=x").mkdir(parents=True)
    with pytest.raises(ActivationStoreError, match="layer=x: layer must be an integer"):
        inspect_activations(tmp_path)
    (tmp_path / "split=forget/form=text/tower=language/layer=x").rename(tmp_path / "split=forget/form=text/tower=language/layer=3")
    with pytest.raises(ActivationStoreError, match="layer=3: partition folder has no part-\\*.parquet file"):
        inspect_activations(tmp_path)
    put(tmp_path, "forget", "text", "language", 3)
    put(tmp_path, "forget", "text", "language", 3).parent.rename(tmp_path / "split=forget/form=text/tower=language/layer=03")
    put(tmp_path, "forget", "text", "language", 3)
    with pytest.raises(ActivationStoreError, match="layer=03 and .*layer=3 are the same layer"):
        inspect_activations(tmp_path)
    shutil.rmtree(tmp_path / "split=forget/form=text/tower=language")
    (tmp_path / "split=forget/modality=text").mkdir()
    with pytest.raises(ActivationStoreError, match="modality=text: unexpected folder; expected `form=<value>`"):
        inspect_activations(tmp_path)


# ----------------------------------------------------------------------------------------------
# Completeness (what the importance step needs)


def test_complete_store_passes_and_vision_needs_no_text(tmp_path):
    full_store(tmp_path)
    check_complete(inspect_activations(tmp_path))


def test_language_only_store_passes(tmp_path):
    full_store(tmp_path, vision=False)
    check_complete(inspect_activations(tmp_path))


@pytest.mark.parametrize("split, form, tower", [("retain", "text", "language"), ("forget", "multimodal", "language"), ("retain", "multimodal", "vision")])
def test_missing_stream_is_an_error_naming_it(tmp_path, split, form, tower):
    full_store(tmp_path)
    missing = tmp_path / f"split={split}/form={form}/tower={tower}"
    shutil.rmtree(missing)
    with pytest.raises(ActivationStoreError, match=f"{missing}: missing; the {tower} tower needs activations for"):
        check_complete(inspect_activations(tmp_path))


def test_vision_text_partition_is_an_error(tmp_path):
    full_store(tmp_path)
    d = partition_dir(tmp_path, "forget", "text", "vision", 0)
    write_raw(d / "part-00000.parquet", pa.table({**ids(3), "activation": pa.array([[0.0, 0.0]] * 3, pa.list_(pa.float32(), 2))}))
    with pytest.raises(ActivationStoreError, match=f"{d}: the vision tower has no text-form partition"):
        check_complete(inspect_activations(tmp_path))


def test_layer_missing_in_one_stream(tmp_path):
    full_store(tmp_path, layers=(0, 1))
    put(tmp_path, "forget", "text", "language", 5)
    with pytest.raises(ActivationStoreError, match="split=forget/form=multimodal/tower=language/layer=5: missing; layer 5"):
        check_complete(inspect_activations(tmp_path))


def test_widths_must_match_across_streams(tmp_path):
    full_store(tmp_path, layers=(0,), width=4)
    shutil.rmtree(partition_dir(tmp_path, "retain", "text", "language", 0))
    bad = put(tmp_path, "retain", "text", "language", 0, width=6)
    with pytest.raises(ActivationStoreError, match=f"{bad}: width 6 for language layer 0 differs from .*across streams"):
        check_complete(inspect_activations(tmp_path))


def test_sample_counts_must_match_within_a_split_and_form(tmp_path):
    full_store(tmp_path, layers=(0, 1), n=3)
    put(tmp_path, "retain", "text", "language", 1, part=1, n=2)
    with pytest.raises(ActivationStoreError, match="layer=1: 5 samples but .*layer=0 has 3"):
        check_complete(inspect_activations(tmp_path))
