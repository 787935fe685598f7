"""Dagster Components of loom-dagster."""
