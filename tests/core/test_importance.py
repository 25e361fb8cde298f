"""Importance, score and selection (method.md, "Importance functions" and "Score and selection")."""

from __future__ import annotations

import math
import re
import shutil
from fractions import Fraction

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import manu_core.importance as importance
from manu_core.importance import (
    OUTPUT_COLUMNS,
    ImportanceParams,
    Weights,
    compute_importance,
    importance_table,
    neuron_sums,
    parse_weights,
    write_importance,
)
from manu_core.store import ActivationStoreError, partition_dir, write_partition


def put(root, split, form, tower, layer, x, part=0):
    x = np.asarray(x, np.float32)
    names = [f"{split}-{form}-{part}-{i}" for i in range(len(x))]
    return write_partition(root, split=split, form=form, tower=tower, layer=layer, sample_ids=names,
                           profile_ids=names, activations=x, part=part)


def random_store(root, rng, n=(5, 4, 6, 3), layers=2, width=7, vision=True, parts=2):
    """Random activations; stream sizes differ per (split, form); returns {(split, form, tower, layer): (n, w) array}."""
    data = {}
    streams = [("forget", "multimodal"), ("forget", "text"), ("retain", "multimodal"), ("retain", "text")]
    for (s, f), rows in zip(streams, n):
        towers = [("language", layers, width)] + ([("vision", 1, 3)] if vision and f == "multimodal" else [])
        for tower, nl, w in towers:
            for layer in range(nl):
                x = rng.normal(0, 0.2, (rows, w)).astype(np.float32)
                data[(s, f, tower, layer)] = x
                for p, chunk in enumerate(np.array_split(x, parts)):
                    put(root, s, f, tower, layer, chunk, part=p)
    return data


# ----------------------------------------------------------------------------------------------
# A case to check on paper: 3 language neurons, 2 samples per stream, τ = 0.1, ε = 0
#
#              forget/multimodal   forget/text     retain (both forms)
#   unit 0:    0.5,  0.25          0.25, 0.25      0.5, -0.5
#   unit 1:   -0.5,  0.5           0,    0         0.5, -0.5
#   unit 2:    0.0625, 0.0625      0.25, 0.25      0.5, -0.5
# (all exact in binary, so float32 storage changes nothing)

FORGET_M = [[0.5, -0.5, 0.0625], [0.25, 0.5, 0.0625]]
FORGET_T = [[0.25, 0, 0.25], [0.25, 0, 0.25]]
RETAIN = [[0.5, 0.5, 0.5], [-0.5, -0.5, -0.5]]


@pytest.fixture
def paper_store(tmp_path):
    put(tmp_path, "forget", "multimodal", "language", 0, FORGET_M)
    put(tmp_path, "forget", "text", "language", 0, FORGET_T)
    put(tmp_path, "retain", "multimodal", "language", 0, RETAIN)
    put(tmp_path, "retain", "text", "language", 0, RETAIN)
    return tmp_path


def test_hand_computed_sums(paper_store):
    s = neuron_sums(paper_store, tau=0.1).filter(split="forget", form="multimodal")
    assert s["count"].to_list() == [2, 2, 2]
    assert s["sum_abs"].to_list() == [0.75, 1.0, 0.125]  # 0.5+0.25, 0.5+0.5, 0.0625+0.0625
    assert s["sum"].to_list() == [0.75, 0.0, 0.125]  # 0.5+0.25, -0.5+0.5, 0.0625+0.0625
    assert s["sum_sq"].to_list() == [0.3125, 0.5, 0.0078125]  # 0.25+0.0625, 0.25+0.25, 2·0.00390625
    assert s["count_active"].to_list() == [2, 2, 0]  # 0.0625 <= τ = 0.1


