"""A defs-state refresh worker: ``python -m loom_dagster.refresh_worker``, started and driven by
``loom_dagster.refresh_pool`` over its stdin and stdout (one flow at a time). Not for direct use."""

from loom_dagster.refresh_pool import serve

if __name__ == "__main__":
    serve()
