"""The product as a user runs it: a real `prefect server start`, a process work pool, `prefect
deploy` from prefect.yaml, a worker, `prefect deployment run manu/smoke --watch`; then everything
started here is stopped (SIGINT for the worker, which ignores SIGTERM for a long while)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from flows.runs import free_port, start_server

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def _stop(proc: subprocess.Popen, sig=signal.SIGINT, timeout=30) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_smoke_deployment_runs_on_a_real_server(tiny_model_dir, tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_UI_ENABLED": "false"}
    logs = {"worker": open(tmp_path / "worker.log", "w")}
    server = start_server(env, port, tmp_path / "server.log")
    worker = None
    try:

        def cli(*args, timeout=180):
            out = subprocess.run([PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
            assert out.returncode == 0, f"prefect {' '.join(args)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
            return out.stdout + out.stderr

        cli("work-pool", "create", "manu-pool", "--type", "process")
        deployed = cli("--no-prompt", "deploy", "--all")
        assert "manu/smoke" in deployed and "manu/full-sweep" in deployed
        # The run form (the deployment's parameter schema, as the UI reads it): the importance weights
        # are four labelled number fields, each saying what empty means, not an empty JSON editor.
        [smoke] = httpx.post(f"{api}/deployments/filter", json={"deployments": {"name": {"any_": ["smoke"]}}},
                             timeout=10).json()
        schema = smoke["parameter_openapi_schema"]
        weights = schema["definitions"]["RunConfig"]["properties"]["weights"]
        fields = schema["definitions"][weights["$ref"].rsplit("/", 1)[-1]]["properties"]
        assert sorted(fields) == ["abs", "freq", "rms", "var"]
        assert all("the mode's default" in f["description"] and f["default"] is None for f in fields.values())
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "manu-pool", "--limit", "1",
                                   "--install-policy", "never"], env=env, cwd=REPO, stdout=logs["worker"],
                                  stderr=subprocess.STDOUT)
        watched = cli("deployment", "run", "manu/smoke", "--watch", timeout=900)
        assert "Completed" in watched, watched[-3000:] + (tmp_path / "worker.log").read_text()[-5000:]
        # One field overridden from the command line: the deployment's other settings (α, its evaluation
        # caps and token budget) still apply, where Prefect alone would replace the whole config. The
        # field is the logit lens's sample count: only the lens tasks and the tables rerun.
        watched = cli("deployment", "run", "manu/smoke", "--param", 'config={"lens_samples": 7}', "--watch", timeout=900)
        assert "Completed" in watched, watched[-3000:] + (tmp_path / "worker.log").read_text()[-5000:]
        pipeline = Path(os.environ["MANU_ARTIFACTS"]) / "pipeline"
        runs = [json.loads(p.read_text())["run"] for p in pipeline.glob("results/*/results.json")]
        [overridden] = [r for r in runs if r["config"]["lens_samples"] == 7]  # no other test uses 7
        assert overridden["config"]["model"] == "tiny" and overridden["config"]["alpha"] == 0.05
        assert overridden["config"]["eval"]["max_new_tokens"] == 16
        assert overridden["config"]["eval"]["max_profiles"] == {"forget": 2, "test": 2, "retain": 2, "celebrity": 2}

        artifacts = httpx.post(f"{api}/artifacts/filter", json={}, timeout=10).json()
        keys = {a["key"] for a in artifacts if a.get("key")}
        assert any(k.endswith("-results") for k in keys), keys
        assert any(k.endswith("-selected-neurons") for k in keys), keys
        # Without MANU_ARTIFACTS_URL an output is its path as copyable text (no dead file:// link).
        paths = {a["key"]: a["data"] for a in artifacts if (a.get("key") or "").endswith(("-activations", "-importance", "-model"))}
        assert len(paths) == 3, paths  # activations, importance and model (the two runs share them)
        for key, data in paths.items():
            assert "file://" not in data and Path(data.strip("`")).exists(), (key, data)
    finally:
        if worker is not None:
            _stop(worker)  # SIGINT: a worker ignores SIGTERM for 20 s or more
        _stop(server)
        for f in logs.values():
            f.close()
    assert server.returncode is not None and (worker is None or worker.returncode is not None)