def test_hand_computed_importances(paper_store):
    df = compute_importance(paper_store, ImportanceParams(eps=0.0, alpha=0.5))
    # I_abs = |A_m − A_t| / (A_m + A_t):
    #   unit 0: A_m = 0.375, A_t = 0.25    -> 0.125 / 0.625 = 0.2
    #   unit 1: A_m = 0.5,   A_t = 0       -> 0.5 / 0.5 = 1
    #   unit 2: A_m = 0.0625, A_t = 0.25   -> 0.1875 / 0.3125 = 0.6
    assert df["forget_abs"].to_list() == pytest.approx([0.2, 1.0, 0.6], abs=1e-12)
    # I_freq = |N_m − N_t| / (N_m + N_t): counts of |z| > 0.1: (2,2) -> 0; (2,0) -> 1; (0,2) -> 1
    assert df["forget_freq"].to_list() == pytest.approx([0.0, 1.0, 1.0], abs=1e-12)
    # I_var = sqrt(V_m + V_t), population variance:
    #   unit 0: V_m = (0.125² + 0.125²)/2 = 0.015625, V_t = 0  -> 0.125
    #   unit 1: V_m = (0.25 + 0.25)/2 − 0² = 0.25, V_t = 0     -> 0.5
    #   unit 2: V_m = 0, V_t = 0                               -> 0
    assert df["forget_var"].to_list() == pytest.approx([0.125, 0.5, 0.0], abs=1e-12)
    # I_rms = sqrt(|Q_m − Q_t| / (Q_m + Q_t)), Q = mean z²:
    #   unit 0: Q_m = 0.3125/2 = 0.15625, Q_t = 0.0625 -> sqrt(0.09375 / 0.21875) = sqrt(3/7)
    #   unit 1: Q_m = 0.25, Q_t = 0                    -> sqrt(1) = 1
    #   unit 2: Q_m = 0.00390625, Q_t = 0.0625         -> sqrt(0.05859375 / 0.06640625) = sqrt(15/17)
    rms = [math.sqrt(3 / 7), 1.0, math.sqrt(15 / 17)]
    assert df["forget_rms"].to_list() == pytest.approx(rms, abs=1e-12)
    forget = [0.2 + 0 + 0.125 + rms[0], 1 + 1 + 0.5 + 1, 0.6 + 1 + 0 + rms[2]]  # = 0.980, 3.5, 2.539
    assert df["forget_importance"].to_list() == pytest.approx(forget, abs=1e-12)
    # Retain: both forms identical -> abs = freq = rms = 0; V_m = V_t = 0.25 -> I_var = sqrt(0.5)
    assert df["retain_abs"].to_list() == [0.0] * 3
    assert df["retain_freq"].to_list() == [0.0] * 3
    assert df["retain_rms"].to_list() == [0.0] * 3
    assert df["retain_importance"].to_list() == pytest.approx([math.sqrt(0.5)] * 3, abs=1e-12)
    # S = I_f / I_r; ranks by descending score: unit 1 (4.95), unit 2 (3.59), unit 0 (1.39)
    assert df["score"].to_list() == pytest.approx([f / math.sqrt(0.5) for f in forget], abs=1e-12)
    assert df["rank"].to_list() == [3, 1, 2]
    assert df["selected"].to_list() == [False, True, False]  # k = ⌊0.5·3⌋ = 1


def test_hand_computed_with_unequal_stream_sizes(tmp_path):
    """Means where method.md says mean, counts where it says count: with M != T a sum-based A or Q, or
    a share-based N, gives other numbers. One unit, ε = 0, τ = 0.1:
    forget: image+text 0.5, 0.25, 0 (M = 3), text 0.75 (T = 1); retain: image+text 0.5, -0.5 (M = 2),
    text 0.5, -0.5, 0.5, -0.5 (T = 4)."""
    put(tmp_path, "forget", "multimodal", "language", 0, [[0.5], [0.25], [0.0]])
    put(tmp_path, "forget", "text", "language", 0, [[0.75]])
    put(tmp_path, "retain", "multimodal", "language", 0, [[0.5], [-0.5]])
    put(tmp_path, "retain", "text", "language", 0, [[0.5], [-0.5], [0.5], [-0.5]])
    df = compute_importance(tmp_path, ImportanceParams(eps=0.0, alpha=0.5))
    # A_m = 0.75/3 = 0.25, A_t = 0.75 -> 0.5 / 1.0 (sums 0.75 vs 0.75 would give 0)
    assert df["forget_abs"][0] == pytest.approx(0.5, abs=1e-12)
    # N_m = 2 (0 is not > τ), N_t = 1 -> 1/3 (shares 2/3 vs 1 would give 0.2)
    assert df["forget_freq"][0] == pytest.approx(1 / 3, abs=1e-12)
    # V_m = (0.25 + 0.0625 + 0)/3 − 0.25² = 1/24, V_t = 0
    assert df["forget_var"][0] == pytest.approx(math.sqrt(1 / 24), abs=1e-12)
    # Q_m = 0.3125/3 = 5/48, Q_t = 27/48 -> sqrt(22/32) (sums 0.3125 vs 0.5625 would give sqrt(2/7))
    assert df["forget_rms"][0] == pytest.approx(math.sqrt(11 / 16), abs=1e-12)
    forget = 0.5 + 1 / 3 + math.sqrt(1 / 24) + math.sqrt(11 / 16)
    # retain: A 0.5 vs 0.5 -> 0; N 2 vs 4 -> 2/6; V 0.25 and 0.25 -> sqrt(0.5); Q 0.25 vs 0.25 -> 0
    assert df["retain_abs"][0] == 0.0 and df["retain_rms"][0] == 0.0
    assert df["retain_freq"][0] == pytest.approx(1 / 3, abs=1e-12)
    retain = 1 / 3 + math.sqrt(0.5)
    assert df["retain_importance"][0] == pytest.approx(retain, abs=1e-12)
    assert df["score"][0] == pytest.approx(forget / retain, abs=1e-12)


