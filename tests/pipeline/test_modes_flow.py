"""Scoring modes and the random control in the `manu` flow, on the tiny preset: one extraction serves
paper, released and selective at several α; a random run keeps the per-tower counts of the MANU variant it
shadows; iterative selective pruning runs as cached steps. Evaluation is capped to 2 sets x 1 form x 1
profile to keep this fast."""

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from pydantic import ValidationError

from flows.pipeline import METHODS, EvalSettings, RunConfig, SweepConfig, iterative_steps, manu, variant_label
from flows.runs import settled_task_runs
from manu_core.unlearn import random_selection

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness", "one_thread")]

MODES = ["paper", "released", "selective"]
ALPHAS = [0.03, 0.08]  # α values no other test uses: these selects run here first


def fast_config(**kw) -> RunConfig:
    return RunConfig(model="tiny", extract_batch_size=16, lens_samples=2,
                     eval=EvalSettings(max_new_tokens=8, sets=["forget", "retain"], forms=["multimodal"],
                                       max_profiles={"forget": 1, "retain": 1}), **kw)


def flow(cfg: RunConfig, sweep=None, method="manu"):
    state = manu(cfg, sweep, method=method, return_state=True)
    assert state.is_completed(), state
    return state.result(), settled_task_runs(state)


def named(runs, prefix: str) -> list:
    return [r for r in runs if r.name.startswith(prefix)]


def per_tower(report: str) -> dict[str, int]:
    t = pl.read_parquet(Path(report) / "selected_per_layer.parquet")
    return dict(t.group_by("tower").agg(pl.col("selected").sum()).sort("tower").iter_rows())


def selection(report: str) -> pl.DataFrame:
    model = json.loads((Path(report) / "results.json").read_text())["run"]["model"]
    table = pl.read_parquet(Path(model) / "selection.parquet")
    if "selected" in table.columns:
        table = table.filter(pl.col("selected"))
    return table.select("tower", "layer", "unit").sort(pl.all())


@pytest.fixture(scope="module")
def sweep_run(tiny_model_dir):
    sweep = SweepConfig(forget_splits=[["093", "279", "303"]], scorings=MODES, alphas=ALPHAS, ablations=False,
                        random_seeds=[0], methods=["manu", "random"])
    return flow(fast_config(), sweep)


def test_one_extraction_serves_every_mode_and_alpha(sweep_run):
    out, runs = sweep_run
    assert len(named(runs, "extract")) == 1 and len(named(runs, "importance_sums")) == 1
    selects = named(runs, "select-")
    expected = {f"select-{m}-alpha{a:g}" for m in MODES for a in ALPHAS}
    # one select per (mode, α) for MANU; its random control reuses it (the same cached task)
    assert Counter(r.name for r in selects) == {n: 2 for n in expected}
    for name in expected:
        assert "Cached" in [r.state.name for r in selects if r.name == name], name
    assert len(named(runs, "random-select-seed0")) == len(expected)
    table = pl.read_parquet(Path(out) / "sweep.parquet")
    manu_labels = {f"manu[{m}] α={a:g}" for m in MODES for a in ALPHAS}
    random_labels = {f"random({m}) seed=0" for m in manu_labels}
    assert set(table["method"]) == {"vanilla"} | manu_labels | random_labels
    rnd = table.filter(pl.col("family") == "random")
    assert rnd["seed"].to_list() == [0] * rnd.height and set(rnd["mode"]) == set(MODES)
    md = (Path(out) / "report" / "report.md").read_text()
    assert "**Table 2: MANU at each pruning ratio α, per scoring mode" in md
    assert "| random(manu[released] α=0.08), seed 0 |" in md


