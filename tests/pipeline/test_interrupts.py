"""A `manu` process interrupted (Ctrl-C) or killed mid-run: it stops cleanly, and the rerun resumes
from the cache to an uninterrupted run's results."""

import pytest

from flows.pipeline import EvalSettings, RunConfig
from tests.pipeline.flow_helpers import CAPS, config, isolated_env, live_in_group, run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness", "one_thread")]


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
