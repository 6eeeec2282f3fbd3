"""What every command shares: the consoles it prints to, the error a user can fix, and the
stop signal long-running commands watch. Only the CLI prints; everything it calls logs.
"""

from __future__ import annotations

import logging
import signal
import threading

from rich.console import Console

# soft_wrap: lines such as "file:line: reason" must stay whole for grep and tests.
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


class UserError(Exception):
    """A mistake the user can fix; shown as one line, without a traceback."""


def log_progress() -> None:
    """Long-running commands (dispatch, beat) log at INFO; one-shot commands only warn."""
    logging.getLogger().setLevel(logging.INFO)


def stop_on_signals() -> threading.Event:
    """One Event that SIGTERM and SIGINT set; long-running commands finish their step and exit."""
    stop = threading.Event()

    def handle(signum: int, _frame: object) -> None:
        logging.getLogger("shelver").info("%s received, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return stop


def fmt(value: object) -> str:
    """A figure for a table cell: floats to four places, None as blank."""
    return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))
