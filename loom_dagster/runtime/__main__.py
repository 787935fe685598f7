"""``python -m loom_dagster.runtime``: run one loom streaming flow as a long-lived job."""

import sys

from loom_dagster.runtime.cli import main

if __name__ == "__main__":
    sys.exit(main())
