"""The web application as part of ``shelver demo``: a real ``shelver serve`` process on a free
local port, and a demo admin whose password is made up for this run."""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

from shelver.web.auth import set_password

log = logging.getLogger(__name__)

DEMO_USER = "demo"
START_TIMEOUT_S = 30.0


class DemoWebError(RuntimeError):
    """The web application did not come up; the message says where its log is."""


@dataclass(frozen=True)
class DemoSite:
    url: str
    user: str
    password: str


@contextlib.contextmanager
def demo_site(engine: Engine, env: dict[str, str], log_path: Path) -> Iterator[DemoSite]:
    """``shelver serve`` on 127.0.0.1 with ``env``'s settings; stopped when the block ends."""
    password = secrets.token_urlsafe(12)
    set_password(engine, DEMO_USER, "admin", password)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "shelver.worker", "serve", "--port", str(port)],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_until_up(process, url + "login", log_path)
            yield DemoSite(url, DEMO_USER, password)
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_up(process: subprocess.Popen, url: str, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DemoWebError(f"shelver serve exited with {process.returncode}; see {log_path}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1):
            return
        time.sleep(0.2)
    raise DemoWebError(
        f"shelver serve did not answer within {START_TIMEOUT_S:.0f} s; see {log_path}"
    )
