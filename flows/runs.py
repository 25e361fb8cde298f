"""Reading a finished flow run back from the Prefect API (tests and benchmarks check what ran and
what came from the cache)."""

from __future__ import annotations

import time

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId


def settled_task_runs(flow_state, timeout: float = 120.0) -> list:
    """The task runs the API server recorded for a finished flow run (its returned state), once each
    has a final state. Task-run states and names reach the server as events a moment after the
    flow returns (longer on a loaded machine), so reading them at once can see `Running` or a
    default name. Returns what is recorded after `timeout` seconds either way."""
    flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id]))
    deadline = time.monotonic() + timeout
    seen = -1  # a task run the server has not heard of yet is invisible: wait until the count holds still
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=flow_runs)
            settled = all(r.state and r.state.is_final() for r in runs)
            if (settled and len(runs) == seen) or time.monotonic() > deadline:
                return runs
            seen = len(runs) if settled else -1
            time.sleep(1.0)
