"""A flow as loom-dagster sees it: the spec, import and config, compile, the records derived from the plan, the lineage check, the defs state."""