def test_hand_computed_with_default_eps(paper_store):
    df = compute_importance(paper_store, ImportanceParams())
    eps = 1e-5
    assert df["forget_abs"][0] == pytest.approx(0.125 / (0.625 + eps), rel=1e-12)
    assert df["forget_freq"][1] == pytest.approx(2 / (2 + eps), rel=1e-12)
    assert df["forget_rms"][2] == pytest.approx(math.sqrt(0.05859375 / (0.06640625 + eps)), rel=1e-12)
    assert df["score"][1] == pytest.approx(df["forget_importance"][1] / (math.sqrt(0.5) + eps), rel=1e-12)


def test_weights_drop_a_function(paper_store):
    df = compute_importance(paper_store, ImportanceParams(eps=0.0, weights="freq=0,var=2"))
    expected = df["forget_abs"] + 2 * df["forget_var"] + df["forget_rms"]
    assert df["forget_importance"].to_list() == pytest.approx(expected.to_list(), abs=1e-12)


# ----------------------------------------------------------------------------------------------
# Polars sums against a direct torch computation


@pytest.mark.parametrize("chunk_values", [importance.CHUNK_VALUES, 10])  # 10: one row per chunk, slices of parts
def test_polars_sums_equal_torch(tmp_path, monkeypatch, chunk_values):
    monkeypatch.setattr(importance, "CHUNK_VALUES", chunk_values)
    data = random_store(tmp_path, np.random.default_rng(1))
    tau = 0.15
    sums = neuron_sums(tmp_path, tau)
    assert sums.columns[:10] == ["split", "form", "tower", "layer", "unit", "count", "sum_abs", "sum", "sum_sq", "count_active"]
    assert sums.select(importance.TOKEN_SUMS).null_count().row(0) == (sums.height,) * 6  # a store without token statistics
    assert len(sums) == sum(x.shape[1] for x in data.values())  # no vision/text rows
    assert sums.schema == pl.Schema(importance.SUMS_SCHEMA)
    assert sums.equals(sums.sort(["split", "form", "tower", "layer", "unit"]))
    for (s, f, t, layer), x in data.items():
        got = sums.filter(split=s, form=f, tower=t, layer=layer).sort("unit")
        z = torch.from_numpy(x).double()  # (n, units)
        assert got["unit"].to_list() == list(range(x.shape[1]))
        assert got["count"].to_list() == [x.shape[0]] * x.shape[1]
        np.testing.assert_allclose(got["sum_abs"].to_numpy(), z.abs().sum(0).numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got["sum"].to_numpy(), z.sum(0).numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got["sum_sq"].to_numpy(), (z * z).sum(0).numpy(), rtol=1e-12, atol=1e-12)
        assert got["count_active"].to_list() == (z.abs() > tau).sum(0).tolist()


