"""The Dagster glue (translator, asset graph, decorator, sensors, Component, dg CLI) in-process, no broker."""
