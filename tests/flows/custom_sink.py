"""A flow with a storage sink loom-dagster does not know (a custom ``IntoSink``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from loom.streaming import FromTopic, Process, StreamFlow

from tests.flows.shapes import Event


@dataclass(frozen=True)
class IntoMemory:
    """A custom storage sink node (satisfies loom's IntoSink protocol)."""

    payload: type[Any]
    name: str = "memory"
    router_branch_safe: ClassVar[bool] = True

    def build_partition(
        self,
        config: Any,
        worker_index: int,
        worker_count: int,
        bridge: Any = None,
        session_manager: Any = None,
        logger: Any = None,
    ) -> Any:
        raise RuntimeError("never built in these tests")


memory_flow: StreamFlow[Event, Event] = StreamFlow(
    name="memory", source=FromTopic("events", payload=Event), process=Process(IntoMemory(Event))
)
