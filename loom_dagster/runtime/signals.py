"""SIGTERM/SIGINT handling: both take loom's graceful path (bytewax drains on KeyboardInterrupt).

loom installs no SIGTERM handler, so by default SIGTERM kills the process at once and every row
staged in a table buffer is lost from memory. bytewax checks for pending Python signals in its
run loop; when a handler raises ``KeyboardInterrupt`` there, it stops the workers and closes
every sink partition, which flushes table buffers (``flush_on_shutdown``), then ``cli_main``
raises ``BytewaxRuntimeError("signal received")`` chained to the ``KeyboardInterrupt``.

The handler is installed for SIGINT too: a process started in the background by a shell
inherits ``SIG_IGN`` for SIGINT, and Python then never installs its own handler.

Only the first signal raises; later ones are logged and ignored so they cannot abort the drain
(send SIGKILL to stop a drain that hangs).
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from types import FrameType

log = logging.getLogger("loom_dagster.runtime")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Installs the stop handlers and remembers which signal asked to stop."""

    def __init__(self, on_stop: Callable[[str], None]) -> None:
        self._on_stop = on_stop
        self.received: str | None = None
        self._armed = True

    def install(self) -> None:
        """Install the handler for SIGTERM and SIGINT (replacing an inherited ``SIG_IGN``)."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def disarm(self) -> None:
        """From now on only record signals: the run is over, cleanup must not be interrupted."""
        self._armed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        name = signal.Signals(signum).name
        if self.received is not None:
            _note(f"{name} received while already stopping ({self.received}); ignored")
            return
        self.received = name
        self._on_stop(name)
        if self._armed:
            _note(f"{name} received: draining (flushing sinks, committing offsets), then exiting")
            raise KeyboardInterrupt(name)


def _note(message: str) -> None:
    """Write one line to stderr without the logging module (no locks inside a signal handler)."""
    try:
        sys.stderr.write(f"loom-dagster runtime: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError, RuntimeError):
        pass
