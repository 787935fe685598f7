"""Dependencies point one way: the Dagster-free core (specs, compile, records, lineage, redaction,
pre-launch checks, deployer and launchers, the job runtime, monitoring logic) never imports Dagster or
the Dagster glue. Checked by importing each core module in a fresh interpreter and looking at what got
loaded, so an import hidden in a helper module is caught too."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CORE = [
    "loom_dagster.spec",
    "loom_dagster.loading",
    "loom_dagster.job_config",
    "loom_dagster.python_child",
    "loom_dagster.compile",
    "loom_dagster.catalog",
    "loom_dagster.defs_state",
    "loom_dagster.records",
    "loom_dagster.describe",
    "loom_dagster.schema",
    "loom_dagster.lineage",
    "loom_dagster.redact",
    "loom_dagster.errors",
    "loom_dagster.settings",
    "loom_dagster.deploy",
    "loom_dagster.lineage_events",
    "loom_dagster.deployments",
    "loom_dagster.deploy_checks",
    "loom_dagster.sink_tables",
    "loom_dagster.offset_safety",
    "loom_dagster.progress",
    "loom_dagster.topic_checks",
    "loom_dagster.fence",
    "loom_dagster.orphans",
    "loom_dagster.rewind",
    "loom_dagster.kafka_lag",
    "loom_dagster.kafka.cluster",
    "loom_dagster.kafka.admin",
    "loom_dagster.kafka.isolation",
    "loom_dagster.kafka.offsets",
    "loom_dagster.kafka.snapshot",
    "loom_dagster.kafka.lag_status",
    "loom_dagster.kafka.lag_window",
    "loom_dagster.kafka.lag_eval",
    "loom_dagster.kafka.lag_check",
    "loom_dagster.kafka.delay",
    "loom_dagster.sink_health",
    "loom_dagster.sinks",
    "loom_dagster.sinks.connections",
    "loom_dagster.sinks.targets",
    "loom_dagster.sinks.reading",
    "loom_dagster.sinks.delta_log",
    "loom_dagster.sinks.read_delta",
    "loom_dagster.sinks.read_clickhouse",
    "loom_dagster.sinks.read_sql",
    "loom_dagster.sinks.read",
    "loom_dagster.sinks.freshness",
    "loom_dagster.sinks.table_report",
    "loom_dagster.sinks.payload",
    "loom_dagster.sinks.ddl",
    "loom_dagster.sinks.check_sql",
    "loom_dagster.sinks.check_clickhouse",
    "loom_dagster.sinks.check_delta",
    "loom_dagster.sinks.check_tables",
    "loom_dagster.launchers.base",
    "loom_dagster.launchers.local",
    "loom_dagster.launchers.kubernetes.settings",
    "loom_dagster.launchers.kubernetes.manifests",
    "loom_dagster.launchers.kubernetes.client",
    "loom_dagster.launchers.kubernetes.store",
    "loom_dagster.launchers.kubernetes.launcher",
    "loom_dagster.runtime.job",
    "loom_dagster.runtime.status",
    "loom_dagster.runtime.http_server",
]
GLUE = (
    "loom_dagster.assets",
    "loom_dagster.translator",
    "loom_dagster.graph",
    "loom_dagster.resources",
    "loom_dagster.definitions_builder",
    "loom_dagster.component",
    "loom_dagster.component_models",
    "loom_dagster.scaffold",
    "loom_dagster.schedules",
    "loom_dagster.jobs",
    "loom_dagster.rewind_job",
    "loom_dagster.cli",
    "loom_dagster.manifests_cli",
    "loom_dagster.sensors",
)

_PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(m for m in sys.modules if m == "dagster" or m.startswith(("dagster.", "loom_dagster.")))))
"""


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_neither_dagster_nor_glue(module: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, module], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    loaded = json.loads(out.splitlines()[-1])
    offenders = [m for m in loaded if m == "dagster" or m.startswith("dagster.") or m.startswith(GLUE)]
    assert not offenders, f"{module} pulls in {offenders}"
