"""The sweep's fan-out on a Dask LocalCluster with 2 worker processes (prefect-dask), each on a slot of
its own (two CPU slots claimed across processes stand in for two GPUs: tasks/devices.py)."""

import json
from pathlib import Path

import polars as pl
import pytest

from flows.pipeline import SweepConfig, manu

from .test_flow import config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def test_sweep_on_a_dask_local_cluster(tiny_model_dir, tmp_path, monkeypatch):
    from prefect_dask import DaskTaskRunner

    # the workers inherit these: two slots, claimed across processes as CUDA slots are, each hold recorded
    record = tmp_path / "slots.jsonl"
    for k, v in {"MANU_DEVICE_SLOTS": "2", "MANU_SLOT_CLAIM": "1", "MANU_SLOT_LOCKS": str(tmp_path / "locks"),
                 "MANU_SLOT_RECORD": str(record)}.items():
        monkeypatch.setenv(k, v)

    runner = DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True,
                                            "dashboard_address": None})
    sweep = SweepConfig(forget_splits=[["093", "279", "303"]], alphas=[0.05, 0.1], scorings=["paper"], ablations=False,
                        methods=["manu"])
    state = manu.with_options(task_runner=runner)(config(), sweep, return_state=True)
    assert state.is_completed(), state
    out = Path(state.result())
    table = pl.read_parquet(out / "sweep.parquet")
    assert set(table["method"]) == {"vanilla", "manu[paper] α=0.05", "manu[paper] α=0.1"}
    assert set(table["set"]) == {"forget", "test", "retain", "celebrity"}
    assert (out / "sweep.md").read_text().startswith("| forget | method |")
    reports = sorted(Path(p).parent for p in (out.parent.parent / "results").glob("*/results.json"))
    alphas = {json.loads((r / "results.json").read_text())["run"]["variant"].get("alpha") for r in reports}
    assert {0.05, 0.1} <= alphas
    # the sweep's report: tables (Table 1, Table 2 for the two α) and every figure, beside the table
    md = (out / "report" / "report.md").read_text()
    assert "**Table 2: MANU at each pruning ratio α" in md and "Table 7" not in md
    assert len(list((out / "report" / "figures").glob("3-ids-*.png"))) == 5
    assert (out / "report" / "report.html").stat().st_size > 10_000
    # one device per worker process: each ran every model task on one slot, and no two shared one
    holds = [json.loads(line) for line in record.read_text().splitlines()]
    slots_of = {}
    for h in holds:
        slots_of.setdefault(h["pid"], set()).add(h["slot"])
    print("model tasks per worker process and the slot each used:",
          {pid: (sorted(s), sum(h["pid"] == pid for h in holds)) for pid, s in slots_of.items()})
    assert len(slots_of) == 2 and all(len(s) == 1 for s in slots_of.values()), slots_of
    assert set.union(*slots_of.values()) == {0, 1}
    assert "evaluate" in {h["task"] for h in holds}  # (the extraction may be another test's cache hit)