def test_the_device_evaluates_a_variant_while_the_next_is_pruned(sweep_run):
    _, runs = sweep_run
    prunes, results = named(runs, "prune-"), named(runs, "results-")
    evals = [r for r in named(runs, "evaluate-") if not r.name.startswith("evaluate-vanilla")]
    assert len(prunes) == 2 * len(MODES) * len(ALPHAS) and len(results) == len(prunes)
    # every variant is unlearned before the first one is recorded, and the first variant's evaluations
    # start before the last variant is pruned
    assert max(r.end_time for r in prunes) <= min(r.start_time for r in results)
    assert min(r.start_time for r in evals) < max(r.start_time for r in prunes)


def test_random_run_keeps_the_per_tower_counts_of_the_variant_it_shadows(sweep_run):
    for mode in ("selective", "paper"):  # global top-α: the towers' shares come from the scores
        cfg = fast_config(scoring=mode, alpha=0.08)
        rnd_report, rnd_runs = flow(cfg, method="random")
        manu_report, manu_runs = flow(cfg)
        run = json.loads((Path(rnd_report) / "results.json").read_text())["run"]
        assert run["shadows"] == f"manu[{mode}] α=0.08" and run["seed"] == 0 and run["mode"] == mode
        assert run["label"] == f"random(manu[{mode}] α=0.08) seed=0"
        # the sweep computed both already: the same cached tasks
        assert [r.state.name for r in named(rnd_runs, f"select-{mode}-alpha0.08")] == ["Cached"]
        assert [r.state.name for r in named(rnd_runs, "random-select-seed0")] == ["Cached"]
        assert per_tower(rnd_report) == per_tower(manu_report) and sum(per_tower(rnd_report).values()) > 0
        assert selection(rnd_report).height == selection(manu_report).height > 0
        assert not selection(rnd_report).equals(selection(manu_report))
        assert not named(rnd_runs, "logit-lens-random")  # the control has no logit lens


def test_iterative_selective_pruning_runs_cached_steps(tiny_model_dir):
    assert iterative_steps(0.05, 0.02) == [0.02, 0.03] and iterative_steps(0.1, 0.02) == [0.02] * 5
    assert iterative_steps(0.01, 0.02) == [0.01]
    cfg = fast_config(scoring="selective", alpha=0.05, iterative=True, step=0.02)
    report, runs = flow(cfg)
    assert sorted(r.name for r in named(runs, "select-")) == ["select-selective-alpha0.05-step1of2",
                                                             "select-selective-alpha0.05-step2of2"]
    assert len(named(runs, "extract")) == 2 and len(named(runs, "importance_sums")) == 2  # vanilla, step-1 model
    assert len(named(runs, "prune")) == 2
    run = json.loads((Path(report) / "results.json").read_text())["run"]
    assert run["label"] == "manu[selective iterative] α=0.05" and run["variant"]["step"] == 0.02
    per_layer = pl.read_parquet(Path(report) / "selected_per_layer.parquet")
    n = int(per_layer["units"].sum())
    assert int(per_layer["selected"].sum()) == math.floor(0.02 * n) + math.floor(0.03 * n)
    again, runs2 = flow(cfg)
    assert again == report and all(r.state.name == "Cached" for r in runs2)


def test_released_per_position_extracts_position_statistics_and_scores_from_them(tiny_model_dir):
    """--scoring-option per_position=true: the run's extraction records the released code's per-batch
    position statistics (batches of 4, its batch size), and the released scores are read from them."""
    from manu_core.importance import ImportanceParams, importance_table, neuron_sums

    cfg = fast_config(scoring="released", alpha=0.08, scoring_options={"per_position": True, "pool_layers": True})
    cfg = cfg.model_copy(update={"extract_batch_size": 4})
    assert cfg.needs_position_stats() and not fast_config(scoring="released").needs_position_stats()
    out, runs = flow(cfg)
    results = json.loads((Path(out) / "results.json").read_text())
    acts = Path(results["run"]["activations"]) / "activations"
    assert sorted(p.parent.name for p in acts.glob("split=forget/form=*/tower=*/positions-*.parquet")) == [
        "tower=language", "tower=language", "tower=vision"]
    sums = neuron_sums(acts, 0.1)
    params = ImportanceParams(alpha=0.08, mode="released", options={"per_position": True, "pool_layers": True})
    want = importance_table(sums, params).filter(pl.col("selected")).select("tower", "layer", "unit").sort(pl.all())
    assert selection(out).equals(want)
    # other statistics than the default's (over each sample's counted tokens): other scores
    tokens = importance_table(sums, ImportanceParams(alpha=0.08, mode="released", options={"pool_layers": True}))
    scores = importance_table(sums, params)["score"].drop_nulls().to_numpy()
    assert not np.allclose(scores, tokens["score"].drop_nulls().to_numpy(), rtol=1e-3)


