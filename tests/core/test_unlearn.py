"""MANU end to end on the trained `tiny` preset (`manu_unlearn`, the Prefect-free call), the random
control, and the `manu inspect` / `manu importance` commands."""

import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from manu_core.importance import ImportanceParams
from manu_core.models import load_model
from manu_core.prune import pruned_weights_are_zero, save_pruned
from manu_core.presets import get_preset, preset_dataset
from manu_core.unlearn import manu_unlearn, random_selection

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def manu_run(tiny_model_dir, tmp_path_factory):
    model, processor = load_model(tiny_model_dir)
    ds = preset_dataset(get_preset("tiny"))
    work = tmp_path_factory.mktemp("manu")
    res = manu_unlearn(model, processor, ds, work, ImportanceParams(alpha=0.05), progress=False)
    return model, res


def test_manu_unlearn_prunes_exactly_the_selection(manu_run):
    model, res = manu_run
    table = pl.read_parquet(res.importance)
    k = int(table["selected"].sum())
    assert k == int(0.05 * table.height) == res.report.n_pruned
    lang = table.filter(pl.col("selected") & (pl.col("tower") == "language"))
    for layer, unit in lang.select("layer", "unit").rows()[:20]:
        mlp = model.model.language_model.layers[layer].mlp
        assert torch.count_nonzero(mlp.down_proj.weight[:, unit]) == 0
        assert torch.count_nonzero(mlp.gate_proj.weight[unit]) == 0


def test_a_saved_pruned_model_reloads_with_its_units_zero(manu_run, tiny_model_dir, tmp_path):
    model, res = manu_run
    _, processor = load_model(tiny_model_dir)
    table = pl.read_parquet(res.importance)
    out = save_pruned(model, processor, table, tmp_path / "model", report=res.report)
    reloaded, _ = load_model(out)
    saved = pl.read_parquet(out / "selection.parquet")
    pruned = saved.filter(pl.col("selected"))
    assert saved.equals(table) and pruned.height == res.report.n_pruned > 0
    assert pruned_weights_are_zero(reloaded, pruned)


def test_random_selection_same_size_other_units(manu_run):
    _, res = manu_run
    table = pl.read_parquet(res.importance)
    rnd = random_selection(table, seed=0)
    assert int(rnd["selected"].sum()) == int(table["selected"].sum())
    assert rnd.select("tower", "layer", "unit").equals(table.select("tower", "layer", "unit"))
    assert not rnd["selected"].equals(table["selected"])
    assert random_selection(table, seed=0).equals(rnd) and not random_selection(table, seed=1).equals(rnd)


def test_cli_inspect_and_importance(manu_run, tmp_path):
    _, res = manu_run
    runner = CliRunner()
    out = runner.invoke(app, ["inspect", str(res.activations)])
    assert out.exit_code == 0, out.output
    assert "forget" in out.output and "vision" in out.output
    target = tmp_path / "imp.parquet"
    out = runner.invoke(app, ["importance", str(res.activations), "--out", str(target), "--alpha", "0.1",
                              "--weights", "abs=1,freq=0", "--scope", "tower"])
    assert out.exit_code == 0, out.output
    table = pl.read_parquet(target)
    for tower, n in table.group_by("tower").len().rows():
        assert table.filter((pl.col("tower") == tower) & pl.col("selected")).height == int(0.1 * n)
    bad = runner.invoke(app, ["importance", str(res.activations), "--out", str(tmp_path / "x.parquet"), "--alpha", "1.5"])
    assert bad.exit_code == 2 and "alpha must be in (0, 1); got 1.5" in bad.output
    assert not (tmp_path / "x.parquet").exists()
    bad = runner.invoke(app, ["importance", str(tmp_path / "nowhere"), "--out", str(tmp_path / "y.parquet")])
    assert bad.exit_code == 2 and "error:" in bad.output
    bad = runner.invoke(app, ["importance", str(res.activations), "--out", str(tmp_path)])  # a folder, not a file
    assert bad.exit_code == 2 and f"--out {tmp_path} is a folder" in bad.output and "importance.parquet" in bad.output