def test_footer_totals_give_the_sums_without_reading_an_activation(tmp_path, monkeypatch):
    """τ = 0.1: the part files' sample totals, added up, equal the sums of the activations (counts exactly,
    values at ±float32(0.1) included: compared in float64, as the reading path does); the column is not read."""
    data = random_store(tmp_path, np.random.default_rng(11))
    edge = np.float32(0.1)
    x = data[("forget", "text", "language", 1)]
    x[0, :3] = [edge, -edge, np.nextafter(edge, np.float32(0))]
    for p, chunk in enumerate(np.array_split(x, 2)):
        put(tmp_path, "forget", "text", "language", 1, chunk, part=p)
    read = neuron_sums(tmp_path, 0.1, use_totals=False)
    monkeypatch.setattr(importance, "_job_sums", lambda *a: pytest.fail("the footer path read an activation"))
    sums = neuron_sums(tmp_path, 0.1)
    assert sums.schema == read.schema and sums.select(*importance.NEURON, "split", "form").equals(
        read.select(*importance.NEURON, "split", "form"))
    assert sums["count"].equals(read["count"]) and sums["count_active"].equals(read["count_active"])
    for c in ("sum_abs", "sum", "sum_sq"):
        np.testing.assert_allclose(sums[c].to_numpy(), read[c].to_numpy(), rtol=1e-12, atol=1e-15)
    for (s, f, t, layer), x in data.items():
        got = sums.filter(split=s, form=f, tower=t, layer=layer)
        assert got["count_active"].to_list() == (np.abs(x.astype(np.float64)) > 0.1).sum(0).tolist()
    assert sums.filter(split="forget", form="text", tower="language", layer=1)["count_active"][:3].to_list() == (
        read.filter(split="forget", form="text", tower="language", layer=1)["count_active"][:3].to_list())


def test_a_part_without_footer_totals_or_another_tau_is_read(tmp_path, monkeypatch):
    """Another τ, or one part written by another tool (no sample totals), takes the reading path."""
    random_store(tmp_path, np.random.default_rng(12))
    calls = []
    real = importance._job_sums
    monkeypatch.setattr(importance, "_job_sums", lambda *a: calls.append(1) or real(*a))
    neuron_sums(tmp_path, 0.2)
    assert calls
    calls.clear()
    part = sorted(tmp_path.rglob("part-*.parquet"))[0]
    pq.write_table(pq.read_table(part).replace_schema_metadata(None), part)
    neuron_sums(tmp_path, 0.1)
    assert calls


