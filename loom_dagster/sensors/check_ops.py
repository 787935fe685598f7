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
- **One input per target, whatever its checks.** ``flow_check_ops`` puts several kinds of checks on
  the same assets (a flow's ``job_running`` and ``kafka_lag``) in one set of ops, a target's checks
  in the same op: one input for both (at 1,000 flows, 0.13 s less CPU at load than two sets).
- **One ``In`` and one ``Out`` for every check.** Each one made resolves its Dagster type again.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import dagster as dg

from loom_dagster.resource import LoomDeployResource

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

    A chunk ends only between two targets: consecutive specs on one asset stay in one op.
    """
    chunks = _chunks(specs)
    return [
        _check_op(name if n == 1 else f"{name}_{n}", list(chunk), body, description, after_targets)
        for n, chunk in enumerate(chunks, start=1)
    ]


@dataclass(frozen=True)
class CheckKind:
    """The declared checks of one name, and what evaluates those of them a run selected."""

    name: str
    specs: Sequence[dg.AssetCheckSpec]
    evaluate: Callable[..., Iterator[dg.AssetCheckResult]]
    """``evaluate(context, loom)`` (``loom``: the deploy resource): a result for each selected check of
    this name, and none for any other."""


def flow_check_ops(
    name: str, kinds: Sequence[CheckKind], *, description: str | None = None
) -> list[dg.AssetChecksDefinition]:
    """One set of check ops (``declared_check_ops``, after their targets) for several kinds of checks
    on the same assets: a target's checks of every kind in the same op, which then waits for the
    target once. The body runs each kind with a selected check (and needs the ``loom`` resource).

    Example:
        >>> import dagster as dg
        >>> def running(context, loom):
        ...     yield from ()
        >>> kinds = [CheckKind(n, [dg.AssetCheckSpec(n, asset=f"f{i}") for i in range(60)], running)
        ...          for n in ("job_running", "kafka_lag")]
        >>> [len(d.check_keys) for d in flow_check_ops("flow_checks", kinds)]
        [100, 20]
    """
    chosen = [kind for kind in kinds if kind.specs]
    by_target: dict[dg.AssetKey, list[dg.AssetCheckSpec]] = {}
    for kind in chosen:
        for spec in kind.specs:
            by_target.setdefault(spec.asset_key, []).append(spec)

    def body(context, loom: LoomDeployResource) -> Iterator[dg.AssetCheckResult]:  # type: ignore[no-untyped-def]
        # ``context`` unannotated: under ``from __future__ import annotations`` Dagster would see a string
        names = {key.name for key in context.selected_asset_check_keys}
        for kind in chosen:
            if kind.name in names:
                yield from kind.evaluate(context, loom)

    ordered = [spec for specs in by_target.values() for spec in specs]
    return declared_check_ops(name, ordered, body, description=description)


def _chunks(specs: Sequence[dg.AssetCheckSpec]) -> list[list[dg.AssetCheckSpec]]:
    """*specs* in chunks of about ``CHECKS_PER_OP``, a chunk ending only where the target changes."""
    chunks: list[list[dg.AssetCheckSpec]] = []
    current: list[dg.AssetCheckSpec] = []
    for spec in specs:
        if len(current) >= CHECKS_PER_OP and spec.asset_key != current[-1].asset_key:
            chunks.append(current)
            current = []
        current.append(spec)
    if current:
        chunks.append(current)
    return chunks


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
    after, result = _shared_in_out()
    op = dg.op(
        name=name,
        description=description,
        ins=dict.fromkeys(inputs, after),
        out=dict.fromkeys(by_output, result),
    )(body)
    return dg.AssetChecksDefinition.create(
        keys_by_input_name=inputs, node_def=op, check_specs_by_output_name=by_output, can_subset=True
    )


@functools.cache
def _shared_in_out() -> tuple[dg.In, dg.Out]:
    """The ``Nothing`` input and the optional output every check op takes, made once: ``In`` and
    ``Out`` are immutable, and each one made (or an ``Out`` left to infer its type from the body)
    resolves its Dagster type again, ~10 µs a check. The output's type is the one ``multi_asset_check``
    gives its outputs (``Out(None)``: ``Any``)."""
    return dg.In(dg.Nothing), dg.Out(None, is_required=False)


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
