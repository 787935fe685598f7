"""loom's table sinks (Delta, ClickHouse, SQL) seen from outside the job, without Dagster.

* targets: ``targets`` (which tables, where, written by which flows), ``connections`` (the connection
  helpers every reader and check shares).
* health: ``reading`` (``SinkReading``), one reader per backend (``read_delta`` over ``delta_log``,
  ``read_clickhouse``, ``read_sql``), ``read`` (dispatch, in threads), ``freshness``.
* pre-launch table checks: ``table_report`` (records), ``payload`` (payload columns and type
  categories), one check per backend (``check_sql``, ``check_clickhouse``, ``check_delta``), ``ddl``,
  ``check_tables`` (entry point).

Nothing is re-exported here, so importing one module loads only what it needs.
"""
