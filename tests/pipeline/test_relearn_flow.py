"""Relearning attacks in the `manu` flow on the embedded tiny preset: every attack x mask on the
unlearned model, the held-out half evaluated, the report's tables and figure, the cache."""

import json
from pathlib import Path

import polars as pl
import pytest
import torch

from flows.pipeline import EvalSettings, RunConfig, manu
from flows.runs import settled_task_runs
from manu_core.models import load_model
from manu_core.prune import pruned_weights_are_zero
from tasks.cache import DONE, file_digest, pipeline_dir

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness", "one_thread")]
CAPS = {"forget": 1, "test": 1, "retain": 1, "celebrity": 1}


def run(method: str, steps: int):
    cfg = RunConfig(model="tiny", alpha=0.05, extract_batch_size=16,
                    eval=EvalSettings(max_new_tokens=8, sets=["forget", "retain"], max_profiles=CAPS),
                    relearn={"enabled": True, "steps": steps, "attacks": ["forget-text", "retain"]})
    state = manu(cfg, method=method, return_state=True)
    assert state.is_completed(), state
    return Path(state.result()), {r.name: r.state.name for r in settled_task_runs(state)}


def test_relearning_attacks_every_unlearned_model_and_leaves_the_cached_one_untouched():
    report, states = run("manu", steps=3)
    relearns = sorted(n for n in states if n.startswith("relearn-"))
    assert [n.split("-0-05-")[1] for n in relearns if "-0-05-" in n] == [
        "forget-text-free", "forget-text-frozen", "retain-free", "retain-frozen"], relearns
    # the control: the vanilla model attacked alike, free only (it prunes nothing)
    assert [n for n in relearns if "-0-05-" not in n] == ["relearn-attacked-vanilla-forget-text-free",
                                                          "relearn-attacked-vanilla-retain-free"], relearns
    results = json.loads((report / "results.json").read_text())
    rows = pl.DataFrame(results["relearn"])
    assert set(rows["stage"]) == {"vanilla", "unlearned", "forget-text/free", "forget-text/frozen", "retain/free",
                                  "retain/frozen", "vanilla+forget-text", "vanilla+retain"}
    assert set(rows["task"]) == {"mc"} and set(rows["form"]) == {"multimodal", "text"} and set(rows["set"]) == {"forget"}
    # The held-out half only: tiny forgets 3 profiles, 1 attacks and the other 2 are evaluated, uncapped.
    # (the unlearned model may be a cache hit written under another test's artifacts folder: look for the
    # relearning outputs where this run wrote them, not beside the model)
    meta = [json.loads(p.read_text())["meta"] for p in pipeline_dir().glob(f"relearn/*/{DONE}")]
    attack_ids, held = meta[0]["attack_ids"], meta[0]["held_out_ids"]
    assert len(attack_ids) == 1 and len(held) == 2 and not set(attack_ids) & set(held)
    items = pl.read_parquet(Path(results["run"]["data"]) / "eval_items.parquet").filter(
        (pl.col("set") == "forget") & (pl.col("task") == "mc") & pl.col("profile_id").is_in(held))
    for form in ("multimodal", "text"):
        assert set(rows.filter(pl.col("form") == form)["n"]) == {items.filter(pl.col("form") == form).height}
    # The unlearned model on disk is the one the prune task wrote (its completion record still matches).
    unlearned = Path(results["run"]["model"])
    record = json.loads((unlearned.parent / DONE).read_text())
    for f in record["files"]:
        assert file_digest(unlearned.parent / f["path"]) == f["sha256"], f["path"]
    # A relearned model differs from it; the frozen one keeps every pruned unit at zero.
    pipeline = pipeline_dir()
    before, _ = load_model(unlearned)
    selection = pl.read_parquet(unlearned / "selection.parquet")
    metas = {d: json.loads((d / DONE).read_text())["meta"] for d in (pipeline / "relearn").iterdir()
             if (d / DONE).is_file()}
    relearned = {m["mask"]: d / "model" for d, m in metas.items()
                 if m["attack"] == "forget-text" and m["model"] == str(unlearned)}
    assert sorted(relearned) == ["free", "frozen"]
    for mask, folder in relearned.items():
        after, _ = load_model(folder)
        assert any(not torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))
        assert pruned_weights_are_zero(after, selection)  # frozen by the mask; free because a zeroed unit has no gradient
    md = (pipeline / "report").glob("*/report.md")
    text = "\n".join(p.read_text() for p in md)
    assert "Relearning (free)" in text and "Relearning (frozen)" in text and "-relearn.png" in text
    assert "\n| vanilla | " in text  # the attacked vanilla model: a row of the free table
    # Another relearning budget reruns the relearning and its evaluations, nothing else.
    _, states2 = run("manu", steps=4)
    reran = {n for n, s in states2.items() if s != "Cached"}
    assert {n for n in reran if n.startswith("relearn-")} == set(relearns)
    assert not any(n.startswith(("extract", "prune", "select", "evaluate-vanilla", "prepare_data")) for n in reran), reran


