"""Regenerate docs/example-full-sweep/: the report of the `full-sweep` deployment on the embedded default.

    python docs/make_example.py                      # exactly the full-sweep deployment's parameters
    python docs/make_example.py --deployment relearn-sweep --out docs/example-relearn
                                                     # the relearning attacks (another deployment, another folder)
    python docs/make_example.py --max-profiles 5     # every evaluation set capped at 5 profiles (faster)

Runs the `manu` flow in this process with the parameters of the `full-sweep` deployment in
prefect.yaml (same as `prefect deployment run manu/full-sweep`, without a worker), optionally capping
every evaluation set at --max-profiles seeded profiles, then copies the sweep's report.md, figures/
and comparison/ into docs/example-full-sweep/ with a header saying how it was made, and writes
timing.md: the wall time and each stage's share of the task runs' summed durations. Cached tasks
make a rerun cheap (and its timing meaningless: delete artifacts/pipeline/ for a cold run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def deployment_parameters(name: str = "full-sweep") -> dict:
    import yaml

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for d in spec["deployments"]:
        if d["name"] == name:
            return d["parameters"]
    raise SystemExit(f"no deployment {name!r} in prefect.yaml")


def stage_timing(flow_run_id, wall_s: float, paused: tuple[float, float] | None = None) -> str:
    """The wall time and each stage's (task function's) share of the task runs' summed durations,
    read back from the Prefect API, as a markdown table. `paused`: a window (epoch seconds) when the
    run's process was stopped, taken out of the wall time and of every task run that spanned it."""
    import asyncio
    from collections import defaultdict

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def runs():
        async with get_client() as client:
            out, offset = [], 0
            while batch := await client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), offset=offset, limit=200):
                out += batch
                offset += len(batch)
            return out

    def overlap(start: float, end: float) -> float:
        return max(0.0, min(end, paused[1]) - max(start, paused[0])) if paused else 0.0

    total, count = defaultdict(float), defaultdict(int)
    for tr in asyncio.run(runs()):
        stage = tr.task_key.rsplit("-", 1)[0]  # the task function's name
        cut = overlap(tr.start_time.timestamp(), tr.end_time.timestamp()) if tr.start_time and tr.end_time else 0.0
        total[stage] += tr.total_run_time.total_seconds() - cut
        count[stage] += 1
    summed = sum(total.values()) or 1.0
    note = (f" ({(paused[1] - paused[0]) / 60:.1f} min when the process was stopped taken out)" if paused else "")
    lines = [f"Wall time {wall_s / 60:.1f} min{note}; task runs sum to {summed / 60:.1f} min "
             "(tasks run in threads, so the sum may exceed the wall time).", "",
             "| stage (task) | task runs | minutes | share |", "|---|---|---|---|"]
    for stage in sorted(total, key=total.get, reverse=True):
        lines.append(f"| {stage} | {count[stage]} | {total[stage] / 60:.1f} | {100 * total[stage] / summed:.0f} % |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-profiles", type=int, default=0, help="cap on every evaluation set (0: the deployment's own caps)")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "example-full-sweep")
    ap.add_argument("--deployment", default="full-sweep", help="the prefect.yaml deployment whose parameters to run")
    ap.add_argument("--flow-run", help="write the docs from this finished flow run (its id) and --sweep-dir "
                                       "instead of running the sweep (e.g. after the copy step failed)")
    ap.add_argument("--sweep-dir", type=Path, help="with --flow-run: the sweep's folder (artifacts/pipeline/sweep_table/<key>/)")
    ap.add_argument("--paused", nargs=2, type=float, metavar=("FROM", "TO"),
                    help="with --flow-run: epoch seconds between which the run's process was stopped (SIGSTOP); "
                         "taken out of the wall time and the stage durations")
    ap.add_argument("--redraw", type=Path, metavar="REPORT_DIR",
                    help="redraw report.md and figures/ of --out from a finished `report` task folder (its "
                         "sources.json names the runs), keeping the header, comparison/ and timing.md: after a "
                         "change to the report's layout, without rerunning anything")
    args = ap.parse_args()
    if args.redraw:
        return redraw(args.out, args.redraw)

    cap = (f"every evaluation set capped at {args.max_profiles} seeded profiles" if args.max_profiles
           else "the deployment's own evaluation caps")
    if args.flow_run:
        if not args.sweep_dir:
            raise SystemExit("--flow-run needs --sweep-dir (the folder the run wrote: artifacts/pipeline/sweep_table/<key>/)")
        flow_run_id, sweep_dir, took = args.flow_run, args.sweep_dir, flow_run_seconds(args.flow_run)
        if args.paused:
            took -= args.paused[1] - args.paused[0]
    else:
        from flows.pipeline import RunConfig, SweepConfig, manu
        from flows.plan import plan
        from manu_core.vocab import EVAL_SETS

        params = deployment_parameters(args.deployment)
        config = params["config"]
        if args.max_profiles:
            config.setdefault("eval", {})["max_profiles"] = {s: args.max_profiles for s in EVAL_SETS}
        sweep = {**params["sweep"], "fan_out": None}  # all in this process: no work pool to fan out over
        run_config, sweep_config = RunConfig(**config), SweepConfig(**sweep)
        planned = plan(run_config, sweep_config)  # `manu plan`'s count and estimate, before the run
        t0 = time.perf_counter()
        state = manu(run_config, sweep_config, return_state=True)
        took = time.perf_counter() - t0
        flow_run_id, sweep_dir = state.state_details.flow_run_id, Path(state.result())
    timing = stage_timing(flow_run_id, took, tuple(args.paused) if args.flow_run and args.paused else None)
    if not args.flow_run:
        timing += "\n" + planned_beside(planned, took)
    flags = (f" --deployment {args.deployment} --out {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}"
             if args.deployment != "full-sweep" else "") + (f" --max-profiles {args.max_profiles}" if args.max_profiles else "")
    header = (f"> Generated by `python docs/make_example.py{flags}`: "
              f"the `{args.deployment}` deployment's parameters (prefect.yaml) on the embedded "
              f"`{deployment_parameters(args.deployment)['config'].get('model', 'lite')}` preset, {cap}; "
              f"{took / 60:.0f} min on this machine (cached tasks count as done; stages: timing.md). The same "
              "folder, with report.html (images embedded), is under artifacts/pipeline/sweep_table/ after a run; "
              "the comparison (headline, intervals, trade-off curves) is comparison/comparison.md.\n\n")
    write_docs(args.out, Path(sweep_dir), header, timing)
    print(timing)
    print(f"{args.out / 'report.md'} ({took:.0f} s)")


