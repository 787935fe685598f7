"""The ops behind the sensors' declared checks, shaped for code locations with thousands of checks.

A sensor reports its checks' evaluations; the declared checks make them listed in the UI and
runnable one by one (each op body evaluates the selected checks). Two things keep them cheap at load:

- **At most ``CHECKS_PER_OP`` checks an op.** Dagster wires each check op's inputs in a pass that is
  quadratic in the op's check count (every input scans the op's check keys): with the 6,000 checks of
  1,000 flows in three ops, that pass took 0.87 s of a (profiled) load.
- **No inputs where nothing upstream runs.** A check op takes a ``Nothing`` input per target asset so
  a check runs after its asset materializes in the same run (as ``multi_asset_check`` does). A sink
  table is an external asset that no run materializes, so its checks' op has no inputs: half the
  per-check cost. The ops are made with ``dg.op`` and ``AssetChecksDefinition.create``, which
  Dagster documents as the other way to make checks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
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
    return [
        _check_op(name if n == 1 else f"{name}_{n}", list(chunk), body, description, after_targets)
        for n, chunk in enumerate(chunks, start=1)
    ]


def _check_op(
    name: str,
    specs: list[dg.AssetCheckSpec],
    body: Callable[..., Any],
    description: str | None,
    after_targets: bool,
) -> dg.AssetChecksDefinition:
    """One op for *specs*: an optional output per check and, *after_targets*, a ``Nothing`` input per
    target asset (what ``multi_asset_check`` builds, without its per-check inference: ~25% less)."""
    targets = list(dict.fromkeys(spec.asset_key for spec in specs)) if after_targets else []
    inputs = dict(zip(_unique(key.to_python_identifier() for key in targets), targets, strict=True))
    by_output = dict(zip(_unique(spec.get_python_identifier() for spec in specs), specs, strict=True))
    op = dg.op(
        name=name,
        description=description,
        ins={input_name: dg.In(dg.Nothing) for input_name in inputs},
        out={output: dg.Out(is_required=False) for output in by_output},
    )(body)
    return dg.AssetChecksDefinition.create(
        keys_by_input_name=inputs, node_def=op, check_specs_by_output_name=by_output, can_subset=True
    )


def _unique(names: Iterable[str]) -> list[str]:
    """*names* made unique: keys ``a-b`` and ``a_b`` share the identifier ``a_b``; the second gets a number."""
    out: list[str] = []
    for name in names:
        candidate, n = name, 1
        while candidate in out:
            n += 1
            candidate = f"{name}_{n}"
        out.append(candidate)
    return out
