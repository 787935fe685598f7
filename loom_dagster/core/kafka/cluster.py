"""What to watch: a Kafka cluster as a client reaches it, and one flow's lag target. No Dagster here."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from loom_dagster.core.flows.records import LoomFlow

_CONNECTION_KEY_PREFIXES = (
    "security.",
    "sasl.",
    "ssl.",
    "ssl_",
    "enable.ssl",
    "client.",
    "socket.",
    "broker.",
    "api.version",
    "oauthbearer",
    "https.",
    "resolve.",
    "connections.",
)
PROBE_TIMEOUT_S = 2.0
"""Longest wait for the TCP probe that precedes any Kafka client (a closed port fails at once)."""


@dataclass(frozen=True)
class KafkaCluster:
    """A Kafka cluster as a client reaches it: bootstrap servers plus security/connection settings.

    ``config`` may hold secrets (SASL password): it is left out of ``repr``; ``bootstrap`` is the label.
    """

    bootstrap: str
    config: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    def client_config(self) -> dict[str, str]:
        """librdkafka configuration reaching this cluster."""
        return {"bootstrap.servers": self.bootstrap, **dict(self.config)}

    def addresses(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every bootstrap server."""
        out = []
        for server in self.bootstrap.split(","):
            server = server.strip().split("://")[-1]
            host, _, port = server.rpartition(":")
            out.append((host.strip("[]") or server, int(port or 9092)))
        return out


@dataclass(frozen=True)
class LagTarget:
    """One flow to watch: a unique name (the sensor uses the asset key), its group, topics and cluster."""

    name: str
    group: str
    topics: tuple[str, ...]
    cluster: KafkaCluster
    idle_tail: int = 0
    """Rows a healthy job may hold in loom table buffers on an idle topic (their offsets stay
    uncommitted until more data arrives): a STOP with at most this much lag is reported OK."""


def cluster_for(consumer_settings: Any) -> KafkaCluster:
    """The cluster of loom ``ConsumerSettings`` (brokers, security, connection keys of ``extra``)."""
    conf: dict[str, str] = {}
    security = getattr(consumer_settings, "security", None)
    if security is not None:
        conf.update({k: _conf_str(v) for k, v in security.to_confluent_config().items()})
    for key, value in (getattr(consumer_settings, "extra", None) or {}).items():
        if key.startswith(_CONNECTION_KEY_PREFIXES):
            conf[key] = _conf_str(value)
    brokers = ",".join(sorted(str(b) for b in consumer_settings.brokers))
    return KafkaCluster(bootstrap=brokers, config=tuple(sorted(conf.items())))


def lag_target(name: str, flow: LoomFlow, consumer_settings: Any, idle_tail: int = 0) -> LagTarget | None:
    """The target of a Kafka-sourced flow (``None`` for a Mongo-sourced one)."""
    if flow.source_kind != "kafka" or not flow.consumer_group or not flow.source_topics:
        return None
    topics = tuple(dict.fromkeys(t.topic for t in flow.source_topics))
    return LagTarget(name, flow.consumer_group, topics, cluster_for(consumer_settings), idle_tail)


def record_target(name: str, source: Mapping[str, Any]) -> LagTarget | None:
    """The target of a deployment record's source summary (``deploy.source_summary``: brokers, group,
    topics, no credentials), or ``None`` for a non-Kafka source. A secured cluster cannot be reached
    from it (check ``source["secured"]`` first)."""
    topics = tuple(dict.fromkeys(str(t) for t in source.get("topics") or ()))
    if source.get("kind") != "kafka" or not source.get("group_id") or not topics:
        return None
    brokers = ",".join(sorted(str(b) for b in source.get("brokers") or ()))
    return LagTarget(name, str(source["group_id"]), topics, KafkaCluster(brokers))


def _conf_str(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def probe(cluster: KafkaCluster, timeout_s: float) -> str | None:
    """``None`` if some bootstrap server accepts a TCP connection, else why none did (no Kafka request)."""
    errors = []
    for host, port in cluster.addresses():
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                return None
        except OSError as exc:
            errors.append(f"{host}:{port}: {exc.strerror or exc}")
    return "no bootstrap server accepts connections (" + "; ".join(errors) + ")"


def unreachable_brokers(cluster: KafkaCluster, timeout_s: float) -> str | None:
    """``None`` when the cluster answers a metadata request and every broker it advertises accepts a TCP
    connection from here; else why not (a broker advertising ``localhost`` to a pod fails here).

    A metadata request only: it never touches a group coordinator (librdkafka#4605).
    """
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({**cluster.client_config(), "socket.timeout.ms": str(int(timeout_s * 1000))})
    try:
        brokers = admin.list_topics(timeout=timeout_s).brokers
    except Exception as exc:  # KafkaException: the bootstrap servers did not answer
        return f"{cluster.bootstrap}: no answer to a metadata request within {timeout_s:g}s ({exc})"
    refused = []
    for broker in brokers.values():
        try:
            with socket.create_connection((broker.host, broker.port), timeout=timeout_s):
                pass
        except OSError as exc:
            refused.append(
                f"broker {broker.id} advertises {broker.host}:{broker.port}: {exc.strerror or exc}"
            )
    if refused:
        return f"{cluster.bootstrap}: " + "; ".join(refused) + " (check the brokers' advertised.listeners)"
    return None
