"""The public API is small and explicit: every name in ``__all__`` resolves, and every ``Loom*`` /
``build_*`` name the README tells users to use is exported from ``loom_dagster`` itself."""

from __future__ import annotations

import re
from pathlib import Path

import loom_dagster

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_exported_name_resolves() -> None:
    for name in loom_dagster.__all__:
        assert getattr(loom_dagster, name) is not None, name


def test_names_the_readme_uses_are_exported() -> None:
    text = README.read_text()
    mentioned = set(re.findall(r"`((?:Loom|build_)\w+)", text))
    imported = {
        name.strip()
        for group in re.findall(r"from loom_dagster import ([\w, ]+)", text)
        for name in group.split(",")
    }
    assert mentioned and imported
    missing = sorted((mentioned | imported) - set(loom_dagster.__all__))
    assert not missing, f"the README uses names loom_dagster does not export: {missing}"
