"""The example code location declared in YAML: the same two loom flows as ``definitions.definitions``,
loaded from ``defs/loom_flows/defs.yaml`` by ``LoomFlowsComponent`` (asset keys prefixed ``yaml/``)."""
