"""Development helpers: local services (a real Kafka broker) for tests and demos."""
