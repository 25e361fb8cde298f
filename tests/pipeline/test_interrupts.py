"""A `manu` process interrupted (Ctrl-C) or killed mid-run: it stops cleanly, and the rerun resumes
from the cache to an uninterrupted run's results.

One test, three processes of the same `manu run` command: Ctrl-C during extraction, then SIGKILL during
the next extraction, then the run to the end. The first starts its own temporary Prefect server, as
`manu run` does, which the Ctrl-C must take down too; the other two use the test's server
(PREFECT_API_URL), since what they check lives in the artifacts folder, and a temporary server costs
each process seconds of CPU."""

import pytest

from flows.pipeline import EvalSettings, RunConfig
from tests.pipeline.flow_helpers import CAPS, isolated_env, live_in_group, run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness", "one_thread")]


def test_ctrl_c_and_a_kill_mid_extraction_stop_manu_run_and_the_rerun_resumes(tiny_model_dir, tmp_path):
    """1. Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while `extract` runs:
    `manu run` exits 130 within 15 s with one line on how to resume and leaves no process (its
    temporary Prefect server included).
    2. SIGKILL of the process group (a crash) while the rerun's `extract` runs: its unfinished folder
    stays behind.
    3. The same command again: it reuses the finished tasks, cleans the unfinished folder and ends with
    the results of an uninterrupted run (run here, in-process, with the same settings), the same
    cache keys and the same importance bytes."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from prefect.settings import PREFECT_API_URL

    from tasks.cache import pipeline_dir

    caps = ",".join(f"{k}={v}" for k, v in CAPS.items())
    reference, _ = run(RunConfig(model="tiny", eval=EvalSettings(max_profiles=CAPS)))  # what `manu run` builds
    arts, env = isolated_env(tmp_path, tiny_model_dir)
    cmd = [sys.executable, "-c", "from flows.cli import main; main()", "run", "--model", "tiny", "--cap", caps]
    repo = Path(__file__).resolve().parents[2]

    def unfinished() -> set[Path]:
        return set((arts / "pipeline" / "extract").glob("*/.activations.*.tmp"))

    served = {**env, "PREFECT_API_URL": PREFECT_API_URL.value()}  # the harness's server

    def start_and_stop_in_extraction(sig: int, run_env: dict) -> tuple[subprocess.Popen, str, float]:
        """Start the command in its own process group; once a new extraction folder appears, send
        `sig` to the group. (Its own group: also when an assertion fails, the kill below takes the
        flow and the server it started, and leaves nothing behind.)"""
        before = unfinished()
        proc = subprocess.Popen(cmd, env=run_env, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            deadline = time.time() + 300
            while not unfinished() - before:
                assert proc.poll() is None, proc.stdout.read()[-3000:]
                assert time.time() < deadline, "the run never reached extraction"
                time.sleep(0.01)
            os.killpg(proc.pid, sig)
            t0 = time.time()
            try:
                output, _ = proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"manu run still running 15 s after signal {sig}") from None
            return proc, output, time.time() - t0
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()

    # 1. Ctrl-C
    proc, output, took = start_and_stop_in_extraction(signal.SIGINT, env)
    assert took < 15 and proc.returncode == 130, (proc.returncode, output[-3000:])
    assert "interrupted: finished steps are cached" in output and "run the same command again" in output
    deadline = time.time() + 5  # the temporary server's own SIGINT shutdown
    while live_in_group(proc.pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not live_in_group(proc.pid), "a process of the interrupted run is still alive"

    # 2. SIGKILL: no handler runs, so the unfinished extraction folder stays
    proc, output, _ = start_and_stop_in_extraction(signal.SIGKILL, served)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, output[-3000:])
    assert unfinished(), "the kill left no unfinished extraction folder to clean"

    # 3. The same command, to the end
    out = subprocess.run(cmd, env=served, cwd=repo, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    log = out.stdout + out.stderr
    for name in ("prepare_data", "vanilla_model"):
        assert any(f"'{name}-" in l and "Cached" in l for l in log.splitlines()), (name, log[-3000:])
    assert not unfinished()
    report = Path([l for l in out.stdout.splitlines() if l.startswith("results: ")][-1][len("results: "):]).parent
    ref = json.loads((Path(reference) / "results.json").read_text())
    got = json.loads((report / "results.json").read_text())
    assert got["unlearned"] == ref["unlearned"] and got["vanilla"] == ref["vanilla"]
    # Same cache keys (content-addressed), so the same folder names and the same bytes.
    mine = sorted((arts / "pipeline" / "select").glob("*/importance.parquet"))
    assert len(mine) == 1
    theirs = pipeline_dir() / "select" / mine[0].parent.name / "importance.parquet"
    assert mine[0].read_bytes() == theirs.read_bytes()
