"""The local Kafka broker and ClickHouse server of the example and the tests."""
