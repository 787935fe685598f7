"""Kafka for loom flows, without Dagster: one module per concern.

* ``cluster``: ``KafkaCluster`` (client config), ``LagTarget`` and how both are built.
* ``admin``: the AdminClient requests (topics, offsets, committed offsets of many groups at once) and a
  meter of the requests librdkafka sent.
* ``offsets``: ``fetch_offsets``, the one lag fetch (sensor, check, CLI, bench).
* ``snapshot``: ``snapshot_offsets``, watermarks + committed offsets for the deploy's offset check.
* ``lag_status``, ``lag_window``, ``lag_eval``, ``lag_check``: statuses, cursor windows, Burrow-style
  evaluation, and ``check_lag`` (fetch + windows + evaluation, one call per tick).
"""
