"""The `manu` flow on the embedded tiny preset: what reruns when what changes, and failures."""

import re

import pytest

from flows.pipeline import EvalSettings, RunConfig, manu
from flows.runs import settled_task_runs

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness", "one_thread")]

CAPS = {"forget": 1, "test": 1, "retain": 1, "celebrity": 1}


def config(**kw) -> RunConfig:
    ev = kw.pop("eval", {})
    kw.setdefault("extract_batch_size", 16)
    return RunConfig(model="tiny", alpha=kw.pop("alpha", 0.05),
                     eval=EvalSettings(max_new_tokens=8, max_profiles={**CAPS, **ev.pop("max_profiles", {})}, **ev),
                     **kw)


def run(cfg: RunConfig) -> tuple[str, dict[str, str]]:
    """The flow's result and {task run name: state name}."""
    return run_method(cfg, "manu")


def run_method(cfg: RunConfig, method: str) -> tuple[str, dict[str, str]]:
    state = manu(cfg, method=method, return_state=True)
    assert state.is_completed(), state
    runs = settled_task_runs(state)
    assert not [r.name for r in runs if re.fullmatch(r"[a-z_]+-[0-9a-f]{3}", r.name)]  # every name says what it works on
    return state.result(), {key(r): r.state.name for r in runs}


def key(run) -> str:
    """A task run's key in these tests: the task's name, or the run's own name where one task runs
    several times per flow run (evaluate-<model>-<set>-<form>, select-..., logit-lens-..., baseline-<method>)."""
    task = run.task_key.rsplit("-", 1)[0]
    if task == "baseline":
        return run.name.split(" ")[0]
    return run.name if task in ("evaluate", "select", "logit_lens") else task


def reran(states: dict[str, str]) -> set[str]:
    return {n for n, s in states.items() if s != "Cached"}


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

    state = manu(config(forget=["093", "279"]), method="manu", return_state=True)
    runs = {key(r): r for r in settled_task_runs(state)}
    split = json.loads((Path(runs["prepare_data"].state.result()) / "split.json").read_text())
    learned = json.loads((Path(runs["vanilla_model"].state.result()) / "manu_preset.json").read_text())["learned_ids"]
    assert split["forget_ids"] == ["093", "279"] and len(learned) == 16
    assert split["retain_ids"] == sorted(set(learned) - {"093", "279"})
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


def live_in_group(pgid: int) -> list[int]:
    """Processes of process group `pgid` that are still running (zombies, waiting for whoever reaps
    orphans here, do not count). Linux: read from /proc."""
    from pathlib import Path

    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def isolated_env(tmp_path, tiny_model_dir):
    """An artifacts folder holding the trained tiny model, and the environment of a `manu` process
    that uses it with its own temporary Prefect server."""
    import os
    import shutil

    arts = tmp_path / "artifacts"
    shutil.copytree(tiny_model_dir, arts / "models" / tiny_model_dir.name)
    env = {**os.environ, "MANU_ARTIFACTS": str(arts), "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MANU_PREFECT_RESULTS": ""}
    env.pop("PREFECT_API_URL", None)
    return arts, env


