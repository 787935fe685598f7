"""The Dagster-free core of loom-dagster.

"Core" here means everything that must not import Dagster (not dbt Core, as in dagster-dbt's ``core/``):
loading and compiling flows and the records derived from their plans (``flows``), the deploy lifecycle
(``deploy``), the checks made before a launch (``checks``), where jobs run (``launchers``), what a job
leaves behind (``job``), Kafka and the table sinks seen from outside a job (``kafka``, ``sinks``),
OpenLineage events, settings, errors and redaction. The Dagster glue at the top of the package
imports this; nothing here imports the glue, ``dagster``, or ``loom_dagster.runtime``. A test
(``tests/core/test_import_rules.py``) imports every module here in a fresh interpreter to keep it so.
"""
