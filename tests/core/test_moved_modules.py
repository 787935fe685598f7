"""The module paths before the core moved under ``loom_dagster/core`` still import (with a warning), as
the same module objects, so a ``defs.yaml`` naming ``loom_dagster.component.LoomFlowsComponent`` or a script
importing ``loom_dagster.rewind`` keeps working."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

from loom_dagster.core.moved_modules import MOVED, moved_to
from tests.support.imports import package_modules

CURRENT = package_modules()


def test_no_old_path_is_also_a_current_module() -> None:
    assert sorted(set(MOVED) & set(CURRENT)) == []
    assert set(MOVED.values()) <= set(CURRENT), sorted(set(MOVED.values()) - set(CURRENT))


_PROBE = """
import importlib, json, sys, warnings
import loom_dagster
from loom_dagster.core.moved_modules import MOVED
seen = {}
for old, new in sorted(MOVED.items(), key=lambda item: item[0].count(".")):  # parents first
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    target = importlib.import_module(new)
    seen[old] = [module is target, target.__spec__.name, target.__name__, [str(w.message) for w in caught]]
print(json.dumps(seen))
"""


def test_every_old_path_is_its_new_module_with_a_warning() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True).stdout
    seen = json.loads(out.splitlines()[-1])
    assert sorted(seen) == sorted(MOVED)
    for old, (same, spec_name, name, warned) in seen.items():
        new = MOVED[old]
        assert (same, spec_name, name) == (True, new, new), old
        assert f"{old} moved to {new}; import it from there (or from loom_dagster)" in warned, old


def test_a_module_of_a_moved_package_is_loaded_once() -> None:
    assert (
        moved_to("loom_dagster.launchers.kubernetes.settings")
        == "loom_dagster.core.launchers.kubernetes.settings"
    )
    old = importlib.import_module("loom_dagster.launchers.kubernetes.settings")
    assert old is importlib.import_module("loom_dagster.core.launchers.kubernetes.settings")


def test_the_old_component_type_still_resolves_in_dagster() -> None:
    from dagster_shared.seven import load_module_object

    from loom_dagster import LoomFlowsComponent

    assert load_module_object("loom_dagster.component", "LoomFlowsComponent") is LoomFlowsComponent
    assert load_module_object("loom_dagster", "LoomFlowsComponent") is LoomFlowsComponent
