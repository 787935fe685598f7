"""Unit tests of the Dagster-free core, one folder per area of ``loom_dagster/core`` (fast: ``pytest tests/core``)."""
