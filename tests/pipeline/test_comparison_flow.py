"""The sweep's comparison on the tiny preset: each method's setting is chosen on the validation
forget set (learned profiles outside the reported split) and the headline reports the other split
at that setting, with profile-bootstrap intervals; the gradient baselines sweep a strength axis."""

import json
from pathlib import Path

import polars as pl
import pytest

from flows.pipeline import EvalSettings, RunConfig, SweepConfig, manu

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness", "one_thread")]


def test_sweep_chooses_settings_on_validation_and_reports_the_other_split(tiny_model_dir):
    cfg = RunConfig(model="tiny", extract_batch_size=16, lens_samples=2,
                    eval=EvalSettings(max_new_tokens=4, sets=["forget", "retain"], max_profiles={"retain": 3}))
    sweep = SweepConfig(forget_splits=["validation", ["093", "279", "303"]], scorings=["paper"], alphas=[0.05, 0.2],
                        random_seeds=[0, 1], ablations=False, methods=["manu", "random", "ga"],
                        baseline_scales=[0.1, 1.0])
    state = manu(cfg, sweep, return_state=True)
    assert state.is_completed(), state
    comp = Path(state.result()) / "comparison"
    chosen = pl.read_parquet(comp / "chosen.parquet")
    assert set(chosen["method"]) == {"manu[paper]", "random[paper]", "ga"}
    assert set(chosen.filter(pl.col("method") == "ga")["strength"]) <= {2e-4, 2e-3}  # tiny's lr 2e-3 x scales
    points = pl.read_parquet(comp / "points.parquet")
    val = points.filter(pl.col("forget") == "validation")
    for r in chosen.iter_rows(named=True):  # the rule, checked on the validation points themselves
        mine = val.filter(pl.col("method") == r["method"])
        within = (mine.group_by("strength").agg(worst=pl.col("retain_drop").max())
                  .filter(pl.col("worst") <= 5.0)["strength"])
        expected = max(within) if len(within) else min(mine["strength"])
        assert r["strength"] == pytest.approx(expected) and r["within_budget"] == bool(len(within))
    head = pl.read_parquet(comp / "headline.parquet")
    assert set(head["forget"]) == {"3 ids"} and set(head["form"]) == {"multimodal", "text"}
    assert ((head["lo"] <= head["drop"] + 1e-9) & (head["drop"] <= head["hi"] + 1e-9)).all()
    assert (head.filter(pl.col("method") == "random[paper]")["seeds"] == 2).all()
    md = (comp / "comparison.md").read_text()
    assert "Headline: forget 3 ids" in md and "**Rule**" in md and (comp / "figures" / "tradeoff-3 ids-retain.png").is_file()
    runs = [json.loads(p.read_text()) for p in Path(state.result()).parent.parent.glob("results/*/results.json")]
    assert {r["run"]["label"] for r in runs} >= {"ga lr=0.0002", "ga lr=0.002"}  # the baseline's strength axis