def planned_beside(planned, took: float) -> str:
    """The plan's estimate beside the measured wall time, then the plan itself (its stages, counts and
    per-stage estimates), as timing.md's second part."""
    from flows.plan import plan_markdown

    if planned.total is None:
        head = f"`manu plan` had no measured costs for this machine class: estimate unknown; took {took / 60:.1f} min."
    else:
        head = (f"`manu plan` estimated **{planned.total / 60:.1f} min** before the run; it took **{took / 60:.1f} min** "
                f"(measured ÷ estimated = {took / planned.total:.2f}).")
    body = plan_markdown(planned, "what the sweep was expected to run").replace("# Plan", "## Plan", 1)
    return head + "\n\n" + body


def redraw(out: Path, report_dir: Path) -> None:
    import json
    import tempfile

    from manu_core.io import atomic_dir
    from tasks.reporting import write_report

    src = json.loads((report_dir / "sources.json").read_text())
    old = (out / "report.md").read_text()
    header = old[: old.index("\n# ") + 1]  # the "Generated by ..." lines above the report's title
    with tempfile.TemporaryDirectory() as tmp_dir:
        fresh = Path(tmp_dir)
        write_report(fresh, src["reports"], src["lenses"], src["title"], src["chosen_alpha"])
        with atomic_dir(out) as tmp:
            (tmp / "report.md").write_text(header + (fresh / "report.md").read_text())
            shutil.copytree(fresh / "figures", tmp / "figures")
            for keep in ("comparison", "timing.md"):
                (shutil.copytree if (out / keep).is_dir() else shutil.copy2)(out / keep, tmp / keep)
    print(f"{out / 'report.md'} redrawn from {report_dir}")


def write_docs(out: Path, sweep_dir: Path, header: str, timing: str) -> None:
    from manu_core.io import atomic_dir

    with atomic_dir(out) as tmp:
        (tmp / "report.md").write_text(header + (sweep_dir / "report" / "report.md").read_text())
        shutil.copytree(sweep_dir / "report" / "figures", tmp / "figures")
        shutil.copytree(sweep_dir / "comparison", tmp / "comparison")
        (tmp / "timing.md").write_text(timing)


def flow_run_seconds(flow_run_id: str) -> float:
    """A finished flow run's wall time, from the Prefect API."""
    import asyncio

    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return await client.read_flow_run(flow_run_id)

    run = asyncio.run(read())
    return (run.end_time - run.start_time).total_seconds()


if __name__ == "__main__":
    main()
