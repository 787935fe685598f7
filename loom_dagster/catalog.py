"""Load, compile and describe every flow of a code location once, with errors that name the flow."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from loom_dagster.compile import compile_plan
from loom_dagster.describe import config_hash, describe_plan
from loom_dagster.errors import FlowCompileError, FlowLoadError
from loom_dagster.records import LoomFlow
from loom_dagster.spec import LoomFlowSpec

if TYPE_CHECKING:
    from loom.streaming.compiler import CompiledPlan


@dataclass(frozen=True)
class CompiledFlow:
    """A spec, the records derived from its compiled plan, and the plan itself."""

    spec: LoomFlowSpec
    flow: LoomFlow
    plan: CompiledPlan
    compile_seconds: float


def compile_spec(spec: LoomFlowSpec, environment: str | None = None) -> CompiledFlow:
    """Import, configure and compile one flow; describe it as records.

    Raises ``FlowLoadError`` / ``FlowCompileError`` whose message starts with the import path.
    """
    try:
        stream_flow = spec.load_flow()
        env = spec.resolved_environment(environment)
        config = spec.load_config(env)
        started = time.perf_counter()
        plan = compile_plan(stream_flow, config)
        elapsed = time.perf_counter() - started
        described = describe_plan(
            stream_flow, plan, import_path=spec.import_path, environment=env, config_hash=config_hash(config)
        )
    except (FlowLoadError, FlowCompileError) as exc:
        raise type(exc)(f"[{spec.import_path}] {exc}") from exc
    described = replace(
        described,
        group_name=spec.group_name,
        description=spec.description,
        owners=tuple(spec.owners),
        tags=tuple(sorted(spec.tags.items())),
    )
    return CompiledFlow(spec=spec, flow=described, plan=plan, compile_seconds=elapsed)


def compile_specs(specs: Sequence[LoomFlowSpec]) -> list[CompiledFlow]:
    """Compile every spec; one failing flow fails the load with its own message."""
    return [compile_spec(spec) for spec in specs]


def config_section(compiled: CompiledFlow) -> dict[str, Any]:
    """Small, secret-free summary of a compiled flow for metadata."""
    return {
        "plan_hash": compiled.flow.plan_hash,
        "config_hash": compiled.flow.config_hash,
        "environment": compiled.flow.environment,
        "compile_ms": round(compiled.compile_seconds * 1000, 1),
    }