def test_a_baseline_has_only_the_free_attack_and_the_controls_run_once_per_sweep():
    """A sweep of MANU and GA: GA (it prunes nothing) is attacked free only; the stages every method
    shares (the vanilla model attacked, and the vanilla model's held-out evaluation) run once."""
    from flows.pipeline import SweepConfig

    cfg = RunConfig(model="tiny", alpha=0.05, extract_batch_size=16,
                    eval=EvalSettings(max_new_tokens=8, sets=["forget", "retain"], max_profiles=CAPS),
                    relearn={"enabled": True, "steps": 3, "attacks": ["forget-text", "retain"]})
    sweep = SweepConfig(forget_splits=[cfg.data_spec()["forget"]], methods=["manu", "ga"], alphas=[0.05],
                        scorings=["paper"], ablations=False, baseline_scales=[1.0])
    state = manu(cfg, sweep=sweep, return_state=True)
    assert state.is_completed(), state
    names = [r.name for r in settled_task_runs(state)]
    relearns = sorted(n for n in names if n.startswith("relearn-") and "attacked-vanilla" not in n)
    assert [n.rsplit("-", 1)[-1] for n in relearns if "-0-05-" not in n] == ["free", "free"], relearns
    assert len([n for n in relearns if "-0-05-" in n]) == 4, relearns  # MANU: both attacks, free and frozen
    controls = sorted(n for n in names if "attacked-vanilla" in n or n.startswith("evaluate-vanilla-held-out"))
    assert len(controls) == len(set(controls)) == 2 + 2 * 2 + 2, controls  # 2 attacks, each evaluated in 2 forms
    assert sum(n.startswith("relearn-attacked-vanilla") for n in controls) == 2, controls


def test_two_folders_with_the_same_weights_are_one_evaluation(tiny_model_dir, tmp_path):
    """A free and a frozen relearning of a pruned model train alike (a zeroed unit has no gradient), so
    their folders hold the same weights and their evaluations one cache key. Run at once, the second
    waits for the first and reuses its answers (it once failed: the answers' manifest named a path)."""
    import shutil

    from prefect import flow

    from flows.pipeline import MLLMU_DIR
    from tasks import stages

    copies = [shutil.copytree(tiny_model_dir, tmp_path / name) for name in ("free", "frozen")]

    @flow
    def both():
        cfg = RunConfig(model="tiny")
        data = stages.prepare_data(cfg.data_spec(cfg.data_spec()["forget"]), profiles=str(MLLMU_DIR))
        settings = cfg.eval.config_for(str(tiny_model_dir))
        futures = [stages.evaluate.submit(str(m), data, "forget", "text", settings, 1, label=m.name, progress=False)
                   for m in copies]
        return [f.result() for f in futures]

    a, b = both()
    assert a == b and (Path(a) / "summary.json").is_file()
