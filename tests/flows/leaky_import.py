"""The shapes flow (``tests.flows.shapes``) from a module that raises at import when
``LOOM_TEST_LEAK_AT_IMPORT`` is set, with that text as its message: a flow module that reads a DSN
from its environment and fails to connect while being imported. For the redaction tests; unset, the
module imports cleanly (a definitions load succeeds, a later import in the run fails).
"""

from __future__ import annotations

import os

from tests.flows.shapes import Event, Row, make_flow

LEAK_ENV = "LOOM_TEST_LEAK_AT_IMPORT"

_leak = os.environ.get(LEAK_ENV)
if _leak:
    raise RuntimeError(f"cannot open the lookup database: {_leak}")

__all__ = ["LEAK_ENV", "Event", "Row", "make_flow"]