def test_released_linear_outputs_scores_and_prunes_the_linears_output_rows(tiny_model_dir, tmp_path):
    """--scoring-option linear_outputs=true: the one extraction also records the MLP Linears' outputs, their
    sums are a second cached task, and MANU and its random control prune output rows (residual channels)."""
    from manu_core.importance import ImportanceParams, importance_table, neuron_sums
    from manu_core.models import load_model
    from manu_core.prune import pruned_weights_are_zero

    cfg = fast_config(scoring="released", alpha=0.08, scoring_options={"linear_outputs": True})
    assert cfg.needs_linear_outputs() and not fast_config(scoring="released").needs_linear_outputs()
    out, runs = flow(cfg)
    assert len(named(runs, "extract")) == 1
    assert sorted(r.name for r in named(runs, "importance_sums")) == [
        "importance_sums-3 ids", "importance_sums-3 ids linear outputs"]
    run = json.loads((Path(out) / "results.json").read_text())["run"]
    acts = Path(run["activations"]) / "activations" / "linear_outputs"
    want = importance_table(neuron_sums(acts, 0.1), ImportanceParams(alpha=0.08, mode="released",
                                                                    options={"linear_outputs": True}))
    got = pl.read_parquet(Path(run["model"]) / "selection.parquet")
    assert got.equals(want)
    assert set(got.filter(pl.col("selected"))["module"]) >= {"down_proj", "fc2"}  # residual channels among them
    from tasks.cache import pipeline_dir

    [figs] = [d for d in (pipeline_dir() / "report").iterdir() if (d / "sources.json").is_file()
              and json.loads((d / "sources.json").read_text())["reports"] == [out]]
    assert "Scoring options: `released` linear_outputs=true" in (figs / "report.md").read_text()
    report = json.loads((Path(run["model"]) / "prune_report.json").read_text())
    assert report["n_pruned"] == int(got["selected"].sum()) and report["n_units"] == got.height
    assert pruned_weights_are_zero(load_model(run["model"])[0], got)
    rnd, rnd_runs = flow(cfg, method="random")
    drawn = pl.read_parquet(Path(json.loads((Path(rnd) / "results.json").read_text())["run"]["model"])
                            / "selection.parquet")
    assert [r.state.name for r in named(rnd_runs, "importance_sums")] == ["Cached", "Cached"]
    count = lambda t: dict(t.group_by("tower").agg(pl.col("selected").sum()).sort("tower").iter_rows())
    assert count(drawn) == count(got) and not drawn["selected"].equals(got["selected"])
    # `manu importance` on the run's activations with the option reads the sub-store itself
    from typer.testing import CliRunner

    from flows.cli import app

    target = tmp_path / "cli-importance.parquet"
    res = CliRunner().invoke(app, ["importance", str(acts.parent), "--out", str(target), "--alpha", "0.08",
                                   "--scoring", "released", "--scoring-option", "linear_outputs=true"])
    assert res.exit_code == 0, res.output
    assert pl.read_parquet(target).equals(got)


