"""Materialize the ticks flow of a deploy bench in this process (used to run two at once).

``python -m tests.support.materialize_once BOOTSTRAP PREFIX ROOT``: exit 0 on success; on failure
print the step's error message and exit 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

import dagster as dg

from tests.support.deploy_env import DeployBench


def main() -> int:
    bootstrap, prefix, root = sys.argv[1:4]
    bench = DeployBench(bootstrap, prefix, Path(root))
    with dg.instance_for_test() as instance:
        result = bench.materialize(instance)
    if result.success:
        print("deployed")
        return 0
    event = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    print(event.event_specific_data.error.message)  # type: ignore[union-attr]
    return 1


if __name__ == "__main__":
    sys.exit(main())
