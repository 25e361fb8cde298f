"""A sweep spread over two servers (flows/fanout.py), on one machine: a real Prefect server, the
`manu-pool` process work pool with prefect.yaml's deployments, and two workers that stand for two
servers, each started in a working directory of its own with its own device slots (CPU slots claimed
across processes stand in for GPUs) and one shared artifacts folder. The smoke deployment runs a small
sweep (tiny, two forget sets, MANU and gradient ascent: four parts) with `sweep.fan_out`.

Worker A (room for the sweep and one part) starts first and takes the sweep's flow run; worker B (two
parts at a time) starts once the sweep runs. B is killed (SIGKILL to its process group: the worker and
the parts it runs, as when a server dies) as soon as it has finished one part while running another. The
sweep sees the dead part (its lock free, no result), marks it Crashed and starts it again, and A runs
it. Then: each worker finished at least one part, every part's result landed once, and the same sweep
run again, as one flow run through the same deployment, is all cache hits, its comparison included:
the fanned-out sweep made exactly the tasks one flow run makes, in its order (the comparison's key
covers its results folders in order), so the comparison has the same bytes, and rerunning a sweep
redoes nothing a part finished (a fanned-out rerun's parts run those same cached tasks)."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from flows.runs import PREFECT, free_port, start_server, stop

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
SPLITS = [["093", "279"], ["303", "097", "104"]]  # named "2 ids" and "3 ids"


def _sweep() -> dict:
    return {"forget_splits": SPLITS, "alphas": [0.05], "scorings": ["paper"], "ablations": False,
            "methods": ["manu", "ga"], "baseline_scales": [1.0], "fan_out": "manu-part/sweep-part"}


def _config() -> dict:
    return {"model": "tiny", "alpha": 0.05, "lens_samples": 0, "extract_batch_size": 16,
            "eval": {"sets": ["forget", "retain"], "tasks": ["mc"], "max_new_tokens": 8,
                     "max_profiles": {"forget": 2, "retain": 2}}}


def runs_of(log: Path) -> list[str]:
    """The flow runs a worker took, in order: its log says "Worker '<name>' submitting flow run '<id>'",
    then, where another worker got the run first, "Aborted submission of flow run '<id>'"."""
    text = log.read_text() if log.exists() else ""
    aborted = set(re.findall(r"Aborted submission of flow run '([0-9a-f-]{36})'", text))
    return [r for r in dict.fromkeys(re.findall(r"submitting flow run '([0-9a-f-]{36})'", text)) if r not in aborted]


def test_a_sweep_fans_out_over_two_workers_and_survives_losing_one(tiny_model_dir, tmp_path):
    from tests.pipeline.flow_helpers import isolated_env

    arts, env = isolated_env(tmp_path, tiny_model_dir)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env |= {"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api, "PREFECT_UI_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1", "MANU_SLOT_CLAIM": "1", "OMP_NUM_THREADS": "1"}
    server = start_server(env, port, tmp_path / "server.log")
    http = httpx.Client(base_url=api, timeout=30)  # one client for every poll (a new one builds an SSL context)
    workers: dict[str, subprocess.Popen] = {}

    def cli(*args, timeout=300) -> str:
        out = subprocess.run([PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, f"prefect {' '.join(args)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out.stdout + out.stderr

    def start_worker(name: str, limit: int) -> None:
        home = tmp_path / f"server-{name}"  # a working directory and device slots of its own
        home.mkdir()
        wenv = {**env, "MANU_SLOT_LOCKS": str(home / "slots"), "MANU_SLOT_RECORD": str(home / "slots.jsonl")}
        workers[name] = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", "manu-pool", "--name", f"worker-{name}", "--limit", str(limit),
             "--install-policy", "never"], env=wenv, cwd=home, stdout=open(home / "worker.log", "w"),
            stderr=subprocess.STDOUT, start_new_session=True)

    def log_of(name: str) -> Path:
        return tmp_path / f"server-{name}" / "worker.log"

    def run_sweep(wait_for_kill: bool, fan_out: str | None = "manu-part/sweep-part") -> tuple[str, float]:
        t0 = time.time()
        sweep = {**_sweep(), "fan_out": fan_out}
        watched = tmp_path / f"watch-{time.time():.0f}.log"
        proc = subprocess.Popen([PREFECT, "deployment", "run", "manu/smoke", "--param",
                                 f"config={json.dumps(_config())}", "--param", f"sweep={json.dumps(sweep)}",
                                 "--watch"], env=env, cwd=REPO, stdout=open(watched, "w"), stderr=subprocess.STDOUT)
        if wait_for_kill:
            deadline = time.time() + 600
            while not runs_of(log_of("A")):  # A took the sweep's flow run: B may start
                assert time.time() < deadline and proc.poll() is None, "worker A never took the sweep"
                time.sleep(0.5)
            start_worker("B", 2)
            parts = arts / "pipeline" / "parts"
            while True:  # B finished a part and runs another: kill it there (the worker and its parts)
                b_runs = runs_of(log_of("B"))
                state = {r["id"]: r["state"]["type"] for r in http.post(
                    "/flow_runs/filter", json={"flow_runs": {"id": {"any_": b_runs}}}).json()}
                started = {s["flow_run"]: s for s in (json.loads(p.read_text()) for p in parts.glob("*.started.json"))}
                running = [started[r]["pid"] for r in b_runs if state.get(r) == "RUNNING" and r in started]
                if "COMPLETED" in state.values() and running:
                    os.killpg(workers["B"].pid, signal.SIGKILL)
                    workers["B"].wait()
                    for pid in running:  # a flow run's process may have a session of its own
                        try:
                            if os.getpgid(pid) != os.getpgid(0):
                                os.killpg(os.getpgid(pid), signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    break
                assert time.time() < deadline and proc.poll() is None, (
                    "worker B never ran a part while it had finished another:\n" + log_of("B").read_text()[-3000:])
                time.sleep(0.5)
        proc.wait(timeout=900)
        out = watched.read_text()
        assert proc.returncode == 0 and "Completed" in out, out[-3000:] + log_of("A").read_text()[-5000:]
        return out, time.time() - t0

    try:
        cli("work-pool", "create", "manu-pool", "--type", "process")
        cli("--no-prompt", "deploy", "--name", "manu/smoke", "--name", "manu-part/sweep-part")
        start_worker("A", 2)
        _, took = run_sweep(wait_for_kill=True)

        part_runs = http.post("/flow_runs/filter", json={"flows": {"name": {"any_": ["manu-part"]}}}).json()
        states = {r["id"]: r["state"]["type"] for r in part_runs}
        done_by = {w: [r for r in runs_of(log_of(w)) if states.get(r) == "COMPLETED"] for w in ("A", "B")}
        crashed = [r for r, s in states.items() if s == "CRASHED"]
        print(f"fan-out over two workers: {took:.0f} s; completed parts per worker "
              f"{ {w: len(r) for w, r in done_by.items()} }; crashed (B killed): {len(crashed)}")
        assert all(done_by.values()), done_by  # each worker finished at least one part
        assert crashed and set(crashed) <= set(runs_of(log_of("B"))), states  # the part(s) B was running ...
        assert sum(map(len, done_by.values())) == 4  # ... ran again on A: four parts, each completed once
        results = sorted(p for p in (arts / "pipeline" / "parts").glob("*.json") if not p.name.endswith(".started.json"))
        assert len(results) == 4
        folders = [p for r in results for _, p in json.loads(r.read_text())["runs"]]
        assert len(folders) == len(set(folders)) == 2 * 2  # every (split, variant) result once

        # the same sweep in one flow run (fan_out off, through the same deployment and worker): every task a
        # cache hit, the comparison included (its key covers the results folders in order), so the fanned
        # sweep made exactly the folders one flow run makes, and the same comparison bytes
        out, _ = run_sweep(wait_for_kill=False, fan_out=None)
        single = re.search(r"flow-run/([0-9a-f-]{36})", out).group(1)
        tasks = http.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [single]}}}).json()
        names = {t["name"] for t in tasks}
        assert any(n.startswith("comparison") for n in names), names
        assert {t["state"]["name"] for t in tasks} == {"Cached"}, sorted(
            (t["name"], t["state"]["name"]) for t in tasks if t["state"]["name"] != "Cached")
        comparisons = {p.read_bytes() for p in (arts / "pipeline").rglob("comparison.md")}
        assert len(comparisons) == 1

    finally:
        http.close()
        for w in workers.values():
            if w.poll() is None:
                os.killpg(w.pid, signal.SIGINT)
                try:
                    w.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(w.pid, signal.SIGKILL)
                    w.wait()
        stop(server)
