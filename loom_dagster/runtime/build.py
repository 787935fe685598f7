"""Build the loom pieces of a job: observability with our observer, runtime settings, the runner."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loom_dagster.runtime.observer import StatusObserver

if TYPE_CHECKING:
    from loom.core.config import ConfigContext
    from loom.core.observability.runtime import ObservabilityRuntime
    from loom.streaming import StreamFlow
    from loom.streaming.bytewax import StreamingRunner


def build_observability(
    config: ConfigContext, environment: str, observer: StatusObserver
) -> ObservabilityRuntime:
    """The runtime loom would build from ``observability:`` config, plus ``observer``.

    Passing an ``observability_runtime`` to loom replaces the one it would build from config, so
    the configured observers (structlog, Prometheus), tracer and scrape port are carried over.
    """
    from loom.core.config import ConfigKey
    from loom.core.observability.config import ObservabilityConfig
    from loom.core.observability.observer.noop import NoopObserver
    from loom.core.observability.runtime import ObservabilityRuntime

    settings = config.section_or_default(ConfigKey.OBSERVABILITY, ObservabilityConfig, ObservabilityConfig())
    base = ObservabilityRuntime.from_config(settings, environment=environment)
    observers = [item for item in base.observers if not isinstance(item, NoopObserver)]
    return ObservabilityRuntime(
        [*observers, observer],
        tracer=base.tracer,
        _scrape_port=getattr(base, "_scrape_port", None),
        _scrape_addr=getattr(base, "_scrape_addr", "127.0.0.1"),
        _span_flusher=getattr(base, "_span_flusher", None),
        _max_span_links=base.max_span_links,
    )


def build_runner(
    flow: StreamFlow[Any, Any],
    config: ConfigContext,
    environment: str,
    observability: ObservabilityRuntime,
) -> StreamingRunner:
    """Compile the flow against its config (deploy checks included) into a runner."""
    from loom.streaming.bytewax import StreamingRunner

    from loom_dagster.runtime.loom_logging import note_error_routes

    runner = StreamingRunner.from_context(
        flow, config=config, observability_runtime=observability, environment=environment
    )
    note_error_routes(runner)  # a routed record's log line names its error topic
    return runner


def is_runtime_configuration_error(exc: BaseException) -> bool:
    """True for loom's refusal of a runtime setting at prepare time (a config error)."""
    try:
        from loom.streaming.bytewax._errors import RuntimeConfigurationError
    except ImportError:
        return False
    return isinstance(exc, RuntimeConfigurationError)
