"""``loom-dagster refresh``: write the defs state of a code location ahead of its loads.

It runs the code location's module (as ``dagster dev -m`` / ``-f`` would) with every
``build_loom_defs`` in it compiling its flows and rewriting their entries in the defs state
(``loom_dagster.core.flows.defs_state``). Loads are then fast from the first one, e.g. in a container image
built with the state in it (``LOOM_DAGSTER_DEFS_STATE=/app/.loom-defs-state``).

    loom-dagster refresh -m my_location.definitions
    loom-dagster refresh -f definitions/definitions.py
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from typing import Any

from loom_dagster.core.errors import LoomDagsterError
from loom_dagster.core.flows.defs_state import forced_refresh


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
    refresh.set_defaults(run=cmd_refresh)


def cmd_refresh(args: argparse.Namespace) -> int:
    """Run the location with a forced refresh; print one line per flow and a summary."""
    loads = refresh_location(module=args.module, file=args.file)
    for state, load in loads:
        for flow in load.flows:
            print(f"refreshed {flow.flow_name:<32} {flow.seconds * 1000:8.1f} ms  {flow.import_path}")
        print(f"defs state {state.directory}: {load.summary()}")
    return 0


def refresh_location(*, module: str | None = None, file: str | None = None) -> list[Any]:
    """Run the code location *module* or *file* with a forced refresh; return ``[(DefsState, StateLoad)]``.

    Raises:
        RefreshError: the location does not load, or builds no state-backed loom definitions.

    Example:
        >>> refresh_location(module="definitions.definitions")  # doctest: +SKIP
    """
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as dagster does for -m / -f
    with forced_refresh() as loads:
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