def test_configs_refuse_bad_modes_and_alphas_with_the_fix():
    with pytest.raises(ValidationError, match=r"scorings must be distinct scoring modes .* got \['paper', 'papr'\]"
                                              r" \(unknown: \['papr'\]\)"):
        SweepConfig(scorings=["paper", "papr"])
    with pytest.raises(ValidationError, match=r"alphas must be distinct pruning ratios in \(0, 1\); got \[0.1, 5.0\] "
                                              r"\(\[5.0\] outside \(0, 1\)\). Give fractions"):
        SweepConfig(alphas=[0.1, 5.0])
    with pytest.raises(ValidationError, match="scoring"):
        RunConfig(scoring="nope")
    with pytest.raises(ValidationError, match="statistic"):
        RunConfig(scoring="selective", scoring_options={"statistic": "median"})
    with pytest.raises(ValidationError, match="random_seeds"):
        SweepConfig(random_seeds=[])
    with pytest.raises(ValidationError, match=r"alphas must be distinct pruning ratios in \(0, 1\); got \[\]"):
        SweepConfig(alphas=[], ablations=True)  # once an IndexError after extraction
    with pytest.raises(ValidationError, match=r"random_scorings must be modes of scorings \['paper'\]; got \['released'\]"):
        SweepConfig(scorings=["paper"], random_scorings=["released"])
    both = SweepConfig(scorings=["paper", "released"], alphas=[0.1, 0.2], random_seeds=[0, 1])
    controls = METHODS["random"].variants(RunConfig(model="tiny"), both)
    assert len(controls) == 8 and {v["mode"] for v in controls} == {"paper", "released"}
    controls = METHODS["random"].variants(RunConfig(model="tiny"), both.model_copy(update={"random_scorings": ["paper"]}))
    assert sorted((v["alpha"], v["seed"]) for v in controls) == [(0.1, 0), (0.1, 1), (0.2, 0), (0.2, 1)]
    assert {v["mode"] for v in controls} == {"paper"}
    with pytest.raises(ValueError, match="iterative pruning is a mode of selective scoring"):
        manu.fn(RunConfig(model="tiny", iterative=True))
    sweep = SweepConfig()
    assert sweep.alphas == [0.02, 0.05, 0.1, 0.2] and sweep.scorings == MODES and "random" in sweep.methods


def test_outputs_are_linked_only_where_a_web_server_serves_them(monkeypatch, tmp_path):
    from flows.pipeline import artifact_url

    monkeypatch.setenv("MANU_ARTIFACTS", str(tmp_path))
    monkeypatch.delenv("MANU_ARTIFACTS_URL", raising=False)
    out = tmp_path / "pipeline" / "prune" / "prune-abc" / "model"
    assert artifact_url(out) is None
    monkeypatch.setenv("MANU_ARTIFACTS_URL", "http://lab-files:8080/manu/")
    assert artifact_url(out) == "http://lab-files:8080/manu/pipeline/prune/prune-abc/model"
    assert artifact_url(Path("/models/llava")) is None  # outside the artifacts folder: no URL to give


def test_variant_labels_name_the_mode():
    assert variant_label("manu", {"mode": "released", "alpha": 0.1}) == "manu[released] α=0.1"
    assert variant_label("manu", {"mode": "paper", "alpha": 0.05, "weights": {"abs": 1, "var": 0}}) == \
        "manu[paper] α=0.05 without var"
    assert variant_label("random", {"mode": "paper", "alpha": 0.1, "seed": 1, "shadows": "manu[paper] α=0.1"}) == \
        "random(manu[paper] α=0.1) seed=1"


