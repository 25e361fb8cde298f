"""Helpers of the flow tests: a small tiny-preset config, running the flow and reading what reran,
and the environment of a `manu` process with its own artifacts and temporary Prefect server."""

import re

from flows.pipeline import EvalSettings, RunConfig, manu
from flows.runs import settled_task_runs

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
