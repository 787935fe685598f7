"""The ops behind the sensors' declared checks, shaped for code locations with thousands of checks.

A sensor reports its checks' evaluations; the declared checks make them listed in the UI and
runnable one by one (each op body evaluates the selected checks). Two things keep them cheap at load:

- **At most ``CHECKS_PER_OP`` checks an op.** Dagster wires each check op's inputs in a pass that is
  quadratic in the op's check count (every input scans the op's check keys): 3,000 sink checks in one
  op cost ~0.5 s a load, in chunks of 100 a few ms.
- **No inputs where nothing upstream runs.** A ``multi_asset_check`` takes an input per target asset
  so a check runs after its asset materializes in the same run. A sink table is an external asset
  that no run materializes, so its checks are declared with ``AssetChecksDefinition.create`` and no
  inputs, which Dagster documents as the other way to make one: half the per-check cost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import dagster as dg

CHECKS_PER_OP = 100


def declared_check_ops(
    name: str,
    specs: Sequence[dg.AssetCheckSpec],
    body: Callable[..., Any],
    *,
    description: str | None = None,
    after_targets: bool = True,
) -> list[dg.AssetChecksDefinition]:
    """Check definitions for *specs*, ``CHECKS_PER_OP`` an op, each running *body* for its selection.

    The ops are named *name*, then ``<name>_2``, ``<name>_3``...  With *after_targets* a check waits for
    its asset when both run together (``multi_asset_check``); without, its op has no inputs (for
    checks on external assets).

    Example:
        >>> import dagster as dg
        >>> def body(context):
        ...     yield from ()
        >>> specs = [dg.AssetCheckSpec("fresh", asset=f"t{i}") for i in range(250)]
        >>> [d.node_def.name for d in declared_check_ops("fresh_checks", specs, body, after_targets=False)]
        ['fresh_checks', 'fresh_checks_2', 'fresh_checks_3']
    """
    chunks = [specs[i : i + CHECKS_PER_OP] for i in range(0, len(specs), CHECKS_PER_OP)]
    make = _after_targets if after_targets else _without_inputs
    return [
        make(name if n == 1 else f"{name}_{n}", list(chunk), body, description)
        for n, chunk in enumerate(chunks, start=1)
    ]


def _after_targets(
    name: str, specs: list[dg.AssetCheckSpec], body: Callable[..., Any], description: str | None
) -> dg.AssetChecksDefinition:
    return dg.multi_asset_check(specs=specs, name=name, description=description, can_subset=True)(body)


def _without_inputs(
    name: str, specs: list[dg.AssetCheckSpec], body: Callable[..., Any], description: str | None
) -> dg.AssetChecksDefinition:
    by_output = {spec.get_python_identifier(): spec for spec in specs}
    op = dg.op(
        name=name,
        description=description,
        out={output: dg.Out(is_required=False) for output in by_output},
    )(body)
    return dg.AssetChecksDefinition.create(
        keys_by_input_name={}, node_def=op, check_specs_by_output_name=by_output, can_subset=True
    )
