"""Dependencies point one way, and the package has no import cycle.

- Nothing under ``loom_dagster/core`` imports Dagster or any loom_dagster module outside ``core``.
- The job runtime (``loom_dagster/runtime``) imports only ``core`` and itself.
- No cycle among the package's modules.

Read from the source (imports inside functions count), plus one fresh interpreter that imports the
whole core and the runtime and must not have loaded Dagster (a third-party import that pulls it in
would show there).
"""

from __future__ import annotations

import graphlib
import json
import subprocess
import sys

from tests.support.imports import import_graph, imported_names, package_modules

CORE = package_modules("core")
RUNTIME = package_modules("runtime")
EVERYTHING = package_modules()


def _offenders(modules: dict[str, object], allowed: tuple[str, ...]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, path in modules.items():
        bad = sorted(
            target
            for target in imported_names(path, name)  # type: ignore[arg-type]
            if target == "dagster"
            or target.startswith(("dagster.", "dagster_"))
            or (target.startswith("loom_dagster.") and not target.startswith(allowed))
        )
        if bad:
            found[name] = bad
    return found


def test_the_rule_sees_every_core_module() -> None:
    assert len(CORE) > 60 and "loom_dagster.core.deploy.deployer" in CORE
    assert "loom_dagster.runtime.job" in RUNTIME


def test_core_imports_neither_dagster_nor_anything_outside_core() -> None:
    assert _offenders(CORE, ("loom_dagster.core.", "loom_dagster.core")) == {}


def test_runtime_imports_only_core_and_itself() -> None:
    assert _offenders(RUNTIME, ("loom_dagster.core.", "loom_dagster.runtime")) == {}


def test_the_rule_would_catch_an_import_hidden_in_a_function(tmp_path) -> None:  # type: ignore[no-untyped-def]
    module = tmp_path / "bad.py"
    module.write_text(
        "def f():\n    import dagster\n    from loom_dagster.translator import LoomTranslator\n"
    )
    assert _offenders({"loom_dagster.core.bad": module}, ("loom_dagster.core.",)) == {
        "loom_dagster.core.bad": [
            "dagster",
            "loom_dagster.translator",
            "loom_dagster.translator.LoomTranslator",
        ]
    }


def test_no_import_cycle_in_the_package() -> None:
    graph = import_graph(EVERYTHING)
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        raise AssertionError(f"import cycle: {' -> '.join(exc.args[1])}") from exc
    assert len(order) == len(graph)


def test_the_cycle_check_would_catch_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError:
        return
    raise AssertionError("graphlib did not report the cycle a -> b -> c -> a")


_PROBE = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules if m == "dagster" or m.startswith(("dagster.", "dagster_")))))
"""


def test_importing_all_of_core_and_the_runtime_loads_no_dagster() -> None:
    names = [n for n in [*CORE, *RUNTIME] if not n.endswith("__main__")]
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, *names], capture_output=True, text=True, check=True, timeout=300
    ).stdout
    assert json.loads(out.splitlines()[-1]) == []
