"""Against real parts: a Kafka broker from the official jars, Delta / ClickHouse / SQLite tables, job processes."""
