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
    state = manu(cfg, sweep, return_state=True)  # two phases (the default): validation first, mc only
    assert state.is_completed(), state
    comp = Path(state.result()) / "comparison"
    # `manu plan` counted, before the run, the evaluation units and the models the run made
    from flows.plan import plan
    from flows.runs import settled_task_runs

    counted, ran = plan(cfg, sweep), settled_task_runs(state)
    assert counted.runs["evaluate"] == sum(r.name.startswith("evaluate-") for r in ran)
    assert counted.runs["baseline training"] == sum(r.name.startswith("baseline-") for r in ran)
    # every variant evaluated fully on validation (phase one's signal is its multiple choice): the same
    # points on validation, so the same curves and the same chosen settings
    full = manu(cfg, sweep.model_copy(update={"two_phase": False, "forget_splits": ["validation"]}),
                return_state=True)
    assert full.is_completed(), full
    full_comp = Path(full.result()) / "comparison"
    assert pl.read_parquet(comp / "chosen.parquet").equals(pl.read_parquet(full_comp / "chosen.parquet"))
    key = ["method", "setting", "strength", "form"]
    mine = pl.read_parquet(comp / "points.parquet").filter(pl.col("forget") == "validation").sort(key)
    theirs = pl.read_parquet(full_comp / "points.parquet").sort(key)
    assert mine.select(key + ["forget_drop", "retain_drop"]).equals(theirs.select(key + ["forget_drop", "retain_drop"]))
    two, one = (pl.read_parquet(Path(s.result()) / "sweep.parquet") for s in (state, full))
    assert set(two.filter(pl.col("forget") == "validation")["task"]) == {"mc"}  # phase one: the cheap signal
    assert set(one["task"]) > {"mc"}
    # phase two: the vanilla model and the chosen settings (each random control beside its MANU variant), every task
    reported = two.filter(pl.col("forget") == "3 ids")
    assert set(reported["task"]) > {"mc"} and set(reported["method"]) < set(two["method"])
    picked = {s for s in pl.read_parquet(comp / "chosen.parquet")["setting"] if not s.startswith("random(")}
    assert {"vanilla"} | picked <= set(reported["method"])  # (a random control's rows carry their seed)
    assert (Path(state.result()) / "sweep.md").read_text().startswith("Two phases: every variant on validation")
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
