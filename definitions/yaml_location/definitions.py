"""The example code location, declared in YAML: ``defs/loom_flows/defs.yaml`` holds the same two loom
flows as ``definitions/definitions.py``, with every asset key under ``yaml/``.

Run it with ``dagster dev -w workspace.components.yaml`` from the repository root (the flows'
import paths, ``definitions.flows.*``, resolve from there).
"""

from pathlib import Path

import dagster as dg

defs = dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
