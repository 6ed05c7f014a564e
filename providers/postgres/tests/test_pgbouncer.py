"""Behind PgBouncer in transaction mode, with the settings docs/postgres-deployment.md gives.

A real ``pgbouncer`` (Debian's package; ``.ci/run`` installs it) is started on a free port in
front of the test server. Each client transaction may run on a different server connection, so
anything that relied on session state (LISTEN, a SET, a prepared statement, a session advisory
lock) would break here. Without the binary the test is skipped with a loud reason.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from perdure import ActivityContext, OrchestrationContext, Registry, Runtime, RuntimeOptions
from perdure_postgres import PostgresProvider, migrate

PGBOUNCER = shutil.which("pgbouncer") or (
    "/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def bouncer_dsn(pg_dsn: str) -> Iterator[str]:
    """A transaction-mode PgBouncer in front of the session's database; yields its DSN."""
    if PGBOUNCER is None:
        pytest.skip(
            "!!! SKIPPED: pgbouncer is not installed (apt-get install pgbouncer): "
            "the PgBouncer test did NOT run"
        )
    target = conninfo_to_dict(pg_dsn)
    port = _free_port()
    # pgbouncer refuses to run as root; as root it is told to switch to the postgres user, who
    # must be able to read its files.
    folder = Path(tempfile.mkdtemp(prefix="perdure-pgbouncer-"))
    folder.chmod(0o777)
    user = str(target.get("user") or "postgres")
    (folder / "users.txt").write_text(f'"{user}" ""\n')
    (folder / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"app = host={target.get('host', '127.0.0.1')} port={target.get('port', 5432)} "
        f"dbname={target['dbname']} user={user}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {folder / 'users.txt'}\n"
        "pool_mode = transaction\ndefault_pool_size = 3\nmax_client_conn = 200\n"
        f"logfile = {folder / 'pgbouncer.log'}\npidfile = {folder / 'pgbouncer.pid'}\n"
    )
    for name in ("users.txt", "pgbouncer.ini"):
        (folder / name).chmod(0o644)
    command = [PGBOUNCER, str(folder / "pgbouncer.ini")]
    if os.geteuid() == 0:
        command[1:1] = ["-u", "postgres"]
    output = folder / "output.txt"  # a file, not a pipe nobody reads that could fill and block it
    with output.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    dsn = f"host=127.0.0.1 port={port} dbname=app user={user}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                psycopg.connect(dsn, connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"pgbouncer did not start:\n{output.read_text(errors='replace')}")
                time.sleep(0.1)
        yield dsn
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(folder, ignore_errors=True)


app = Registry()


@app.activity
def double(ctx: ActivityContext, x: int) -> int:
    return 2 * x


@app.orchestration
async def work(ctx: OrchestrationContext, n: int) -> int:
    first = await ctx.call_activity(double, n)
    await ctx.sleep(0.05)
    both = await ctx.all([ctx.call_activity(double, first), ctx.call_activity(double, n)])
    return sum(both)


async def test_runtime_works_through_transaction_mode_pgbouncer(
    pg_dsn: str, schema: str, bouncer_dsn: str
) -> None:
    migrate(pg_dsn, schema=schema)  # the migrator connects directly (session advisory lock)
    provider = PostgresProvider(
        bouncer_dsn,
        schema=schema,
        migrate=False,
        listen=False,
        notify=False,
        prepare_threshold=None,
        statement_timeout=None,
        max_pool_size=6,
    )
    # Six client connections share three server connections: consecutive transactions of one
    # client land on different backends.
    options = RuntimeOptions(poll_interval=0.1)
    async with provider, Runtime(provider, app, options) as runtime:
        ids = [await runtime.client.start_orchestration(work, n) for n in range(40)]
        for n, instance_id in enumerate(ids):
            status = await runtime.client.wait_for_orchestration(instance_id, timeout=60)
            assert status.result() == 4 * n + 2 * n
