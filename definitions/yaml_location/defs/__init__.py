"""Defs folder of the YAML example location: each sub-folder with a ``defs.yaml`` is one component."""