def test_damaged_footer_totals_are_an_error_naming_the_file(tmp_path):
    random_store(tmp_path, np.random.default_rng(13))
    part = sorted(tmp_path.rglob("part-*.parquet"))[0]
    table = pq.read_table(part)
    meta = {k: v for k, v in pq.read_metadata(part).metadata.items() if k != b"ARROW:schema"}
    raw = bytearray(meta[b"manu.sample_totals"])
    raw[len(raw) // 2] = ord("A") if raw[len(raw) // 2] != ord("A") else ord("B")  # one base64 digit changed
    pq.write_table(table.replace_schema_metadata({**meta, b"manu.sample_totals": bytes(raw)}), part)
    with pytest.raises(ActivationStoreError, match=rf"{part.name}: unreadable sample totals"):
        neuron_sums(tmp_path, 0.1)


# ----------------------------------------------------------------------------------------------
# Properties


def test_swapping_the_forms_leaves_every_importance_unchanged(tmp_path):
    rng = np.random.default_rng(2)
    data = random_store(tmp_path / "a", rng, vision=False)
    swap = {"multimodal": "text", "text": "multimodal"}
    for (s, f, t, layer), x in data.items():
        put(tmp_path / "b", s, swap[f], t, layer, x)
    a = compute_importance(tmp_path / "a", ImportanceParams())
    b = compute_importance(tmp_path / "b", ImportanceParams())
    assert a.columns == b.columns == list(OUTPUT_COLUMNS)
    for c in OUTPUT_COLUMNS[3:-2]:
        np.testing.assert_allclose(a[c].to_numpy(), b[c].to_numpy(), rtol=1e-12, atol=1e-15)
    assert a["rank"].equals(b["rank"]) and a["selected"].equals(b["selected"])


def random_sums(rng, layers, width):
    """A sums table without files: {tower: (layers, width)}; vision without text rows."""
    rows = []
    for tower, (nl, w) in {"language": (layers, width), "vision": (max(1, layers // 2), max(1, width // 3))}.items():
        for s in ("forget", "retain"):
            for f in ("multimodal", "text") if tower == "language" else ("multimodal",):
                n = int(rng.integers(1, 20))
                z = rng.normal(0, 0.3, (nl, n, w))
                for layer in range(nl):
                    x = z[layer]
                    rows.append(pl.DataFrame({
                        "split": s, "form": f, "tower": tower, "layer": layer, "unit": np.arange(w), "count": n,
                        "sum_abs": np.abs(x).sum(0), "sum": x.sum(0), "sum_sq": (x * x).sum(0),
                        "count_active": (np.abs(x) > 0.1).sum(0)}))
    return pl.concat(rows)


@pytest.mark.parametrize("scope", ["global", "tower", "layer"])
def test_selection_size_is_floor_alpha_n(scope):
    rng = np.random.default_rng(3)
    for layers, width in [(1, 7), (3, 13), (4, 50)]:
        sums = random_sums(rng, layers, width)
        for alpha in (0.01, 0.05, 0.1, 0.29, 0.5, 0.99):
            df = importance_table(sums, ImportanceParams(alpha=alpha, scope=scope))
            group = {"global": [], "tower": ["tower"], "layer": ["tower", "layer"]}[scope]
            for _, g in (df.group_by(group) if group else [((), df)]):
                k = math.floor(Fraction(str(alpha)) * len(g))  # exact: 0.29·100 = 29, not 28
                assert g["selected"].sum() == k
                assert sorted(g["rank"].to_list()) == list(range(1, len(g) + 1))
                if 0 < k < len(g):
                    assert g.filter("selected")["score"].min() >= g.filter(~pl.col("selected"))["score"].max()


def test_alpha_floor_is_exact():
    sums = random_sums(np.random.default_rng(4), 1, 100).filter(tower="language")
    assert importance_table(sums, ImportanceParams(alpha=0.29))["selected"].sum() == 29  # 0.29*100 == 28.999999999999996


def test_ties_are_broken_by_tower_layer_unit(tmp_path):
    x = np.full((2, 4), 0.5, np.float32)  # every neuron identical in every stream: all scores equal
    for s in ("forget", "retain"):
        for layer in (0, 1):
            put(tmp_path, s, "multimodal", "language", layer, x)
            put(tmp_path, s, "text", "language", layer, x * 0.5)
        put(tmp_path, s, "multimodal", "vision", 0, x * 0.5 + 0.25)  # vision: same contrast (A_t = 0 ... ) below
    df = compute_importance(tmp_path, ImportanceParams(alpha=0.5))
    lang = df.filter(tower="language")
    assert lang["score"].n_unique() == 1
    # Within the language tower the ranks follow (layer, unit) order exactly.
    assert lang["rank"].to_list() == sorted(lang["rank"].to_list())
    same = ImportanceParams(alpha=0.5, scope="layer")
    by_layer = compute_importance(tmp_path, same)
    for (tower, layer), g in by_layer.group_by(["tower", "layer"]):
        if g["score"].n_unique() == 1:
            assert g.sort("unit")["rank"].to_list() == list(range(1, len(g) + 1))
            assert g.sort("unit")["selected"].to_list() == [i < len(g) // 2 for i in range(len(g))]


def test_global_ties_put_language_before_vision():
    base = {"layer": 0, "count": 2, "sum_abs": 1.0, "sum": 1.0, "sum_sq": 1.0, "count_active": 2}
    rows = [dict(base, split=s, form=f, tower=t, unit=u) for s in ("forget", "retain") for f in ("multimodal", "text")
            for t in ("language", "vision") for u in range(2) if not (t == "vision" and f == "text")]
    sums = pl.DataFrame(rows)
    # Make vision's contrast equal to language's: give language text zeros too (same A, N, V, Q as vision).
    sums = sums.with_columns([pl.when((pl.col("tower") == "language") & (pl.col("form") == "text")).then(0).otherwise(pl.col(c)).alias(c)
                              for c in ("sum_abs", "sum", "sum_sq", "count_active")])
    df = importance_table(sums, ImportanceParams(alpha=0.5))
    assert df["score"].n_unique() == 1
    assert df.select("tower", "unit", "rank", "selected").rows() == [
        ("language", 0, 1, True), ("language", 1, 2, True), ("vision", 0, 3, False), ("vision", 1, 4, False)]


def test_vision_without_text_partition_has_text_stats_zero(tmp_path):
    rng = np.random.default_rng(5)
    data = random_store(tmp_path, rng)
    sums = neuron_sums(tmp_path, 0.1)
    assert sums.filter(tower="vision")["form"].unique().to_list() == ["multimodal"]
    df = compute_importance(tmp_path, ImportanceParams(eps=0.0))
    for s in ("forget", "retain"):
        x = data[(s, "multimodal", "vision", 0)].astype(np.float64)
        v = df.filter(tower="vision").sort("unit")
        # With A_t = N_t = V_t = Q_t = 0: I_abs = I_freq = I_rms = 1 (when the unit is ever active), I_var = sqrt(V_m).
        assert v[f"{s}_abs"].to_list() == pytest.approx([1.0] * 3)
        assert v[f"{s}_rms"].to_list() == pytest.approx([1.0] * 3)
        assert v[f"{s}_freq"].to_list() == [1.0 if (np.abs(x[:, u]) > 0.1).any() else 0.0 for u in range(3)]
        np.testing.assert_allclose(v[f"{s}_var"].to_numpy(), np.sqrt(x.var(0)), rtol=1e-9)


def test_output_table_shape_order_and_determinism(tmp_path):
    random_store(tmp_path / "s", np.random.default_rng(6))
    df = compute_importance(tmp_path / "s", ImportanceParams())
    assert df.columns == list(OUTPUT_COLUMNS)
    assert df.schema["layer"] == df.schema["unit"] == df.schema["rank"] == pl.Int64
    assert df.schema["selected"] == pl.Boolean
    assert df.select("tower", "layer", "unit").rows() == sorted(df.select("tower", "layer", "unit").rows())
    assert len(df) == 2 * 7 + 3
    a = write_importance(df, tmp_path / "a.parquet")
    b = write_importance(compute_importance(tmp_path / "s", ImportanceParams()), tmp_path / "out" / "b.parquet")
    assert a.read_bytes() == b.read_bytes()
    assert pl.read_parquet(a).equals(df)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", "out", "s"]  # no temp files left


# ----------------------------------------------------------------------------------------------
# Parameters


@pytest.mark.parametrize("alpha", [0, 1, 1.5, -0.1, float("nan")])
def test_alpha_outside_open_unit_interval(alpha):
    with pytest.raises(ValueError, match="alpha must be"):
        ImportanceParams(alpha=alpha)


def test_alpha_message_names_rule_value_fix():
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\); got 1.5. Give a fraction, e.g. 0.05"):
        ImportanceParams(alpha=1.5)


@pytest.mark.parametrize("name", ["eps", "tau"])
def test_negative_eps_or_tau(name):
    with pytest.raises(ValueError, match=f"{name} must be >= 0; got -0.1"):
        ImportanceParams(**{name: -0.1})


def test_zero_eps_and_tau_are_allowed():
    assert ImportanceParams(eps=0, tau=0).eps == 0.0


def test_all_weights_zero():
    with pytest.raises(ValueError, match="weights are all 0"):
        ImportanceParams(weights={"abs": 0, "freq": 0, "var": 0, "rms": 0})
    with pytest.raises(ValueError, match="weights are all 0"):
        ImportanceParams(weights="abs=0,freq=0,var=0,rms=0")


def test_negative_weight():
    with pytest.raises(ValueError, match="weight 'var' must be >= 0; got -1"):
        ImportanceParams(weights={"var": -1})


def test_unknown_weight_name():
    msg = "Unknown weight 'rsm'. Did you mean 'rms'? Available: abs, freq, var, rms"
    with pytest.raises(ValueError, match=msg.replace("?", r"\?").replace(".", r"\.")):
        parse_weights("abs=1,rsm=0")
    with pytest.raises(ValueError, match="Unknown weight 'rsm'"):
        ImportanceParams(weights={"rsm": 0})


def test_unknown_scope():
    with pytest.raises(ValueError, match=r"Unknown scope 'globl'\. Did you mean 'global'\? Available: global, tower, layer"):
        ImportanceParams(scope="globl")


def test_parse_weights():
    assert parse_weights("abs=1,freq=0,var=1,rms=1") == {"abs": 1.0, "freq": 0.0, "var": 1.0, "rms": 1.0}
    assert parse_weights(" freq = 0 ") == {"abs": 1.0, "freq": 0.0, "var": 1.0, "rms": 1.0}
    assert ImportanceParams(weights="rms=0.5").weights == Weights(rms=0.5)
    for bad, match in [("abs", "name=value"), ("abs=x", "must be a number"), ("abs=1,abs=0", "given twice")]:
        with pytest.raises(ValueError, match=match):
            parse_weights(bad)


def test_params_are_hashable_and_frozen():
    p = ImportanceParams(weights={"freq": 0})
    assert hash(p) == hash(ImportanceParams(weights=Weights(freq=0.0)))
    with pytest.raises(AttributeError):
        p.alpha = 0.1  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------
# Bad stores, each error naming the file


def fsl_table(values, n_ids=None, type_=None):
    n = len(values)
    type_ = type_ or pa.list_(pa.float32(), len(values[0]))
    return pa.table({"sample_id": [f"s{i}" for i in range(n)], "profile_id": ["p"] * n, "activation": pa.array(values, type_)})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_activation_names_the_file(tmp_path, bad):
    random_store(tmp_path, np.random.default_rng(7))
    path = partition_dir(tmp_path, "retain", "text", "language", 1) / "part-00000.parquet"  # 2 of 3 rows
    values = pq.read_table(path).column("activation").to_pylist()
    values[1][4] = bad
    pq.write_table(fsl_table(values), path)
    with pytest.raises(ActivationStoreError, match=rf"{path}: row 1 \(sample 's1'\), unit 4 is (nan|inf|-inf); activations must be finite"):
        compute_importance(tmp_path, ImportanceParams())


def test_null_inside_list_names_the_file(tmp_path):
    random_store(tmp_path, np.random.default_rng(8))
    path = partition_dir(tmp_path, "forget", "text", "language", 0) / "part-00000.parquet"
    values = pq.read_table(path).column("activation").to_pylist()
    values[0][2] = None
    pq.write_table(fsl_table(values, type_=pa.list_(pa.float32())), path)
    with pytest.raises(ActivationStoreError, match=rf"{path}: row 0 \(sample 's0'\), unit 2 is None"):
        compute_importance(tmp_path, ImportanceParams())


def test_ragged_list_rows_name_the_file(tmp_path):
    random_store(tmp_path, np.random.default_rng(9))
    path = partition_dir(tmp_path, "forget", "text", "language", 0) / "part-00000.parquet"
    values = pq.read_table(path).column("activation").to_pylist()
    values[1] = values[1][:-1]
    pq.write_table(fsl_table(values, type_=pa.list_(pa.float32())), path)
    with pytest.raises(ActivationStoreError, match=rf"{path}: activation lists have different lengths across rows"):
        compute_importance(tmp_path, ImportanceParams())


def test_list_files_from_other_tools_give_the_same_result(tmp_path):
    random_store(tmp_path, np.random.default_rng(10))
    expected = importance_table(neuron_sums(tmp_path, 0.1, use_totals=False), ImportanceParams())  # read, as below
    for path in tmp_path.rglob("part-*.parquet"):
        t = pq.read_table(path)  # without the footer totals: another tool's file
        pq.write_table(t.set_column(2, "activation", t.column("activation").cast(pa.list_(pa.float32()))), path)
    assert compute_importance(tmp_path, ImportanceParams()).equals(expected)


def test_wrong_schema_names_the_file(tmp_path):
    random_store(tmp_path, np.random.default_rng(11))
    path = partition_dir(tmp_path, "forget", "multimodal", "vision", 0) / "part-00000.parquet"
    pq.write_table(pq.read_table(path).drop(["profile_id"]), path)
    with pytest.raises(ActivationStoreError, match=f"{path}: missing column.s. profile_id"):
        compute_importance(tmp_path, ImportanceParams())
    t = pq.read_table(path)
    pq.write_table(t.set_column(1, "activation", t.column("activation").cast(pa.list_(pa.float64(), 3))).append_column("profile_id", t.column(0)), path)
    with pytest.raises(ActivationStoreError, match=f"{path}: column activation must be a list of float32"):
        compute_importance(tmp_path, ImportanceParams())


def test_missing_stream_and_width_mismatches(tmp_path):
    root = tmp_path / "store"
    random_store(root, np.random.default_rng(12))
    d = root / "split=retain/form=text/tower=language"
    moved = tmp_path / "moved"
    shutil.move(d, moved)
    with pytest.raises(ActivationStoreError, match=f"{d}: missing"):
        compute_importance(root, ImportanceParams())
    shutil.move(moved, d)
    bad = put(root, "retain", "text", "language", 0, np.zeros((1, 8)), part=9)
    with pytest.raises(ActivationStoreError, match=f"{bad}: width 8 differs .* across parts"):
        compute_importance(root, ImportanceParams())
    bad.unlink()
    shutil.rmtree(partition_dir(root, "retain", "text", "language", 1))
    bad = put(root, "retain", "text", "language", 1, np.zeros((3, 8)))
    with pytest.raises(ActivationStoreError, match=f"{bad}: width 8 for language layer 1 differs .*across streams"):
        compute_importance(root, ImportanceParams())


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(ActivationStoreError, match="no activation partitions found"):
        compute_importance(tmp_path, ImportanceParams())
    with pytest.raises(ActivationStoreError, match="does not exist"):
        compute_importance(tmp_path / "nope", ImportanceParams())


def test_sums_table_checks():
    sums = random_sums(np.random.default_rng(13), 1, 4)
    with pytest.raises(ValueError, match="sums table lacks column.s. sum_sq"):
        importance_table(sums.drop("sum_sq"), ImportanceParams())
    hole = sums.filter(~((pl.col("split") == "retain") & (pl.col("form") == "text") & (pl.col("unit") == 2)))
    with pytest.raises(ValueError, match="no retain/text row for language layer 0 unit 2"):
        importance_table(hole, ImportanceParams())
    with pytest.raises(ValueError, match="duplicate"):
        importance_table(pl.concat([sums, sums.head(1)]), ImportanceParams())


def test_an_alpha_that_selects_nothing_is_an_error_naming_the_smallest_alpha(tmp_path):
    from manu_core.importance import require_selection

    random_store(tmp_path, np.random.default_rng(3))
    sums = neuron_sums(tmp_path, 0.1)
    n = importance_table(sums, ImportanceParams(alpha=0.5)).height
    table = importance_table(sums, ImportanceParams(alpha=1e-9))
    assert not table["selected"].any()  # the table itself is a result: scores without a selection
    with pytest.raises(ValueError, match=rf"alpha=1e-09 selects no neuron.*1/{n:,}: use alpha >= (\S+);") as err:
        require_selection(table, ImportanceParams(alpha=1e-9))
    suggested = float(re.search(r"use alpha >= (\S+);", str(err.value)).group(1))
    assert suggested < 1.01 / n  # close to 1/N ...
    p = ImportanceParams(alpha=suggested)
    assert require_selection(importance_table(sums, p), p) == 1  # ... and it does select one


@pytest.mark.parametrize("chunk_values", [importance.CHUNK_VALUES, 7])  # whole row groups; streamed batches
def test_a_damaged_part_of_the_same_size_is_an_error_naming_it(tmp_path, monkeypatch, chunk_values):
    """Flipped bytes inside an activation page (file size unchanged) fail the page checksum."""
    monkeypatch.setattr(importance, "CHUNK_VALUES", chunk_values)
    random_store(tmp_path, np.random.default_rng(4))
    part = sorted(tmp_path.rglob("part-*.parquet"))[0]
    data = bytearray(part.read_bytes())
    values = np.asarray(pl.read_parquet(part)["activation"].to_list(), dtype=np.float32)
    at = bytes(data).find(values[0].tobytes()[:8])  # inside the first data page of the activation column
    assert at > 0
    data[at:at + 4] = bytes(b ^ 0xFF for b in data[at:at + 4])
    part.write_bytes(bytes(data))
    with pytest.raises(ActivationStoreError, match=rf"{part.name}: damaged .*checksum"):
        neuron_sums(tmp_path, 0.1, use_totals=False)  # the reading path: the footer path reads no page
