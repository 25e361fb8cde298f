"""A throwaway PostgreSQL cluster for Prefect's server, as on a shared lab server: Debian's `postgresql`
package (`.ci/run` installs it where apt is available), `initdb` in a temporary folder, trust auth on
127.0.0.1 only, a free loopback port, fsync off, an empty `prefect` database. `cluster()` yields its
SQLAlchemy URL for `PREFECT_SERVER_DATABASE_CONNECTION_URL`, or None with the reason it cannot run
here (no server binaries, no asyncpg, root without a `postgres` account), and stops and removes it
afterwards (`pg_ctl stop`, then the postmaster itself if that fails)."""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path
from typing import Iterator


def bindir() -> Path | None:
    """The folder of `initdb`, `pg_ctl` and `postgres`: Debian's /usr/lib/postgresql/<version>/bin
    (the newest), else the folder of the `pg_ctl` on PATH."""
    folders = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: [int(n) for n in re.findall(r"\d+", str(p))])
    if pg_ctl := shutil.which("pg_ctl"):
        folders.insert(0, Path(os.path.realpath(pg_ctl)).parent)
    return next((f for f in reversed(folders) if all((f / b).exists() for b in ("initdb", "pg_ctl", "postgres"))), None)


def unavailable() -> str | None:
    """Why no cluster can run here, or None."""
    if find_spec("asyncpg") is None:
        return "asyncpg (Prefect's PostgreSQL driver) is not installed"
    if bindir() is None:
        return ("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: install Debian's `postgresql` "
                "package (`apt-get install -y --no-install-recommends postgresql`; .ci/run does where apt is available)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return ("running as root and there is no `postgres` account to run PostgreSQL as (the server refuses "
                    "root; Debian's postgresql package creates the account)")
    return None


def _as_server_user() -> dict:
    """subprocess arguments that run PostgreSQL's server as a non-root user: `postgres` refuses to run
    as root, so a root test runs it as the `postgres` account Debian's package creates."""
    if os.geteuid() != 0:
        return {}
    pw = pwd.getpwnam("postgres")
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


@contextmanager
def cluster() -> Iterator[tuple[str | None, str | None]]:
    """(URL, None) of a running cluster with an empty `prefect` database, or (None, why not)."""
    if (why := unavailable()) is not None:
        yield None, why
        return
    import asyncpg

    from flows.runs import free_port

    bins, as_user = bindir(), _as_server_user()
    # Not under pytest's tmp_path: its base folder is private to the test's user, and the server may be another.
    root = Path(tempfile.mkdtemp(prefix="manu-test-postgres-"))
    if as_user:
        os.chown(root, as_user["user"], as_user["group"])
    data, log, port = root / "data", root / "server.log", free_port()

    def pg(*args, timeout=120):
        return subprocess.run([str(bins / args[0]), *args[1:]], cwd=root, capture_output=True, text=True,
                              timeout=timeout, **as_user)

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
        yield f"postgresql+asyncpg://manu@127.0.0.1:{port}/prefect", None
    finally:
        if started:
            out = pg("pg_ctl", "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop")
            pidfile = data / "postmaster.pid"
            if out.returncode != 0 and pidfile.exists():  # still running: stop the postmaster itself
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


def query(url: str, sql: str) -> list[tuple]:
    """Rows of `sql` on the database at `url` (Prefect's SQLAlchemy URL)."""
    import asyncpg

    async def go():
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            return [tuple(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()

    return asyncio.run(go())
