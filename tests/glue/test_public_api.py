"""The public API is small and explicit: ``__all__``, the lazy export table and the typed imports name
the same objects, each of them imports in a fresh interpreter, and every ``Loom*`` / ``build_*`` name
the README tells users to use (and every name its examples import from ``loom_dagster``) is exported."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import loom_dagster

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
INIT = ROOT / "loom_dagster" / "__init__.py"

CORE = {
    "LoomFlowSpec",
    "build_loom_defs",
    "build_loom_flow_assets",
    "build_loom_asset_graph",
    "LoomDeployResource",
    "LoomTranslator",
    "LoomSensorSettings",
    "loom_flow_assets",
    "deploy_loom_flows",
    "build_job_health_sensor",
    "build_kafka_lag_sensor",
    "build_sink_health_sensor",
    "build_redeploy_schedule",
}
"""Names the README's "Wrap your own flow" section documents: the scan below must find every one of
them (a scan that silently finds nothing would pass anything)."""

PROSE = {"FlowDeployer", "DefsState", "JobHealthSettings", "KafkaLagSettings", "SinkHealthSettings"}
"""Exported names the README uses in prose (not ``Loom*`` / ``build_*``, not imported in an example)."""


def readme_names(text: str) -> set[str]:
    """Every ``Loom*`` / ``build_*`` name in backticks, and every name imported ``from loom_dagster``."""
    mentioned = set(re.findall(r"`((?:Loom|build_)\w+)", text))
    imported = {
        name.strip()
        for group in re.findall(r"from loom_dagster import ([\w, ]+)", text)
        for name in group.split(",")
        if name.strip()
    }
    return mentioned | imported


def missing_exports(text: str, exported: set[str]) -> list[str]:
    """The names *text* uses (see :func:`readme_names`) that *exported* lacks."""
    return sorted(readme_names(text) - exported)


def lazy_table() -> dict[str, str]:
    """``_EXPORTS`` of ``loom_dagster/__init__.py`` (name -> module), read from the source."""
    tree = ast.parse(INIT.read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "_EXPORTS":
            assert node.value is not None
            return dict(ast.literal_eval(node.value))
    raise AssertionError("no _EXPORTS table in loom_dagster/__init__.py")


def typed_imports() -> dict[str, str]:
    """The ``if TYPE_CHECKING:`` imports of ``loom_dagster/__init__.py`` (name -> module)."""
    tree = ast.parse(INIT.read_text())
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom) and stmt.module, ast.dump(stmt)
                for alias in stmt.names:
                    found[alias.asname or alias.name] = stmt.module
    return found


def test_all_the_export_table_and_the_typed_imports_agree() -> None:
    exported = list(loom_dagster.__all__)
    assert len(exported) == len(set(exported)), sorted(n for n in exported if exported.count(n) > 1)
    table = lazy_table()
    assert set(exported) == set(table), {
        "in __all__ only": sorted(set(exported) - set(table)),
        "in _EXPORTS only": sorted(set(table) - set(exported)),
    }
    assert typed_imports() == table


def test_every_exported_name_imports_in_a_fresh_interpreter() -> None:
    """``from loom_dagster import *`` gives exactly ``__all__``, each the object its module defines."""
    code = (
        "import importlib, json\n"
        "namespace = {}\n"
        "exec('from loom_dagster import *', namespace)\n"
        "import loom_dagster\n"
        "names = sorted(n for n in namespace if n != '__builtins__')\n"
        "wrong = [n for n, m in loom_dagster._EXPORTS.items()\n"
        "         if getattr(importlib.import_module(m), n) is not namespace.get(n)]\n"
        "print(json.dumps({'names': names, 'wrong': wrong}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["names"] == sorted(loom_dagster.__all__)
    assert report["wrong"] == []


def test_names_the_readme_uses_are_exported() -> None:
    text = README.read_text()
    found = readme_names(text)
    assert CORE <= found, f"the README no longer documents {sorted(CORE - found)} (or the scan broke)"
    for name in PROSE:
        assert re.search(rf"\b{name}\b", text), f"the README no longer mentions {name}: update PROSE"
    missing = missing_exports(text, set(loom_dagster.__all__)) + sorted(PROSE - set(loom_dagster.__all__))
    assert not missing, f"the README uses names loom_dagster does not export: {missing}"


def test_a_readme_name_missing_from_the_exports_fails_the_check() -> None:
    """The check above is able to fail: a name the README would use but the package does not export."""
    exported = set(loom_dagster.__all__)
    text = README.read_text()
    assert missing_exports(text, exported) == []
    assert missing_exports(text + "\nUse `LoomNotExported` here.\n", exported) == ["LoomNotExported"]
    assert missing_exports(text + "\nfrom loom_dagster import LoomFlowSpec, nope\n", exported) == ["nope"]
    assert missing_exports(text, exported - {"LoomFlowSpec"}) == ["LoomFlowSpec"]
