"""``loom-dagster refresh``: write the defs state of a code location ahead of its loads.

It runs the code location's module (as ``dagster dev -m`` / ``-f`` would) with every
``build_loom_defs`` in it compiling its flows and rewriting their entries in the defs state
(``loom_dagster.core.flows.defs_state``). Loads are then fast from the first one, e.g. in a container image
built with the state in it (``LOOM_DAGSTER_DEFS_STATE=/app/.loom-defs-state``).

    loom-dagster refresh -m my_location.definitions
    loom-dagster refresh -f definitions/definitions.py [--workers N] [--progress auto|bar|lines]

The flows compile in worker processes, one per CPU (``--workers``, else
``LOOM_DAGSTER_REFRESH_WORKERS``; 1 compiles them in this process; a location of a few flows always
does). On a terminal a progress bar shows the flows done, the rate and the time left; otherwise (or
with ``--progress lines``) one line per flow, in the location's order, then a summary per load.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from typing import IO, Any

from loom_dagster.core.errors import LoomDagsterError
from loom_dagster.core.flows.defs_state import DefsState, FlowLoad, RefreshProgress, StateLoad, forced_refresh
from loom_dagster.core.flows.refresh_pool import WORKERS_VARIABLE


class RefreshError(LoomDagsterError):
    """The code location cannot be refreshed (it does not load, or holds no loom flows)."""


def add_refresh_parser(commands: Any) -> None:
    """Register ``refresh`` on the ``loom-dagster`` sub-command parser *commands*."""
    refresh = commands.add_parser(
        "refresh",
        help="compile a code location's flows and write its defs state (so loads compile nothing)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = refresh.add_mutually_exclusive_group(required=True)
    where.add_argument("-m", "--module", help="the code location's module (as for dagster -m)")
    where.add_argument("-f", "--file", help="the code location's Python file (as for dagster -f)")
    refresh.add_argument(
        "--workers",
        type=_workers,
        default=None,
        help=f"worker processes compiling the flows (default: ${WORKERS_VARIABLE}, else one per CPU; "
        "1: in this process)",
    )
    refresh.add_argument(
        "--progress",
        choices=("auto", "bar", "lines"),
        default="auto",
        help="a progress bar (on stderr), or one line per flow (on stdout); auto: the bar on a terminal",
    )
    refresh.set_defaults(run=cmd_refresh)


def _workers(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"a whole number >= 1, not {text!r}")
    return count


def cmd_refresh(args: argparse.Namespace) -> int:
    """Run the location with a forced refresh, showing a bar or one line per flow, and a summary."""
    mode = args.progress
    if mode == "auto":
        mode = "bar" if sys.stdout.isatty() and sys.stderr.isatty() else "lines"
    progress = BarProgress() if mode == "bar" else LinesProgress()
    refresh_location(module=args.module, file=args.file, workers=args.workers, progress=progress)
    return 0


class LinesProgress:
    """One line per flow on stdout, in the location's order (flows compiled in a pool finish in any
    order: a line waits for the flows before it), then the load's summary; what the command printed
    before it had a bar, so scripts reading it see the same lines."""

    def __init__(self, out: IO[str] | None = None) -> None:
        self._out = out
        self._waiting: dict[int, FlowLoad] = {}
        self._next = 0

    def begin(self, state: DefsState, total: int) -> None:
        self._waiting, self._next = {}, 0

    def advance(self, index: int, flow: FlowLoad) -> None:
        self._waiting[index] = flow
        while self._next in self._waiting:
            done = self._waiting.pop(self._next)
            self._print(f"refreshed {done.flow_name:<32} {done.seconds * 1000:8.1f} ms  {done.import_path}")
            self._next += 1

    def end(self, state: DefsState, load: StateLoad | None) -> None:
        if load is not None:
            self._print(f"defs state {state.directory}: {load.summary()}")

    def _print(self, line: str) -> None:
        print(line, file=self._out or sys.stdout, flush=True)


class BarProgress:
    """A progress bar per load on stderr (flows done / total, rate, time left: tqdm, which Dagster
    depends on), then the load's summary on stdout."""

    def __init__(self, out: IO[str] | None = None) -> None:
        self._out = out
        self._bar: Any = None

    def begin(self, state: DefsState, total: int) -> None:
        from tqdm import tqdm

        out = self._out or sys.stderr
        # a terminal may not tell its size (a bare pty): tqdm would then hide the bar
        sized = _terminal_size(out) is not None
        self._bar = tqdm(
            total=total,
            unit="flow",
            desc="refreshing",
            file=out,
            dynamic_ncols=sized,
            ncols=None if sized else 100,
            nrows=None if sized else 24,
            smoothing=0.1,
            bar_format="{desc} {percentage:3.0f}% {bar} {n_fmt}/{total_fmt} flows [{elapsed}<{remaining}, {rate_fmt}] {postfix}",
        )

    def advance(self, index: int, flow: FlowLoad) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(flow.flow_name, refresh=False)
            self._bar.update(1)

    def end(self, state: DefsState, load: StateLoad | None) -> None:
        if self._bar is not None:
            if load is not None:
                self._bar.set_postfix_str("", refresh=False)
            self._bar.close()
            self._bar = None
        if load is not None:
            print(f"defs state {state.directory}: {load.summary()}", flush=True)


def _terminal_size(out: IO[str]) -> os.terminal_size | None:
    """The size of the terminal *out* is, or ``None`` (not a terminal, or one that does not say)."""
    try:
        size = os.get_terminal_size(out.fileno())
    except (AttributeError, OSError, ValueError):
        return None
    return size if size.columns > 0 and size.lines > 0 else None


def refresh_location(
    *,
    module: str | None = None,
    file: str | None = None,
    workers: int | None = None,
    progress: RefreshProgress | None = None,
) -> list[Any]:
    """Run the code location *module* or *file* with a forced refresh; return ``[(DefsState, StateLoad)]``.

    *workers*: worker processes compiling the flows (default: ``LOOM_DAGSTER_REFRESH_WORKERS``, else
    the CPUs); *progress*: told of every flow as it is done (``LinesProgress``, ``BarProgress``).

    Raises:
        RefreshError: the location does not load, or builds no state-backed loom definitions.

    Example:
        >>> refresh_location(module="definitions.definitions")  # doctest: +SKIP
    """
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as dagster does for -m / -f
    with forced_refresh(workers=workers, progress=progress) as loads:
        try:
            if module:
                runpy.run_module(module, run_name=module)
            elif file:
                runpy.run_path(file, run_name="__loom_refresh__")
            else:
                raise RefreshError("give the code location: -m MODULE or -f FILE")
        except LoomDagsterError:
            raise
        except Exception as exc:
            raise RefreshError(
                f"code location {module or file!r} failed to load: {type(exc).__name__}: {exc}"
            ) from exc
    if not loads:
        raise RefreshError(
            f"code location {module or file!r} built no state-backed loom definitions (no build_loom_defs "
            "call, state=False, or LOOM_DAGSTER_DEFS_STATE=off): nothing was refreshed"
        )
    return loads
