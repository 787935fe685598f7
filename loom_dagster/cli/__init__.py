"""``loom-dagster``: the operator's command line, one module per command (see :mod:`loom_dagster.cli.main.main`)."""
