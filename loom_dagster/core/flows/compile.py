"""Compile a flow with loom and turn every way it can fail into a clear ``FlowCompileError``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loom_dagster.core.errors import FlowCompileError
from loom_dagster.core.redact import redact_text

if TYPE_CHECKING:
    from loom.core.config import ConfigContext
    from loom.streaming import StreamFlow
    from loom.streaming.compiler import CompiledPlan

DELTA_EXTRA_HINT = (
    "its Delta sink needs polars, pyarrow and deltalake, which are not installed: "
    "pip install 'loom-kernel[etl-polars]' (or 'loom-dagster', which depends on it)"
)


def compile_plan(flow: StreamFlow[Any, Any], config: ConfigContext) -> CompiledPlan:
    """Run ``loom.streaming.compiler.compile_flow``; raise ``FlowCompileError`` naming the flow.

    A ``CompilationError`` becomes one line per issue (code, component, field, message); loom's
    bare ``TypeError`` for a Delta sink without its extra, and its ``KeyError`` for a missing Kafka
    route, become specific messages.
    """
    from loom.streaming.compiler import CompilationError, compile_flow

    try:
        return compile_flow(flow, config=config)
    except CompilationError as exc:
        raise FlowCompileError(render_compilation_error(flow.name, exc)) from exc
    except TypeError as exc:
        if _delta_sink_without_extra(flow):
            raise FlowCompileError(f"flow {flow.name!r} cannot compile: {DELTA_EXTRA_HINT}") from exc
        raise FlowCompileError(f"flow {flow.name!r} cannot compile: {redact_text(str(exc))}") from exc
    except KeyError as exc:
        raise FlowCompileError(
            f"flow {flow.name!r} cannot compile: no Kafka route {exc} in its config; declare "
            "kafka.consumer / kafka.consumers.<name> for the source and kafka.producer / "
            "kafka.producers.<name> for every output and error topic"
        ) from exc
    except ValueError as exc:
        raise FlowCompileError(f"flow {flow.name!r} cannot compile: {redact_text(str(exc))}") from exc


def render_compilation_error(flow_name: str, exc: Any) -> str:
    """One line per loom ``CompilationIssue``: code, component, field and message."""
    issues = list(getattr(exc, "issues", ()))
    lines = [f"loom refused to compile flow {flow_name!r} ({len(issues)} issue(s)):"]
    for issue in issues:
        code = getattr(issue.code, "value", issue.code)
        where = ", ".join(
            f"{label} {value}"
            for label, value in (("component", issue.component), ("field", issue.field))
            if value
        )
        suffix = f" [{where}]" if where else ""
        lines.append(f"  - {code}{suffix}: {redact_text(str(issue.message))}")
    lines.append("Fix the flow or its loom config; nothing was deployed.")
    return "\n".join(lines)


def _delta_sink_without_extra(flow: StreamFlow[Any, Any]) -> bool:
    try:
        from loom.streaming.compiler import walk_process_nodes
        from loom.streaming.nodes._table import common
    except ImportError:
        return False
    if getattr(common, "_DELTA_AVAILABLE", True):
        return False
    return any(
        str(getattr(node, "backend", "")) == "delta" for node in walk_process_nodes(flow.process.nodes)
    )
