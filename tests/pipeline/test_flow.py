"""The `manu` flow on the embedded tiny preset: what reruns when what changes, and failures."""

import time
from collections import Counter

import pytest

from flows.pipeline import EvalSettings, RunConfig, manu
from flows.runs import settled_task_runs
from tests.pipeline.flow_helpers import config, key, reran, run, run_method

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness", "one_thread")]


@pytest.fixture(scope="module")
def first_run():
    return run(config())


def test_second_run_is_all_cached(first_run):
    report, states = first_run
    assert {"prepare_data", "vanilla_model", "extract", "importance_sums", "results"} <= set(states)
    assert sum(n.startswith("evaluate-vanilla-") for n in states) == 8
    again, states2 = run(config())
    assert again == report
    assert set(states2) == set(states) and reran(states2) == set(), states2


def test_task_results_are_json_never_pickle(first_run):
    """A result record on shared storage is data (the path a task returned), not a pickle to run."""
    import json

    from tasks.cache import results_dir

    records = [p for p in results_dir().iterdir() if p.is_file()]
    assert records
    for p in records:
        record = json.loads(p.read_bytes())
        assert record["metadata"]["serializer"]["type"] == "json", p
        assert isinstance(json.loads(record["result"]), str), p  # a path


def test_run_report_has_every_figure_and_the_tables(first_run):
    import json
    from pathlib import Path

    from tasks.cache import pipeline_dir

    report, states = first_run
    assert {"logit-lens-vanilla", "logit-lens-manu-paper-0-05", "report"} <= set(states)
    label = json.loads((Path(report) / "results.json").read_text())["run"]["label"]
    # sources.json names the runs a report was drawn from; other tests' runs share this one's title
    [figs] = [d for d in (pipeline_dir() / "report").iterdir() if (d / "sources.json").is_file()
              and json.loads((d / "sources.json").read_text())["reports"] == [report]]
    assert f"# {label} on tiny" in (figs / "report.md").read_text()
    names = sorted(p.name for p in (figs / "figures").glob("*.png"))
    assert names == [f"3-ids-{n}.png" for n in ("fig2-logit-lens", "fig4-form-bars", "fig5-tradeoff",
                                                 "fig6-activations", "selected-neurons")]
    md, page = (figs / "report.md").read_text(), (figs / "report.html").read_text()
    assert "Table 1 · forget" in md and "![3-ids-fig2-logit-lens](figures/3-ids-fig2-logit-lens.png)" in md and "(figures/3-ids-fig5-tradeoff.png)" in md
    assert page.count("data:image/png;base64,") == 5 and "<table>" in page


def test_changing_alpha_reruns_selection_onward_only(first_run):
    _, states = run(config(alpha=0.07))  # an α no other test uses
    assert reran(states) == {"select-paper-alpha0.07", "prune", "results", "logit-lens-manu-paper-0-07", "report"} | {
        n for n in states if n.startswith("evaluate-manu-paper-0-07-")}
    assert sum(n.startswith("evaluate-manu-paper-0-07-") for n in states) == 8


def test_changing_one_cap_reruns_that_evaluation_and_the_report(first_run):
    _, states = run(config(eval={"max_profiles": {"test": 2}}))
    assert reran(states) == {"results", "report"} | {n for n in states if n.startswith("evaluate-") and "-test-" in n}
    assert len(reran(states)) == 2 + 4  # vanilla and unlearned, two forms each


def test_changing_the_forget_split_reruns_extraction_onward(first_run):
    _, states = run(config(forget=["093", "279"]))
    assert states["vanilla_model"] == "Cached"
    assert reran(states) == set(states) - {"vanilla_model"}


def test_a_run_forgets_learned_people_and_retains_every_other_learned_one(first_run):
    """`--forget <ids>` on a preset: retain = the profiles the model learned (its folder says which)
    minus forget; people it never learned are refused before any task runs."""
    import json
    from pathlib import Path

    from typer.testing import CliRunner

    from flows.cli import app

    # other ids than the forget-split test's, so neither finds the other's run cached in either order
    state = manu(config(forget=["279", "303"]), method="manu", return_state=True)
    runs = {key(r): r for r in settled_task_runs(state)}
    split = json.loads((Path(runs["prepare_data"].state.result()) / "split.json").read_text())
    learned = json.loads((Path(runs["vanilla_model"].state.result()) / "manu_preset.json").read_text())["learned_ids"]
    assert split["forget_ids"] == ["279", "303"] and len(learned) == 16
    assert split["retain_ids"] == sorted(set(learned) - {"279", "303"})
    out = CliRunner().invoke(app, ["run", "--model", "tiny", "--forget", "001,093"])
    assert out.exit_code == 2 and "never learned: ['001']" in out.output and "Traceback" not in out.output, out.output


def test_deleted_activation_file_is_recomputed_not_a_crash(first_run):
    from pathlib import Path

    from tasks.cache import pipeline_dir

    # One Parquet part deleted in this run's extraction folder only: other tests (the sweep's CLI
    # test) read their own cached folders, which must stay whole.
    state = manu(config(), method="manu", return_state=True)
    [extract] = [r for r in settled_task_runs(state) if r.name.startswith("extract-")]
    folder = Path(extract.state.result())
    assert folder.parent == pipeline_dir() / "extract"
    part = sorted(folder.glob("activations/split=forget/**/*.parquet"))[0]
    part.unlink()
    report, states = run(config())
    assert states["extract"] == "Completed"  # the stale cached record was dropped
    assert reran(states) == {"extract"}  # same bytes again: everything downstream stays cached
    assert report == first_run[0]
    assert part.is_file()  # this run's folder was rewritten


