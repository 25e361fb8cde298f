"""A sweep spread over a work pool's workers: each (forget split × method group) runs as its own flow run
of the `manu-part` flow's deployment (prefect.yaml: `manu-part/sweep-part`), started by the sweep's flow
run with `run_deployment` and picked up by whichever worker of the pool is free, on any server that
sees the artifacts folder at the same path. The sweep's flow run then gathers the parts' results
folders, in the order one flow run would have made them, into its one comparison and report.

Two rules make it safe to lose a server mid-sweep:

- every part is idempotent: its stages are cached tasks (content-addressed folders, one computation per
  key under a file lock), so a part run again does only what no run of it finished;
- a part that Prefect reports Crashed (its process died and its supervisor said so) is started again,
  for any live worker to take (at most RESUBMITS times);
- a part holds a lock on `<artifacts>/pipeline/parts/<part>.lock` while it runs (`manu_core.io.file_lock`:
  released by the kernel, or the NFS server, when its process dies). The sweep polls its parts; one
  that the server still shows running whose lock nobody holds, and that wrote no result, died with its
  worker and nobody left to report it: the sweep marks that flow run Crashed and starts the part again.

A part that fails is reported by name with its flow-run link, after every other part has finished;
rerunning the sweep reruns the parts, whose finished tasks are cache hits."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional, Union

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext

from flows.pipeline import Key, RunConfig, SweepConfig, _run_splits_keyed, task_runner
from manu_core.io import atomic_write_json, file_lock, lock_held
from manu_core.vocab import forget_name
from tasks.cache import pipeline_dir

# Methods that share a model's preparation run in one part: MANU, its random control (which draws as
# many units per tower as the MANU variant it shadows) and the attribution bound read one extraction.
# Every other method is a part of its own.
GROUPS = (("manu", "random", "attribution"),)
RESUBMITS = 2  # a part whose worker died is started again at most this many times
POLL_S = 2.0
WAITING_HINT_S = 60.0  # a part still waiting for a worker after this long: say why it may be


def method_groups(methods: list[str]) -> list[list[str]]:
    """`methods` cut into parts, in their order: each of GROUPS that they name (as one part), every
    other method alone."""
    out: list[list[str]] = []
    for m in methods:
        group = next((g for g in GROUPS if m in g), (m,))
        for part in out:
            if part[0] in group:
                part.append(m)
                break
        else:
            out.append([m])
    return out


def part_id(params: dict) -> str:
    """A part's name in the artifacts folder: the hash of everything it is given."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def parts_dir() -> Path:
    return pipeline_dir() / "parts"


def _label(forget, methods: list[str], phase: Optional[int]) -> str:
    return f"{forget_name(forget)} · {'+'.join(methods)}" + (f" · phase {phase}" if phase else "")


@flow(name="manu-part", task_runner=task_runner(), log_prints=True, validate_parameters=False)
def manu_part(config: dict, sweep: dict, forget: Union[str, list[str]], methods: list[str],
              phase: Optional[int] = None, keep: Optional[list[list]] = None) -> dict:
    """One part of a fanned-out sweep: the variants of `methods` on the forget split `forget` (with
    `keep`, only the settings phase one chose), unlearned, evaluated and recorded. Started by the
    sweep's flow run, not by hand; returns (and writes to the artifacts folder) its results folders,
    each with its place in the sweep's order.

    Args:
        config: the sweep's RunConfig (as JSON)
        sweep: the sweep's SweepConfig (as JSON)
        forget: the forget split of this part
        methods: the method group of this part
        phase: 1 or 2 in a two-phase sweep, else empty
        keep: phase two: the [curve, strength] pairs phase one chose
    """
    params = {"config": config, "sweep": sweep, "forget": forget, "methods": methods, "phase": phase, "keep": keep}
    pid = part_id(params)
    out = parts_dir()
    with file_lock(out / f"{pid}.lock"):  # held while this part runs: the sweep's liveness probe
        ctx = FlowRunContext.get()
        atomic_write_json(out / f"{pid}.started.json", {"started": time.time(), "host": socket.gethostname(),
                                                         "pid": os.getpid(), "flow_run": str(ctx.flow_run.id) if ctx else None})
        cfg, sw = RunConfig(**config), SweepConfig(**sweep)
        runs, lenses = _run_splits_keyed(cfg, sw, [forget], methods, phase,
                                         {tuple(k) for k in keep} if keep is not None else None)
        result = {"runs": [[list(k), p] for k, p in runs], "lenses": [[list(k), p] for k, p in lenses]}
        atomic_write_json(out / f"{pid}.json", result)
    get_run_logger().info("part %s: %d results folders", _label(forget, methods, phase), len(runs))
    return result


