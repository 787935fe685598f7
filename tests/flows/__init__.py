"""Flows used by the tests (plain loom, nothing Dagster-specific)."""