def test_invalid_config_is_refused_with_the_rule():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"alpha must be in \(0, 1\); got 1.5"):
        RunConfig(model="tiny", alpha=1.5)
    with pytest.raises(ValidationError, match="sets must be a non-empty subset"):
        EvalSettings(sets=["forget", "tset"])
    with pytest.raises(ValidationError, match="unknown weight|weight"):
        RunConfig(weights={"abs": 1, "nope": 1})


def test_baselines_are_methods_of_the_same_flow(first_run, tiny_model_dir):
    """Each baseline is a cached task producing a model folder; evaluation and report are shared.
    NPO takes its reference from the config, as on a real checkpoint (training one on an embedded
    preset, ~2 min, is tests/baselines/test_baselines.py::test_npo_reference_is_the_recipe_on_retain_only)."""
    from pathlib import Path

    # Two sets (of four) are enough to see each method evaluated apart from the vanilla model, at half the cost.
    two_sets = config(eval={"sets": ["forget", "retain"]})
    _, ga = run_method(two_sets, "ga")
    assert ga["baseline-ga"] in ("Completed", "Cached") and "extract" not in ga  # a sweep test may have run it
    assert all(s == "Cached" for n, s in ga.items() if n.startswith("evaluate-vanilla-"))
    assert sum(n.startswith("evaluate-ga-") for n in ga) == 4
    report, prompting = run_method(two_sets, "prompting")
    assert not any(n.startswith("baseline") for n in prompting)
    # The system prompt makes other evaluations than the vanilla model's (same weights).
    assert sum(s == "Completed" for n, s in prompting.items() if n.startswith("evaluate-prompting-")) == 4
    assert all(s == "Cached" for n, s in prompting.items() if n.startswith("evaluate-vanilla-"))
    assert "| method | MC | ROUGE-L | Fact | Cloze |" in (Path(report) / "results.md").read_text()
    with_reference = two_sets.model_copy(update={"reference": str(tiny_model_dir)})
    _, npo = run_method(with_reference, "npo")
    assert "reference_model" not in npo and npo["baseline-npo"] == "Completed"
    _, again = run_method(with_reference, "npo")
    assert all(s == "Cached" for s in again.values())


def test_two_device_slots_run_model_tasks_at_once_with_serial_results(tiny_model_dir, tmp_path, monkeypatch):
    """Two slots on one device (CPU stand-ins for two GPUs): extraction and the vanilla evaluations
    hold slots at the same time, each slot with its own model (no hooks on a model another task
    runs), and the activations are byte-identical to a plain serial extraction."""
    import threading
    from contextlib import contextmanager
    from pathlib import Path

    from manu_core.extract import extract_activations
    from manu_core.models import load_model
    from tasks import devices, stages

    # A forget set no other test uses, so nothing is cached: every task after the vanilla model runs.
    # (Not a separate artifacts folder: the task results' store is the session's, and its records
    # would point later runs of the other tests into this test's folder.)
    cfg = config(forget=["093", "303"])
    monkeypatch.setenv("MANU_DEVICE_SLOTS", "2")
    monkeypatch.setattr(devices, "_POOLS", {})
    monkeypatch.setattr(devices, "_SLOT_MODELS", {})
    assert devices.slot_devices("cpu") == ["cpu", "cpu"]
    held, peak, shared, loads, guard = [0], [0], [], [0], threading.Lock()
    real_slot, real_load = stages.device_slot, stages.load

    @contextmanager
    def counted(device="cpu"):
        with real_slot(device) as slot:
            with guard:
                held[0] += 1
                peak[0] = max(peak[0], held[0])
            try:
                yield slot
            finally:
                with guard:
                    held[0] -= 1

    def tracked(model_dir, slot, dtype, device=""):
        out = real_load(model_dir, slot, dtype, device)
        with guard:  # the model handed out is in no other slot
            others = [m[0] for (_, i), (_, m) in devices._SLOT_MODELS.items() if i != slot.index]
            shared.extend(m for m in others if m is out[0])
            loads[0] += 1
        return out

    monkeypatch.setattr(stages, "device_slot", counted)
    monkeypatch.setattr(stages, "load", tracked)
    since = time.time()
    state = manu(cfg, method="manu", return_state=True)
    assert state.is_completed(), state
    assert peak[0] == 2, peak  # two model tasks ran at once
    assert loads[0] > 2 and not shared  # each slot its own model objects
    # every hold is recorded under its task's name (bench/bench_pipeline.py times model stages with them)
    holds = sorted((a, b, name) for name, a, b in devices.slot_holds() if a >= since)
    model_runs = Counter(r.task_key.rsplit("-", 1)[0] for r in settled_task_runs(state)
                         if r.name.startswith(("extract", "evaluate", "logit-lens")))
    assert Counter(name for _, _, name in holds) == model_runs and model_runs["extract"] == 1
    assert any(b1 > a2 for (_, b1, _), (a2, _, _) in zip(holds, holds[1:]))  # two holds at once
    runs = {key(r): r for r in settled_task_runs(state)}
    acts = Path(runs["extract"].state.result()) / "activations"
    # the flow's own vanilla model: the flow resolves the preset for the torch thread count it runs at
    # (presets.as_trained_here), which can differ from the fixture's (this test run alone: 1 vs 2)
    model, processor = load_model(runs["vanilla_model"].state.result())
    ref = extract_activations(model, processor, stages.read_streams(runs["prepare_data"].state.result()),
                              tmp_path / "serial", batch_size=cfg.extract_batch_size, progress=False)
    mine, theirs = sorted(acts.rglob("*.parquet")), sorted(ref.rglob("*.parquet"))
    assert [p.relative_to(acts) for p in mine] == [p.relative_to(ref) for p in theirs] and mine
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(mine, theirs))
