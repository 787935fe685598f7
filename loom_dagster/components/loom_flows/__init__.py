"""``LoomFlowsComponent``: loom flows declared in a ``defs.yaml``."""