def fan_out(config: RunConfig, sweep: SweepConfig, splits: list, methods: list[str], phase: Optional[int] = None,
            keep: Optional[set] = None) -> tuple[list[str], list[str]]:
    """Run every (split × method group) as a flow run of `sweep.fan_out`, wait for all of them (starting
    again any whose worker died), and return the results and lens folders in one flow run's order."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Crashed

    log = get_run_logger()
    ctx = FlowRunContext.get()
    tags = sorted(set(ctx.flow_run.tags if ctx and ctx.flow_run else ()) | {"sweep-part"})
    parts = []
    for s, forget in enumerate(splits):
        for group in method_groups(methods):
            params = {"config": config.model_dump(mode="json"), "sweep": sweep.model_dump(mode="json"),
                      "forget": forget, "methods": group, "phase": phase,
                      "keep": sorted([list(k) for k in keep], key=str) if keep is not None else None}
            parts.append({"split": s, "params": params, "id": part_id(params), "label": _label(forget, group, phase),
                          "tries": 0})

    def submit(part: dict) -> None:
        part["tries"] += 1
        run = run_deployment(sweep.fan_out, parameters=part["params"], timeout=0, tags=tags,
                             flow_run_name=part["label"] + (f" (try {part['tries']})" if part["tries"] > 1 else ""))
        part["run"], part["since"], part["suspect"] = run.id, time.time(), 0
        log.info("part %s: flow run %s", part["label"], _link(run.id))

    for part in parts:
        submit(part)
    hinted = False
    with get_client(sync_client=True) as client:
        while True:
            pending = [p for p in parts if "final" not in p]
            if not pending:
                break
            for part in pending:
                state = client.read_flow_run(part["run"]).state
                if state is not None and state.is_crashed() and part["tries"] <= RESUBMITS:
                    # its process died (a worker or its machine lost, the process killed): any live worker may
                    # take it again, and its finished tasks are cache hits
                    log.warning("part %s crashed (%s); started again", part["label"], " ".join((state.message or "").split())[:200])
                    submit(part)
                    continue
                if state is not None and state.is_final():
                    part["final"] = state
                    continue
                if _died(part, state):
                    client.set_flow_run_state(part["run"], Crashed(message="its worker stopped (the part's lock "
                                                                    "was free and it wrote no result)"), force=True)
                    if part["tries"] > RESUBMITS:
                        part["final"] = Crashed(message=f"its worker died {part['tries']} times")
                        continue
                    log.warning("part %s: its worker died; started again", part["label"])
                    submit(part)
                elif (not hinted and state is not None and not state.is_running()
                      and time.time() - part["since"] > WAITING_HINT_S):
                    hinted = True
                    log.warning("part %s has waited %.0f s for a worker: a worker of the pool runs this sweep's "
                                "flow run and its parts at once, so start it with --limit 2 or more (or start "
                                "another worker)", part["label"], time.time() - part["since"])
            time.sleep(POLL_S)
    failed = [p for p in parts if not p["final"].is_completed()]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(parts)} parts of the sweep failed: " + "; ".join(
            f"{p['label']} ({p['final'].name}: {' '.join((p['final'].message or '').split())[:200]}) "
            f"{_link(p['run'])}" for p in failed) + ". Rerun the sweep: the finished tasks are cache hits.")
    runs: list[tuple[Key, str]] = []
    lenses: list[tuple[Key, str]] = []
    for part in parts:
        result = json.loads((parts_dir() / f"{part['id']}.json").read_text())
        runs += [((part["split"], *k[1:]), p) for k, p in result["runs"]]
        lenses += [((part["split"], *k[1:]), p) for k, p in result["lenses"]]
    return [p for _, p in sorted(runs)], _unique(p for _, p in sorted(lenses))


def _died(part: dict, state) -> bool:
    """A part the server shows running (or starting) whose lock nobody holds and that wrote no result,
    twice in a row: its process is gone."""
    out = parts_dir()
    if (state is None or not (state.is_running() or state.is_pending())
            or not (out / f"{part['id']}.started.json").is_file() or (out / f"{part['id']}.json").is_file()
            or (out / f"{part['id']}.started.json").stat().st_mtime < part["since"]
            or lock_held(out / f"{part['id']}.lock")):
        part["suspect"] = 0
        return False
    part["suspect"] += 1
    return part["suspect"] >= 2


def _unique(paths) -> list[str]:
    """In order, each once (every part of a split draws the vanilla model's lens: one cached folder)."""
    seen: dict[str, None] = {}
    for p in paths:
        seen.setdefault(p, None)
    return list(seen)


def _link(flow_run_id) -> str:
    from prefect.utilities.urls import url_for

    return url_for("flow-run", obj_id=flow_run_id) or f"flow run {flow_run_id}"
