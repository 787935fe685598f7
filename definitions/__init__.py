"""Example code location for loom-dagster: two loom flows, their lineage and batch assets."""
