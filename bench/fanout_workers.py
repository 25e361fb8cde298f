"""Wall time of a fanned-out sweep (flows/fanout.py) on one worker against two, side by side.

    python bench/fanout_workers.py            # tiny, the sweep of tests/pipeline/test_fanout.py

For each worker count: a fresh artifacts folder (the trained tiny model copied in, so no training is
timed), a real Prefect server, prefect.yaml's `manu/smoke` and `manu-part/sweep-part` deployments, then
`prefect deployment run manu/smoke --watch` with the sweep's parameters, timed from the command to
Completed. One worker runs with --limit 2 (the sweep's flow run and one part at a time); two workers
stand for two servers (--limit 2 and --limit 1: the sweep's flow run plus one part each). Every model
process uses one torch thread. On one machine the workers share its cores, so this measures the
scheduling (parts on both workers at once), not two machines' worth of compute."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def one(workers: list[int], model_dir: Path, sweep: dict, config: dict) -> tuple[float, dict]:
    from flows.runs import PREFECT, free_port, start_server, stop
    from tests.pipeline.test_fanout import runs_of

    tmp = Path(tempfile.mkdtemp(prefix="manu-fanout-bench-"))
    arts = tmp / "artifacts"
    shutil.copytree(model_dir, arts / "models" / model_dir.name)
    port = free_port()
    env = {**os.environ, "MANU_ARTIFACTS": str(arts), "PREFECT_HOME": str(tmp / "prefect-home"),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_UI_ENABLED": "false",
           "PREFECT_WORKER_QUERY_SECONDS": "1", "OMP_NUM_THREADS": "1", "MANU_SLOT_CLAIM": "1",
           "MANU_PREFECT_RESULTS": "", "DO_NOT_TRACK": "1"}
    server = start_server(env, port, tmp / "server.log")
    procs = []
    try:
        for args in (["work-pool", "create", "manu-pool", "--type", "process"],
                     ["--no-prompt", "deploy", "--name", "manu/smoke", "--name", "manu-part/sweep-part"]):
            subprocess.run([PREFECT, *args], env=env, cwd=REPO, check=True, capture_output=True, timeout=300)
        for i, limit in enumerate(workers):
            home = tmp / f"server-{i}"
            home.mkdir()
            procs.append(subprocess.Popen(
                [PREFECT, "worker", "start", "--pool", "manu-pool", "--name", f"w{i}", "--limit", str(limit),
                 "--install-policy", "never"], cwd=home, stdout=open(home / "worker.log", "w"), stderr=subprocess.STDOUT,
                env={**env, "MANU_SLOT_LOCKS": str(home / "slots")}, start_new_session=True))
        t0 = time.time()
        out = subprocess.run([PREFECT, "deployment", "run", "manu/smoke", "--param", f"config={json.dumps(config)}",
                              "--param", f"sweep={json.dumps(sweep)}", "--watch"], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=1800)
        took = time.time() - t0
        if out.returncode != 0 or "Completed" not in out.stdout + out.stderr:
            raise RuntimeError((out.stdout + out.stderr)[-3000:])
        return took, {f"w{i}": len(runs_of(tmp / f"server-{i}" / "worker.log")) for i in range(len(workers))}
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGINT)
                p.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, signal.SIGKILL)
        stop(server)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"  # the tiny model as the tests train it (one thread: its own key)
    from manu_core.presets import resolve_model
    from tasks.cache import models_dir
    from tests.pipeline.test_fanout import _config, _sweep

    model = resolve_model("tiny", models=models_dir())
    sweep, config = _sweep(), _config()
    rows = [(name, *one(workers, model, sweep, config)) for name, workers in
            (("one worker (--limit 2)", [2]), ("two workers (--limit 2, --limit 1)", [2, 1]))]
    print(f"sweep: tiny, forget sets {sweep['forget_splits']}, methods {sweep['methods']}: 4 parts")
    for name, took, per in rows:
        print(f"{name:<36} {took:6.1f} s   flow runs per worker (sweep + parts): {per}")
    print(f"two workers / one worker: {rows[1][1] / rows[0][1]:.2f}")


if __name__ == "__main__":
    main()
