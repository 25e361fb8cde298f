"""Reading a finished flow run back from the Prefect API (tests and benchmarks check what ran and
what came from the cache), and a Prefect server on loopback for the tests and scripts that run the
README's server steps (`free_port`, `start_server`, `stop`)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

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


PREFECT = str(Path(sys.executable).with_name("prefect"))  # the `prefect` command of this environment


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env: dict, port: int, log: Path, timeout: float = 120.0) -> subprocess.Popen:
    """`prefect server start` on 127.0.0.1:`port` with `env`, its output in `log`, returned once
    /api/health answers; RuntimeError with the log's tail if it exits or does not answer in `timeout` s."""
    import httpx

    with open(log, "w") as out:  # the server writes to its own copy of the file
        server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port),
                                   "--analytics-off"], env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    with httpx.Client(timeout=2) as http:  # one client: each new one builds an SSL context (~0.1 s of CPU)
        while True:
            try:
                if http.get(f"http://127.0.0.1:{port}/api/health").status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                raise RuntimeError("the Prefect server did not start:\n" + Path(log).read_text()[-3000:])
            time.sleep(0.5)


def stop(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 30) -> None:
    """Stop a server or worker started here: `sig` (SIGINT by default: a worker ignores SIGTERM for 20 s
    or more), then SIGKILL if it has not exited after `timeout` s."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
