"""The sensors' settings live in the Dagster-free core (:mod:`loom_dagster.settings`); re-exported here."""

from loom_dagster.settings import (
    JobHealthSettings,
    KafkaLagSettings,
    LoomSensorSettings,
    SinkFreshness,
    SinkHealthSettings,
)

__all__ = [
    "JobHealthSettings",
    "KafkaLagSettings",
    "SinkFreshness",
    "SinkHealthSettings",
    "LoomSensorSettings",
]
