"""The real ``dg`` CLI (dagster-dg-cli, from the venv) against ``LoomFlowsComponent`` in a fresh project:
``dg list components``, ``dg scaffold defs``, ``dg check yaml`` and ``dg list defs``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from loom_dagster.components.loom_flows.scaffolder import PLACEHOLDER_IMPORT_PATH

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "definitions" / "config"
DG = Path(sys.executable).parent / "dg"
COMPONENT_TYPE = "loom_dagster.LoomFlowsComponent"

pytestmark = pytest.mark.skipif(
    not DG.exists(), reason="dagster-dg-cli is not installed (pip install -e '.[test]')"
)


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Path]:
    """A minimal dg project (``dg.toml``, root module ``loom_proj`` with a ``defs`` folder)."""
    root = tmp_path / "proj"
    defs = root / "loom_proj" / "defs"
    defs.mkdir(parents=True)
    (root / "dg.toml").write_text('directory_type = "project"\n\n[project]\nroot_module = "loom_proj"\n')
    (root / "loom_proj" / "__init__.py").write_text("")
    (defs / "__init__.py").write_text("")
    (root / "loom_proj" / "definitions.py").write_text(
        textwrap.dedent(
            """\
            from pathlib import Path

            import dagster as dg

            defs = dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
            """
        )
    )
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def dg(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the venv's ``dg`` in *project* (flows import ``definitions.*`` from the repository root)."""
    env = {
        **os.environ,
        "PATH": f"{DG.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DAGSTER_HOME": str(project.parent / "dagster_home"),
        "PYTHONPATH": str(ROOT),
        "NO_COLOR": "1",
        "COLUMNS": "200",
    }
    env.pop("VIRTUAL_ENV", None)
    return subprocess.run(
        [str(DG), *args], cwd=project, env=env, capture_output=True, text=True, timeout=180, check=False
    )


def scaffold(project: Path, name: str, *options: str) -> Path:
    result = dg(project, "scaffold", "defs", COMPONENT_TYPE, name, *options)
    assert result.returncode == 0, result.stdout + result.stderr
    return project / "loom_proj" / "defs" / name / "defs.yaml"


def test_dg_lists_the_component(project: Path) -> None:
    result = dg(project, "list", "components", "--json")
    assert result.returncode == 0, result.stderr
    keys = {item["key"] for item in json.loads(result.stdout)["items"]}
    assert COMPONENT_TYPE in keys


def test_scaffold_defs_writes_a_skeleton_that_passes_check_yaml(project: Path) -> None:
    defs_yaml = scaffold(project, "my_flows")
    document = yaml.safe_load(defs_yaml.read_text())
    assert document["type"] == COMPONENT_TYPE
    (flow,) = document["attributes"]["flows"]
    assert flow["import_path"] == PLACEHOLDER_IMPORT_PATH
    assert "# deploy:" in defs_yaml.read_text()  # the optional keys are there, commented

    checked = dg(project, "check", "yaml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "validated successfully" in checked.stdout
    # The placeholder flow does not import: `dg list defs` says which one and where.
    listed = dg(project, "list", "defs")
    assert listed.returncode != 0
    assert "my_package.flows:my_flow" in listed.stdout + listed.stderr


def test_scaffolded_flows_are_listed_by_dg_list_defs(project: Path) -> None:
    params = {
        "import_path": "definitions.flows.orders:orders_flow",
        "config": str(CONFIG / "orders"),
        "environment": "development",
    }
    defs_yaml = scaffold(project, "orders", "--json-params", json.dumps(params))
    assert yaml.safe_load(defs_yaml.read_text())["attributes"]["flows"] == [params]

    result = dg(project, "list", "defs", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    listed = json.loads(result.stdout)
    assets = {asset["asset_key"]: asset for asset in listed["assets"]}
    assert {"loom/orders_enrichment", "kafka/orders", "delta/orders_enriched"} <= set(assets)
    assert assets["kafka/orders"]["dependency_keys"] == []
    assert assets["delta/orders_enriched"]["dependency_keys"] == ["loom/orders_enrichment"]
    assert assets["loom/orders_enrichment"]["source"].startswith("loom_proj/defs/orders/defs.yaml")
    assert {sensor["name"] for sensor in listed["sensors"]} >= {"loom_job_health", "loom_sink_health"}
    assert [resource["name"] for resource in listed["resources"]] == ["loom"]


def test_scaffold_options_fill_the_first_flow(project: Path) -> None:
    defs_yaml = scaffold(
        project, "ledger", "--import-path", "definitions.flows.payments:ledger_flow", "--config", "conf"
    )
    (flow,) = yaml.safe_load(defs_yaml.read_text())["attributes"]["flows"]
    assert (flow["import_path"], flow["config"]) == ("definitions.flows.payments:ledger_flow", "conf")


def test_check_yaml_names_file_line_and_field_of_a_wrong_key(project: Path) -> None:
    defs_yaml = scaffold(project, "my_flows")
    text = defs_yaml.read_text().replace("      # group_name: streaming", "      grup_name: streaming")
    defs_yaml.write_text(text)
    line = text.splitlines().index("      grup_name: streaming") + 1

    result = dg(project, "check", "yaml")
    assert result.returncode != 0
    assert f"{defs_yaml}:{line} - {COMPONENT_TYPE} attributes.flows.0.grup_name" in result.stdout
    assert "'grup_name' was unexpected" in result.stdout


def test_list_defs_names_file_line_and_field_of_a_wrong_value(project: Path) -> None:
    params = {"import_path": "definitions.flows.orders:orders_flow", "config": str(CONFIG / "orders")}
    defs_yaml = scaffold(project, "orders", "--json-params", json.dumps(params))
    text = defs_yaml.read_text().replace("      # processes: 1", "      processes: two")
    defs_yaml.write_text(text)
    line = text.splitlines().index("      processes: two") + 1

    result = dg(project, "list", "defs")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"{defs_yaml}:{line} - attributes.flows.0.processes: Input should be a valid integer" in output
    assert "(got 'two')" in output
