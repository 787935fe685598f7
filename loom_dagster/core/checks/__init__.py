"""What is checked before a launch: loom's own deploy checks, sink tables, topics, offsets, the consumer-group fence."""
