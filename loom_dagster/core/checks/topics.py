"""Before launch: every Kafka topic a flow reads or writes is there (or will be created by the broker).

The job would find out only after it was launched and the running version drained: a missing source topic
fails its first poll, a missing output topic its first write. Asked here with one metadata request per
cluster, with the job's own connection settings (brokers, SASL/SSL), bounded by a timeout. No Dagster here.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loom_dagster.core.errors import DeploymentError
from loom_dagster.core.kafka.cluster import KafkaCluster, cluster_for
from loom_dagster.core.redact import redact_text

if TYPE_CHECKING:
    from loom_dagster.core.flows.catalog import CompiledFlow

_AUTO_CREATE = "auto.create.topics.enable"


@dataclass(frozen=True)
class TopicsReport:
    """The topics checked per cluster, and those the broker will create on first write."""

    checked: tuple[str, ...]
    auto_created: tuple[str, ...] = ()


class TopicsMissing(DeploymentError):
    """A topic the flow needs is missing, or its cluster cannot be reached; nothing was launched."""


def check_topics(compiled: CompiledFlow, *, timeout_s: float = 10.0) -> TopicsReport:
    """Raise ``TopicsMissing`` listing every missing topic (with its role) and unreachable cluster.

    Example:
        >>> check_topics(compiled, timeout_s=5).checked  # doctest: +SKIP
        ('orders', 'orders.enriched', 'orders.dlq')
    """
    wanted = _wanted_topics(compiled)
    problems: list[str] = []
    checked: list[str] = []
    auto_created: list[str] = []
    for cluster, topics in wanted.items():
        try:
            existing, auto_create = _cluster_topics(cluster, timeout_s)
        except Exception as exc:  # any client failure is "cannot reach", reported with its reason
            problems.append(
                f"cannot reach the Kafka cluster {cluster.bootstrap} within {timeout_s:.0f}s "
                f"({type(exc).__name__}: {exc}); topics {', '.join(sorted(topics))} unchecked. Check that "
                "the brokers in the flow's kafka config are reachable from this host (and the security settings)."
            )
            continue
        for topic, role in sorted(topics.items()):
            if topic in existing:
                checked.append(topic)
            elif role != "source" and auto_create:
                auto_created.append(topic)
            else:
                problems.append(_missing(topic, role, cluster))
    if problems:
        lines = [
            f"flow {compiled.flow.name!r}: {len(problems)} Kafka problem(s) before launch; nothing was "
            "launched and the running job (if any) was not touched:",
            *(f"  - {p}" for p in problems),
        ]
        raise TopicsMissing(redact_text("\n".join(lines)))
    return TopicsReport(tuple(checked), tuple(auto_created))


def _missing(topic: str, role: str, cluster: KafkaCluster) -> str:
    if role == "source":
        return (
            f"source topic {topic!r} does not exist on {cluster.bootstrap}: create it (e.g. kafka-topics.sh "
            f"--create --topic {topic} --partitions N --bootstrap-server {cluster.bootstrap}) or fix "
            "kafka.consumer.topics"
        )
    return (
        f"{role} topic {topic!r} does not exist on {cluster.bootstrap} and the broker does not create topics "
        f"({_AUTO_CREATE}=false): create it, or fix the producer's topic in the flow's kafka config"
    )


def _wanted_topics(compiled: CompiledFlow) -> dict[KafkaCluster, dict[str, str]]:
    """Per cluster, every topic the flow needs and its role (source, output, dlq)."""
    plan: Any = compiled.plan
    wanted: dict[KafkaCluster, dict[str, str]] = defaultdict(dict)
    source_settings = getattr(plan.source, "settings", None)
    if compiled.flow.source_kind == "kafka" and source_settings is not None:
        cluster = cluster_for(source_settings)
        for source in compiled.flow.source_topics:
            wanted[cluster][source.topic] = "source"
    roles = {out.topic: out.role.value for out in compiled.flow.output_topics}
    sinks = [*plan.terminal_sinks.values(), *plan.error_routes.values()]
    for sink in sinks:
        topic = getattr(sink, "topic", None)
        settings = getattr(sink, "settings", None)
        if topic and settings is not None and getattr(settings, "brokers", None):
            wanted[cluster_for(settings)].setdefault(topic, roles.get(topic, "output"))
    return dict(wanted)


def _cluster_topics(cluster: KafkaCluster, timeout_s: float) -> tuple[set[str], bool]:
    """The cluster's topic names, and whether its brokers create a topic on first write."""
    from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

    admin = AdminClient({**cluster.client_config(), "socket.timeout.ms": str(int(timeout_s * 1000))})
    metadata = admin.list_topics(timeout=timeout_s)
    topics = {name for name, meta in metadata.topics.items() if meta.error is None}
    auto_create = False
    broker_ids = sorted(metadata.brokers)
    if broker_ids:
        resource = ConfigResource(ResourceType.BROKER, str(broker_ids[0]))
        try:
            configs = admin.describe_configs([resource], request_timeout=timeout_s)[resource].result(
                timeout=timeout_s
            )
            entry = configs.get(_AUTO_CREATE)
            auto_create = entry is not None and str(entry.value).lower() == "true"
        except Exception:  # no DescribeConfigs permission: treat as "does not auto-create" (stricter)
            auto_create = False
    return topics, auto_create
