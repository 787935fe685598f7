"""Names of the asset checks loom-dagster declares and the sensors report (so the UI lists them)."""

from __future__ import annotations

JOB_RUNNING = "job_running"
"""On each flow asset: the deployed job is alive, heartbeating and connected."""

KAFKA_LAG = "kafka_lag"
"""On each Kafka-sourced flow asset: consumer lag evaluated over a window (OK/WARN/ERR/STOP/STALL/REWIND)."""

SINK_FRESHNESS = "freshness"
"""On each storage sink asset: new data within the warn/fail windows; flags 'silent while source lags'."""

DEPLOY_CHECKS = "deploy_checks"
"""On each flow asset, reported by every materialization: loom's own deploy checks (``loom.core.checks``)
for the target environment; errors block the deploy where loom enforces them, warnings WARN."""

RESTART_TAG = "loom/restart"
"""Run tag of a restart the job health sensor requested: the run restarts the recorded deployment from its
own config snapshot instead of deploying the config as it is now."""
