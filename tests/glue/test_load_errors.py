"""Bad input at definitions load gives a clear error naming the flow and what to do."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from loom_dagster import FlowCompileError, FlowLoadError, LoomFlowSpec, build_loom_defs
from tests.conftest import shapes_config

SHAPES = "tests.flows.shapes:make_flow"
ROOT = Path(__file__).resolve().parents[2]


def _load(import_path: str, config: Path | str) -> None:
    build_loom_defs([LoomFlowSpec(import_path, config=config, environment="test")])


@pytest.mark.parametrize(
    ("import_path", "expected"),
    [
        ("tests.flows.shapes", "must look like 'package.module:attribute'"),
        ("tests.flows.nope:flow", "cannot import module 'tests.flows.nope'"),
        ("tests.flows.shapes:nope", "module 'tests.flows.shapes' has no attribute 'nope'"),
        ("tests.flows.shapes:not_a_flow", "is a builtins.dict, not a loom StreamFlow"),
        ("tests.flows.shapes:Event", "not a loom StreamFlow"),
    ],
)
def test_bad_import_paths(tmp_path: Path, import_path: str, expected: str) -> None:
    with pytest.raises(FlowLoadError) as err:
        _load(import_path, shapes_config(tmp_path / "cfg"))
    assert expected in str(err.value)
    assert str(err.value).startswith(f"[{import_path}]")


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(FlowLoadError, match=r"loom config '.*/absent' does not exist"):
        _load(SHAPES, tmp_path / "absent")


def test_config_directory_without_base(tmp_path: Path) -> None:
    (tmp_path / "cfg").mkdir()
    with pytest.raises(FlowLoadError, match="has no base.yaml"):
        _load(SHAPES, tmp_path / "cfg")


def test_invalid_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kafka:\n  consumer: [unclosed\n")
    with pytest.raises(FlowLoadError) as err:
        _load(SHAPES, bad)
    assert str(bad) in str(err.value) and "[tests.flows.shapes:make_flow]" in str(err.value)


def test_compile_error_at_load_lists_issues(tmp_path: Path) -> None:
    cfg = shapes_config(tmp_path / "cfg")
    lines = (cfg / "base.yaml").read_text().splitlines(keepends=True)
    (cfg / "base.yaml").write_text("".join(line for line in lines if "delivery:" not in line))
    with pytest.raises(FlowCompileError) as err:
        _load(SHAPES, cfg)
    assert "loom refused to compile flow 'events'" in str(err.value)
    assert "delivery" in str(err.value)


def test_unknown_sink_backend(tmp_path: Path) -> None:
    with pytest.raises(FlowCompileError) as err:
        _load("tests.flows.custom_sink:memory_flow", shapes_config(tmp_path / "cfg"))
    text = str(err.value)
    assert "[tests.flows.custom_sink:memory_flow]" in text
    assert "storage_sink_unsupported" in text.lower() and "IntoMemory" in text


def test_missing_delta_extra_is_named(tmp_path: Path) -> None:
    """In a fresh interpreter where polars cannot be imported, loom's bare TypeError becomes advice."""
    cfg = shapes_config(tmp_path / "cfg")
    script = textwrap.dedent(
        f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "polars" or name.startswith("polars."):
                    raise ImportError("blocked for the test: " + name)
        sys.meta_path.insert(0, Block())
        from loom_dagster import LoomFlowSpec, build_loom_defs, FlowCompileError
        try:
            build_loom_defs([LoomFlowSpec({SHAPES!r}, config={str(cfg)!r}, environment="test")])
        except FlowCompileError as exc:
            print(exc)
            sys.exit(0)
        sys.exit("no error")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "flow 'events' cannot compile: its Delta sink needs polars" in done.stdout
    assert "pip install 'loom-kernel[etl-polars]'" in done.stdout