def test_random_selection_keeps_each_towers_and_layers_count():
    rows = [{"tower": t, "layer": l, "unit": u, "selected": (u * 7 + l) % (3 if t == "vision" else 5) == 0}
            for t, layers in (("language", 3), ("vision", 2)) for l in range(layers) for u in range(40)]
    table = pl.DataFrame(rows)

    def counts(df, keys):
        return df.group_by(keys).agg(pl.col("selected").sum()).sort(keys).rows()

    for scope, keys in (("tower", ["tower"]), ("layer", ["tower", "layer"])):
        rnd = random_selection(table, 3, scope)
        assert rnd.select("tower", "layer", "unit").equals(table.select("tower", "layer", "unit"))
        assert counts(rnd, keys) == counts(table, keys) and not rnd["selected"].equals(table["selected"])
        assert random_selection(table, 3, scope).equals(rnd) and not random_selection(table, 4, scope).equals(rnd)
    with pytest.raises(ValueError, match="scope must be one of global, tower, layer; got 'model'"):
        random_selection(table, 0, "model")


def test_cli_scoring_flags(sweep_run, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    runner = CliRunner()
    for args, message in ((["run", "--scoring", "bogus"], "--scoring must be one of paper, released, selective"),
                          (["run", "--iterative"], "--iterative is a mode of selective scoring"),
                          (["run", "--method", "rand"], "--method must be one of manu, random"),
                          (["run", "--scoring-option", "statistic"], "--scoring-option takes key=value"),
                          (["run", "--scoring", "selective", "--scoring-option", "statistic=median"], "median"),
                          (["run", "--cap", "retain"], "--cap takes set=N pairs (N >= 0 profiles, 0: no cap)"),
                          (["run", "--cap", "retain=abc"], "got 'retain=abc'"),
                          (["run", "--cap", "retain=2,retain=3"], "--cap retain is given twice"),
                          (["run", "--cap", "bogus=3"], "max_profiles takes {set: N >= 0}"),
                          (["run", "--model", "tiny", "--device", "cuda:7"], "--device cuda:7: this machine has"),
                          (["run", "--relearn-steps", "5"], "--relearn-steps sets the relearning attacks' budget; add --relearn"),
                          (["run", "--relearn", "--relearn-steps", "0"], "relearn.steps: Input should be greater than or equal to 1")):
        out = runner.invoke(app, args)
        assert out.exit_code == 2 and message in out.output and "Traceback" not in out.output, (args, out.output)
    # An artifacts folder that cannot be written (here: under a file, which even root cannot write
    # into) is refused before any training or task.
    (tmp_path / "a-file").write_text("x")
    unwritable = tmp_path / "a-file" / "artifacts"
    out = runner.invoke(app, ["run", "--model", "tiny"], env={"MANU_ARTIFACTS": str(unwritable)})
    assert out.exit_code == 2 and f"the artifacts folder {unwritable} is not writable" in out.output, out.output
    # `manu importance --scoring released` on the sweep's activations: the mode's top α per tower
    from tasks.cache import pipeline_dir

    acts = next((pipeline_dir() / "extract").glob("*/activations"))
    target = tmp_path / "imp.parquet"
    out = runner.invoke(app, ["importance", str(acts), "--out", str(target), "--alpha", "0.1", "--scoring", "released"])
    assert out.exit_code == 0 and "released scoring" in out.output and "scope=tower" in out.output, out.output
    table = pl.read_parquet(target)
    for tower, n in table.group_by("tower").len().rows():
        k = table.filter((pl.col("tower") == tower) & pl.col("selected")).height
        assert 0 < math.floor(0.1 * n) <= k < 0.1 * n + 5  # top 10% per tower (the released code keeps ties)
    # A byte flipped in one activation file (same size): refused, not scored.
    import shutil

    copy = tmp_path / "extract-copy"
    shutil.copytree(acts.parent, copy)
    part = sorted((copy / "activations").rglob("*.parquet"))[0]
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    out = runner.invoke(app, ["importance", str(copy / "activations"), "--out", str(tmp_path / "bad.parquet")])
    assert out.exit_code == 2 and "is damaged" in out.output and "sha256 differs" in out.output, out.output
    assert not (tmp_path / "bad.parquet").exists()
