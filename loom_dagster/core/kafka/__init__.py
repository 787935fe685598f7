"""Kafka for loom flows, without Dagster: one module per concern.

* ``cluster``: ``KafkaCluster`` (client config), ``LagTarget`` and how both are built.
* ``admin``: the AdminClient requests (topics, offsets, committed offsets of many groups at once) and a
  meter of the requests librdkafka sent.
* ``offsets``: ``fetch_offsets``, the one lag fetch (sensor, check, CLI, bench).
* ``snapshot``: ``snapshot_offsets``, watermarks + committed offsets for the deploy's offset check.
* ``delay``: ``fetch_delays``, the age of the oldest unconsumed message of each lagging partition, read
  by one assign-only consumer per cluster (never joins a group), bounded in time and partitions.
* ``lag_status``, ``lag_window``, ``lag_eval``, ``lag_check``: statuses, cursor windows, Burrow-style
  evaluation, and ``check_lag`` (fetch + delay + windows + evaluation, one call per tick).
"""