def test_one_ctrl_c_stops_manu_run_at_once_and_the_rerun_resumes(tiny_model_dir, tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) mid-run: `manu run` exits
    130 within 15 s with one line on how to resume and leaves no process (its temporary Prefect
    server included); the same command then finishes from the cache with an uninterrupted run's results."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    caps = "forget=1,test=1,retain=1,celebrity=1"
    reference, _ = run(RunConfig(model="tiny", eval=EvalSettings(max_profiles=CAPS)))
    arts, env = isolated_env(tmp_path, tiny_model_dir)
    cmd = [sys.executable, "-c", "from flows.cli import main; main()", "run", "--model", "tiny", "--cap", caps]
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(cmd, env=env, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (list((arts / "pipeline" / "extract").glob("*/.activations.*.tmp"))
                   or list((arts / "pipeline" / "evaluate").glob("*/unit"))):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "the run never reached extraction"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGINT)
        t0 = time.time()
        try:
            output, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            raise AssertionError("manu run still running 15 s after one Ctrl-C") from None
        assert time.time() - t0 < 15 and proc.returncode == 130, (proc.returncode, output[-3000:])
        assert "interrupted: finished steps are cached" in output and "run the same command again" in output
        deadline = time.time() + 5  # the temporary server's own SIGINT shutdown
        while live_in_group(proc.pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not live_in_group(proc.pid), "a process of the interrupted run is still alive"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    out = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    report = Path([l for l in out.stdout.splitlines() if l.startswith("results: ")][-1][len("results: "):]).parent
    ref = json.loads((Path(reference) / "results.json").read_text())
    got = json.loads((report / "results.json").read_text())
    assert got["unlearned"] == ref["unlearned"] and got["vanilla"] == ref["vanilla"]


def test_killed_extraction_reruns_to_the_same_results(tiny_model_dir, tmp_path):
    """SIGKILL the flow's process while `extract` runs; the rerun reuses the finished tasks, cleans
    the unfinished folder and ends with the results of an uninterrupted run (run here, in-process)."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from tasks.cache import pipeline_dir

    cfg = config(extract_batch_size=1)
    reference, _ = run(cfg)
    arts, env = isolated_env(tmp_path, tiny_model_dir)
    cmd = [sys.executable, str(Path(__file__).with_name("run_flow.py")), cfg.model_dump_json()]
    repo = Path(__file__).resolve().parents[2]
    # Its own process group: the kill takes the flow and the temporary Prefect server it started, as
    # a crash would, and leaves no server behind (also when an assertion fails first).
    proc = subprocess.Popen(cmd, env=env, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while not list((arts / "pipeline" / "extract").glob("*/.activations.*.tmp")):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "extraction never started"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert list((arts / "pipeline" / "extract").glob("*/.activations.*.tmp"))  # the kill left it unfinished
    out = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    log = out.stdout + out.stderr
    for name in ("prepare_data", "vanilla_model"):
        assert f"Task run '{name}-" in log and any(f"'{name}-" in l and "Cached" in l for l in log.splitlines())
    assert not list((arts / "pipeline" / "extract").glob("*/.activations.*.tmp"))
    report = Path([l for l in out.stdout.splitlines() if l.startswith("REPORT=")][-1][len("REPORT="):])
    ref = json.loads((Path(reference) / "results.json").read_text())
    got = json.loads((report / "results.json").read_text())
    assert got["unlearned"] == ref["unlearned"] and got["vanilla"] == ref["vanilla"]
    # Same cache keys (content-addressed), so the same folder names and the same bytes.
    mine = sorted((arts / "pipeline" / "select").glob("*/importance.parquet"))
    assert len(mine) == 1
    theirs = pipeline_dir() / "select" / mine[0].parent.name / "importance.parquet"
    assert mine[0].read_bytes() == theirs.read_bytes()


def test_baselines_are_methods_of_the_same_flow(first_run):
    """Each baseline is a cached task producing a model folder; evaluation and report are shared."""
    from pathlib import Path

    _, ga = run_method(config(), "ga")
    assert ga["baseline-ga"] in ("Completed", "Cached") and "extract" not in ga  # a sweep test may have run it
    assert all(s == "Cached" for n, s in ga.items() if n.startswith("evaluate-vanilla-"))
    report, prompting = run_method(config(), "prompting")
    assert not any(n.startswith("baseline") for n in prompting)
    # The system prompt makes other evaluations than the vanilla model's (same weights).
    assert sum(s == "Completed" for n, s in prompting.items() if n.startswith("evaluate-prompting-")) == 8
    assert "| method | MC | ROUGE-L | Fact | Cloze |" in (Path(report) / "results.md").read_text()
    _, npo = run_method(config(), "npo")
    assert npo["reference_model"] == "Completed" and npo["baseline-npo"] == "Completed"
    _, again = run_method(config(), "npo")
    assert all(s == "Cached" for s in again.values())


def test_two_device_slots_run_model_tasks_at_once_with_serial_results(tiny_model_dir, tmp_path, monkeypatch):
    """Two slots on one device (CPU stand-ins for two GPUs): extraction and the vanilla evaluations
    hold slots at the same time, each slot with its own model (no hooks on a model another task
    runs), and the activations are byte-identical to a plain serial extraction."""
    import shutil
    import threading
    from contextlib import contextmanager
    from pathlib import Path

    from manu_core.extract import extract_activations
    from manu_core.models import load_model
    from tasks import stages

    shutil.copytree(tiny_model_dir, tmp_path / "artifacts" / "models" / tiny_model_dir.name)
    monkeypatch.setenv("MANU_ARTIFACTS", str(tmp_path / "artifacts"))  # nothing cached: every task runs
    monkeypatch.setenv("MANU_DEVICE_SLOTS", "2")
    monkeypatch.setattr(stages, "_POOLS", {})
    monkeypatch.setattr(stages, "_SLOT_MODELS", {})
    assert stages.slot_devices("cpu") == ["cpu", "cpu"]
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
            others = [m[0] for (_, i), (_, m) in stages._SLOT_MODELS.items() if i != slot.index]
            shared.extend(m for m in others if m is out[0])
            loads[0] += 1
        return out

    monkeypatch.setattr(stages, "device_slot", counted)
    monkeypatch.setattr(stages, "load", tracked)
    state = manu(config(), method="manu", return_state=True)
    assert state.is_completed(), state
    assert peak[0] == 2, peak  # two model tasks ran at once
    assert loads[0] > 2 and not shared  # each slot its own model objects
    runs = {key(r): r for r in settled_task_runs(state)}
    acts = Path(runs["extract"].state.result()) / "activations"
    model, processor = load_model(tiny_model_dir)
    ref = extract_activations(model, processor, stages.read_streams(runs["prepare_data"].state.result()),
                              tmp_path / "serial", batch_size=config().extract_batch_size, progress=False)
    mine, theirs = sorted(acts.rglob("*.parquet")), sorted(ref.rglob("*.parquet"))
    assert [p.relative_to(acts) for p in mine] == [p.relative_to(ref) for p in theirs] and mine
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(mine, theirs))
