"""Sensors that watch deployed flows: job health (restart with backoff), Kafka consumer lag, sink health."""
