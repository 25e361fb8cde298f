"""Prefect's server on PostgreSQL, as on a shared lab server: a real PostgreSQL (Debian's `postgresql`
package; `.ci/run` installs it where apt is available) in a temporary folder on a free loopback port, a
`prefect server start` pointed at it, a process work pool, the `smoke` deployment run through a
worker to Completed; the flow run and its task runs are then read back from Postgres itself. Skipped,
with the reason, where the PostgreSQL server binaries or the asyncpg driver are missing. Everything
started here is stopped (the worker by SIGINT, the server, then `pg_ctl stop`)."""

import asyncio
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from flows.runs import PREFECT, free_port, start_server, stop

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def _pg_bindir() -> Path | None:
    """The folder of `initdb`, `pg_ctl` and `postgres`: Debian's /usr/lib/postgresql/<version>/bin
    (the newest), else the folder of the `pg_ctl` on PATH."""
    folders = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: [int(n) for n in re.findall(r"\d+", str(p))])
    if pg_ctl := shutil.which("pg_ctl"):
        folders.insert(0, Path(os.path.realpath(pg_ctl)).parent)
    return next((f for f in reversed(folders) if all((f / b).exists() for b in ("initdb", "pg_ctl", "postgres"))), None)


def _as_server_user() -> dict:
    """subprocess arguments that run PostgreSQL's server as a non-root user: `postgres` refuses to run
    as root, so a root test runs it as the `postgres` account Debian's package creates."""
    if os.geteuid() != 0:
        return {}
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no `postgres` account to run PostgreSQL as "
                    "(the server refuses root; Debian's postgresql package creates the account)")
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL cluster (trust auth on 127.0.0.1 only, fsync off) with an empty
    `prefect` database: its SQLAlchemy URL for Prefect. Stopped and removed afterwards."""
    pytest.importorskip("asyncpg", reason="asyncpg (Prefect's PostgreSQL driver) is not installed")
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: install Debian's "
                    "`postgresql` package (`apt-get install -y --no-install-recommends postgresql`; .ci/run "
                    "does where apt is available)")
    import asyncpg

    as_user = _as_server_user()
    # Not under tmp_path: pytest's base folder is private to the test's user, and the server may be another.
    root = Path(tempfile.mkdtemp(prefix="manu-test-postgres-"))
    if as_user:
        os.chown(root, as_user["user"], as_user["group"])
    data, log, port = root / "data", root / "server.log", free_port()

    def pg(*args, timeout=120):
        out = subprocess.run([str(bindir / args[0]), *args[1:]], cwd=root, capture_output=True, text=True,
                             timeout=timeout, **as_user)
        return out

    started = False
    try:
        out = pg("initdb", "-D", str(data), "-U", "manu", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync")
        assert out.returncode == 0, f"initdb failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
        opts = (f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
                "-c full_page_writes=off")
        out = pg("pg_ctl", "-D", str(data), "-l", str(log), "-o", opts, "-w", "-t", "60", "start")
        started = True
        assert out.returncode == 0, f"pg_ctl start failed:\n{out.stderr[-2000:]}\n{log.read_text()[-3000:]}"

        async def create():
            conn = await asyncpg.connect(host="127.0.0.1", port=port, user="manu", database="postgres")
            try:
                await conn.execute("CREATE DATABASE prefect")
            finally:
                await conn.close()

        asyncio.run(create())
        yield f"postgresql+asyncpg://manu@127.0.0.1:{port}/prefect"
    finally:
        if started:
            out = pg("pg_ctl", "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop")
            pidfile = data / "postmaster.pid"
            if out.returncode != 0 and pidfile.exists():  # still running: stop the postmaster itself
                import signal

                pid = int(pidfile.read_text().split()[0])
                os.kill(pid, signal.SIGQUIT)
                for _ in range(100):
                    try:
                        os.kill(pid, 0)
                    except ProcessLookupError:
                        break
                    time.sleep(0.1)
                else:
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def _query(url: str, sql: str) -> list[tuple]:
    import asyncpg

    async def go():
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            return [tuple(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()

    return asyncio.run(go())


def test_smoke_deployment_on_a_prefect_server_backed_by_postgres(postgres_url, tiny_model_dir, tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = tmp_path / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api,
           "PREFECT_SERVER_DATABASE_CONNECTION_URL": postgres_url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_UI_ENABLED": "false"}
    logs = {"worker": open(tmp_path / "worker.log", "w")}
    server = start_server(env, port, tmp_path / "server.log", timeout=180)
    worker = None
    try:

        def cli(*args, timeout=180):
            out = subprocess.run([PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
            assert out.returncode == 0, f"prefect {' '.join(args)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
            return out.stdout + out.stderr

        cli("work-pool", "create", "manu-pool", "--type", "process")
        assert "manu/smoke" in cli("--no-prompt", "deploy", "--name", "smoke")
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "manu-pool", "--limit", "1",
                                   "--install-policy", "never"], env=env, cwd=REPO, stdout=logs["worker"],
                                  stderr=subprocess.STDOUT)
        watched = cli("deployment", "run", "manu/smoke", "--watch", timeout=900)
        assert "Completed" in watched, watched[-3000:] + (tmp_path / "worker.log").read_text()[-5000:]

        # The runs live in Postgres (no SQLite file was made): the flow run, and its task runs, each
        # Completed (computed here) or Cached (its step already ran in this test session).
        assert not list(home.rglob("*.db")), list(home.rglob("*.db"))
        flows = _query(postgres_url, "SELECT d.name, f.state_type FROM flow_run f JOIN deployment d ON d.id = f.deployment_id")
        assert flows == [("smoke", "COMPLETED")], flows
        tasks = dict(_query(postgres_url, "SELECT state_name, count(*) FROM task_run GROUP BY state_name"))
        assert tasks and set(tasks) <= {"Completed", "Cached"}, tasks
    finally:
        if worker is not None:
            stop(worker)  # SIGINT: a worker ignores SIGTERM for 20 s or more
        stop(server)
        for f in logs.values():
            f.close()
    assert server.returncode is not None and (worker is None or worker.returncode is not None)
