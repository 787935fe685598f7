"""A cold defs-state refresh compiles its flows in worker processes (``loom_dagster.core.flows.refresh_pool``): the
same state as the serial refresh, the same errors, the worker count setting, and the progress that
``loom-dagster refresh`` shows (lines when not on a terminal, a bar on one)."""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import msgspec
import pytest

import loom_dagster.core.flows.defs_state as defs_state
import loom_dagster.core.flows.refresh_pool as refresh_pool
from bench.generated_flows import default_package, plain_graph, write_flows
from loom_dagster import DefsState, FlowCompileError, FlowLoadError, LoomFlowSpec, build_loom_defs
from loom_dagster.cli.main import main as cli_main
from loom_dagster.core.flows.defs_state import FlowState, forced_refresh
from loom_dagster.core.flows.refresh_pool import WORKERS_VARIABLE, configured_workers, pool_size
from tests.conftest import shapes_config

ROOT = Path(__file__).resolve().parents[2]
SECRET = "Par4llel-S3cret"


@pytest.fixture()
def pools(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The size of every pool started; a pool from 2 flows on (not ``MIN_FLOWS_PER_WORKER``)."""
    sizes: list[int] = []
    original = refresh_pool.refresh_in_pool

    def spy(tasks: Any, size: int, on_result: Any) -> Any:
        sizes.append(size)
        return original(tasks, size, on_result)

    monkeypatch.setattr(defs_state, "refresh_in_pool", spy)
    monkeypatch.setattr(refresh_pool, "MIN_FLOWS_PER_WORKER", 1)
    monkeypatch.setenv("LOOM_DAGSTER_COMPILE_CACHE", "off")
    monkeypatch.delenv("LOOM_ENV", raising=False)
    monkeypatch.delenv(WORKERS_VARIABLE, raising=False)
    yield sizes


def _entries(directory: Path) -> dict[str, FlowState]:
    """The state's entries by import path, without what differs between two refreshes of the same
    inputs (the variables' digest salt, the timings)."""
    out = {}
    for path in directory.glob("*.json"):
        entry = msgspec.json.decode(path.read_bytes(), type=FlowState)
        out[entry.import_path] = msgspec.structs.replace(
            entry, env_salt="", env_digest="", compile_seconds=0.0, refreshed_at=0.0
        )
    return out


def test_a_parallel_refresh_writes_the_state_a_serial_one_does(
    tmp_path: Path, pools: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOM_CLICKHOUSE_URL", f"http://default:{SECRET}@127.0.0.1:8123")
    specs = write_flows(tmp_path / "flows", 6)
    package = default_package(tmp_path / "flows") + "."

    parallel = DefsState(tmp_path / "parallel", workers=2).load(specs)
    assert pools == [2]
    assert not any(m.startswith(package) for m in sys.modules)  # only the workers imported the flows
    serial = DefsState(tmp_path / "serial", workers=1).load(specs)
    assert pools == [2]

    assert [f.status for f in parallel.flows] == ["refreshed"] * 6
    assert [f.flow_name for f in parallel.flows] == [f.flow_name for f in serial.flows]
    assert [c.flow for c in parallel.compiled] == [c.flow for c in serial.compiled]  # with presentation
    assert parallel.compiled[3].flow.group_name == "gen_group_00"
    entries, reference = _entries(tmp_path / "parallel"), _entries(tmp_path / "serial")
    assert entries == reference and len(entries) == 6
    for path, entry in entries.items():
        assert msgspec.json.encode(entry) == msgspec.json.encode(reference[path])  # byte-equal records
    for file in (tmp_path / "parallel").glob("*.json"):
        text = file.read_text()
        assert SECRET not in text and "http://default:***@127.0.0.1:8123" in text
        assert file.stat().st_mode & 0o777 == 0o600

    # a pool's flow compiles its plan on first use, to the hash of its records
    assert parallel.compiled[0].from_cache and parallel.compiled[0]._plan is None
    assert parallel.compiled[0].plan.name == "gen_0000"
    warm = DefsState(tmp_path / "parallel").load(specs)
    assert [f.status for f in warm.flows] == ["fresh"] * 6 and pools == [2]


def test_the_automatic_refresh_of_a_first_load_uses_the_pool(
    tmp_path: Path, pools: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(WORKERS_VARIABLE, "2")
    specs = write_flows(tmp_path / "flows", 4)
    defs = build_loom_defs(specs, state=DefsState(tmp_path / "state"))
    dg.Definitions.validate_loadable(defs)
    assert pools == [2]
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert keys == set(plain_graph(4).all_keys)


def _break(directory: Path, specs: list[LoomFlowSpec]) -> None:
    """Flow 2: its config lacks its ClickHouse database (a compile error); flow 4 does not import."""
    base = directory / "config" / "gen_0002" / "base.yaml"
    base.write_text(base.read_text().replace("  clickhouse:\n", "  other_db:\n"))
    assert specs[4].import_path.endswith(".flow_0004:flow")
    (directory / default_package(directory) / "flow_0004.py").write_text(
        "raise RuntimeError('flow 4 is broken')\n"
    )


def test_a_broken_flow_fails_a_parallel_refresh_as_it_fails_a_serial_one(
    tmp_path: Path, pools: list[int]
) -> None:
    specs = write_flows(tmp_path / "flows", 6)
    _break(tmp_path / "flows", specs)

    with pytest.raises(FlowCompileError) as parallel:
        DefsState(tmp_path / "parallel", workers=2).load(specs)
    assert pools == [2]
    with pytest.raises(FlowCompileError) as serial:
        DefsState(tmp_path / "serial", workers=1).load(specs)
    assert type(parallel.value) is type(serial.value)
    assert str(parallel.value) == str(serial.value)  # the first failing flow in spec order: flow 2
    assert str(parallel.value).startswith(f"[{specs[2].import_path}] loom refused to compile flow 'gen_0002'")
    assert "missing shared config section at database.clickhouse" in str(parallel.value)
    assert "Traceback" in str(parallel.value.__cause__)  # the worker's traceback
    # the flows before it keep their records, as in the serial refresh
    before = {s.import_path for s in specs[:2]}
    assert set(_entries(tmp_path / "serial")) == before
    assert before <= set(_entries(tmp_path / "parallel")) <= {s.import_path for s in specs[:2] + specs[3:]}

    # without flow 2's error, flow 4's import error is the one, in the same words both ways
    with pytest.raises(FlowLoadError) as parallel_load:
        DefsState(tmp_path / "parallel", workers=2).load(specs[3:])
    with pytest.raises(FlowLoadError) as serial_load:
        DefsState(tmp_path / "serial", workers=1).load(specs[3:])
    assert str(parallel_load.value) == str(serial_load.value)
    assert str(parallel_load.value).startswith(f"[{specs[4].import_path}] importing module")
    assert "RuntimeError: flow 4 is broken" in str(parallel_load.value)


def test_a_worker_s_log_records_reach_this_process_s_loggers(
    tmp_path: Path, pools: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    specs = write_flows(tmp_path / "flows", 3)
    module = tmp_path / "flows" / default_package(tmp_path / "flows") / "flow_0001.py"
    module.write_text(
        module.read_text()
        + "\nimport logging, os\nlogging.getLogger('gen.flows').warning('flow 1 imported in %d', os.getpid())\n"
    )
    with caplog.at_level(logging.INFO):
        DefsState(tmp_path / "state", workers=2).load(specs)
    assert pools == [2]
    (record,) = [r for r in caplog.records if r.name == "gen.flows"]
    assert record.levelno == logging.WARNING and record.getMessage().startswith("flow 1 imported in ")
    assert int(record.getMessage().rsplit(" ", 1)[1]) != os.getpid()
    assert any("compiling 3 flow(s) in 2 worker processes" in r.getMessage() for r in caplog.records)


def test_a_flow_whose_worker_dies_is_compiled_in_this_process(
    tmp_path: Path, pools: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    specs = write_flows(tmp_path / "flows", 3)
    module = tmp_path / "flows" / default_package(tmp_path / "flows") / "flow_0002.py"
    crash = (
        "import os, sys\n"
        "if getattr(sys.modules['__main__'].__spec__, 'name', '') == 'loom_dagster.core.flows.refresh_worker':\n"
        "    os._exit(3)  # a crash, in a worker only\n"
    )
    module.write_text(module.read_text().replace("import msgspec\n", crash + "import msgspec\n", 1))
    with caplog.at_level(logging.WARNING):
        load = DefsState(tmp_path / "state", workers=2).load(specs)
    assert pools == [2]
    assert [f.status for f in load.flows] == ["refreshed"] * 3
    assert len(_entries(tmp_path / "state")) == 3
    assert any("a refresh worker process died or could not start" in r.getMessage() for r in caplog.records)


def test_what_a_flow_module_prints_does_not_reach_the_replies(
    tmp_path: Path, pools: list[int], capfd: pytest.CaptureFixture[str]
) -> None:
    specs = write_flows(tmp_path / "flows", 3)
    module = tmp_path / "flows" / default_package(tmp_path / "flows") / "flow_0000.py"
    module.write_text(module.read_text() + "\nprint('hello from flow 0' * 1000)\n")
    load = DefsState(tmp_path / "state", workers=2).load(specs)
    assert pools == [2] and [f.status for f in load.flows] == ["refreshed"] * 3
    out, err = capfd.readouterr()
    assert "hello from flow 0" in err and "hello from flow 0" not in out


def test_a_script_without_a_main_guard_runs_once(tmp_path: Path) -> None:
    """The workers never run the parent's ``__main__`` again (``multiprocessing``'s spawn would)."""
    write_flows(tmp_path / "flows", 4, add_to_path=False)
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(ROOT)!r})
            print("top level ran", flush=True)
            import loom_dagster.core.flows.refresh_pool as refresh_pool
            from bench.generated_flows import load_specs
            from loom_dagster import DefsState
            refresh_pool.MIN_FLOWS_PER_WORKER = 1
            load = DefsState({str(tmp_path / "state")!r}, workers=2).load(load_specs({str(tmp_path / "flows")!r}))
            print(load.summary())
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LOOM_ENV", WORKERS_VARIABLE)}
    env["LOOM_DAGSTER_COMPILE_CACHE"] = "off"
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("top level ran") == 1
    assert "4 refreshed" in done.stdout and "worker process died" not in done.stderr


def test_the_worker_count_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WORKERS_VARIABLE, raising=False)
    assert configured_workers() == len(os.sched_getaffinity(0))
    for setting, expected in (("auto", len(os.sched_getaffinity(0))), ("3", 3), (" 1 ", 1)):
        monkeypatch.setenv(WORKERS_VARIABLE, setting)
        assert configured_workers() == expected
    assert configured_workers(5) == 5  # an explicit count wins over the variable
    for bad in ("0", "-2", "two", "1.5"):
        monkeypatch.setenv(WORKERS_VARIABLE, bad)
        with pytest.raises(ValueError, match=WORKERS_VARIABLE):
            configured_workers()
    with pytest.raises(ValueError, match="whole number"):
        DefsState("/nonexistent", workers=0)
    # a pool only with enough flows for two workers, one worker per MIN_FLOWS_PER_WORKER flows
    per = refresh_pool.MIN_FLOWS_PER_WORKER
    assert pool_size(2 * per - 1, 8) == 1
    assert pool_size(2 * per, 8) == 2
    assert pool_size(3 * per, 8) == 3 and pool_size(100 * per, 4) == 4
    assert pool_size(1000, 1) == 1


def test_the_setting_picks_the_pool_and_the_flag_wins(
    tmp_path: Path, pools: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    specs = write_flows(tmp_path / "flows", 4)
    monkeypatch.setenv(WORKERS_VARIABLE, "1")
    DefsState(tmp_path / "a").load(specs)
    assert pools == []  # 1: in this process
    with forced_refresh(workers=3):
        DefsState(tmp_path / "b").load(specs)
    assert pools == [3]
    monkeypatch.setattr(refresh_pool, "MIN_FLOWS_PER_WORKER", 24)
    monkeypatch.setenv(WORKERS_VARIABLE, "8")
    DefsState(tmp_path / "c").load(specs)
    assert pools == [3]  # a few flows: no pool whatever the setting
    for bad in ("0", "x"):
        with pytest.raises(SystemExit):
            cli_main(["refresh", "-f", "nowhere.py", "--workers", bad])


def _location(tmp_path: Path, count: int) -> tuple[Path, list[LoomFlowSpec]]:
    specs = write_flows(tmp_path / "flows", count)
    location = tmp_path / "location.py"
    location.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(ROOT)!r})
            from bench.generated_flows import load_specs
            from loom_dagster import DefsState, build_loom_defs
            defs = build_loom_defs(load_specs({str(tmp_path / "flows")!r}),
                                   state=DefsState({str(tmp_path / "state")!r}, refresh="never"))
            """
        )
    )
    return location, specs


def test_refresh_prints_a_line_per_flow_in_order_when_not_on_a_terminal(
    tmp_path: Path, pools: list[int], capsys: pytest.CaptureFixture[str]
) -> None:
    location, specs = _location(tmp_path, 5)
    assert cli_main(["refresh", "-f", str(location), "--workers", "2"]) == 0
    assert pools == [2]
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 6, out
    for line, spec, index in zip(lines, specs, range(5), strict=False):
        assert re.fullmatch(rf"refreshed gen_{index:04d} +\d+\.\d ms  {re.escape(spec.import_path)}", line), (
            line
        )
    assert "5 flow(s): 0 from the state, 5 refreshed, 0 stale" in lines[-1]
    assert lines[-1].startswith(f"defs state {tmp_path / 'state'}: ")
    assert "flows [" not in err  # no bar


def test_refresh_shows_a_bar_when_asked(
    tmp_path: Path, pools: list[int], capsys: pytest.CaptureFixture[str]
) -> None:
    location, _ = _location(tmp_path, 4)
    assert cli_main(["refresh", "-f", str(location), "--workers", "2", "--progress", "bar"]) == 0
    out, err = capsys.readouterr()
    assert "refreshing" in err and "4/4 flows [" in err and "flow/s" in err
    assert "refreshed gen_" not in out
    (summary,) = out.strip().splitlines()
    assert summary.startswith(f"defs state {tmp_path / 'state'}: ") and "4 refreshed" in summary


@pytest.mark.parametrize("columns", [120, 0], ids=["sized", "no-size"])
def test_refresh_shows_a_bar_on_a_terminal(
    tmp_path: Path, sinks_env: pytest.MonkeyPatch, columns: int
) -> None:
    """On a terminal (a pty here; one that tells its size, and a bare one that does not) a bar on stderr
    replaces the per-flow lines."""
    cfg = shapes_config(tmp_path / "cfg")
    location = tmp_path / "location.py"
    location.write_text(
        "from loom_dagster import DefsState, LoomFlowSpec, build_loom_defs\n"
        f"defs = build_loom_defs([LoomFlowSpec('tests.flows.shapes:make_flow', config={str(cfg)!r}, "
        f"environment='test')], state=DefsState({str(tmp_path / 'state')!r}))\n"
    )
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40 if columns else 0, columns, 0, 0))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    script = "import sys; from loom_dagster.cli.main import main; sys.exit(main(sys.argv[1:]))"
    child = subprocess.Popen(
        [sys.executable, "-c", script, "refresh", "-f", str(location)],
        stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary, cwd=ROOT, env=env,
    )  # fmt: skip
    os.close(secondary)
    output = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(primary)
    assert child.wait(timeout=30) == 0, output.decode(errors="replace")
    text = output.decode(errors="replace")
    assert "1/1 flows [" in text and "\r" in text
    assert "refreshed events" not in text
    assert "1 flow(s): 0 from the state, 1 refreshed, 0 stale" in text
