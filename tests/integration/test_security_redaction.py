"""Property-based: no secret, whatever it looks like and wherever it sits in a text, gets through any
path to Dagster or an operator.

Hypothesis draws each secret from the alphabet its shape allows (URL passwords with ``/ # ? @ :`` or
with spaces, quoted values with spaces, flag values, base64 key bodies, YAML block lines ...), puts it
in one of the known shapes (``SHAPES``) and that among random ordinary text, look-alikes included
(``pass``, ``password policy``, ``git@github.com:x``, ``pwd is /home/app``). Every secret holds this
run's ``MARK``, a random token that appears nowhere else: any trace of ``MARK`` in an output is a
leak of (part of) a secret, wherever the redactor would have stopped short.

The paths, each with real parts: the redactor itself (whole texts and line streams); errors leaving
the package (their text, repr, chained exceptions, tracebacks, a ``dg.Failure`` raised from them as
Dagster serializes it); a deploy whose flow module raises at import (the ``dg.Failure`` and every
event of the run, and ``loom-dagster refresh``); asset metadata from a config with secrets in its
URLs; the job-health check metadata and death reason from a job's status records; the CLI
(``status``, ``status --json``, ``logs``); the job log (the drainer's writer, the tail, ``log_tail``);
the status record (written, read back, kept by the reporter, the failure reason).

Known limits (documented in ``loom_dagster.core.redact``) are left out of the alphabets: a URL password
holding a space that starts like a port; a spaced value that is an ordinary word (the secrets here
always hold ``MARK``'s digits).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import string
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster._utils.error import serializable_error_info_from_exc_info
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loom_dagster import LoomDeployResource, LoomFlowSpec, build_loom_defs
from loom_dagster.cli import main as cli
from loom_dagster.core.deploy.launch_records import JobProcess, LaunchedJob, LaunchRequest
from loom_dagster.core.deploy.restart_policy import job_death
from loom_dagster.core.deploy.store import Deployment, DeploymentStore
from loom_dagster.core.errors import DeploymentError, FlowLoadError
from loom_dagster.core.job.failure import one_line_reason
from loom_dagster.core.job.logs import LogSettings, RotatingLog, drain, log_files, read_tail
from loom_dagster.core.job.status import STATE_FAILED, JobStatus, SinkError, read_status, write_status
from loom_dagster.core.launchers.local import LocalProcessLauncher, log_tail
from loom_dagster.core.redact import LineRedactor, redact_mapping, redact_text
from loom_dagster.runtime.reporter import StatusReporter
from loom_dagster.sensors.health import job_metadata
from tests.conftest import shapes_config
from tests.flows.leaky_import import LEAK_ENV

MARK = "Mk" + uuid.uuid4().hex[:6] + "7q"  # in every secret, nowhere else: any trace of it is a leak
LEAKY = "tests.flows.leaky_import:make_flow"
LEAKY_MODULE = "tests.flows.leaky_import"

# --------------------------------------------------------------------------- secrets


def secret(alphabet: str, *, min_size: int = 0, max_size: int = 24) -> st.SearchStrategy[str]:
    """``<left><MARK><right>``, the two sides drawn from *alphabet*."""
    side = st.text(alphabet=alphabet, min_size=min_size, max_size=max_size)
    return st.tuples(side, side).map(lambda parts: f"{parts[0]}{MARK}{parts[1]}")


ALNUM = string.ascii_letters + string.digits
URL_PASSWORD = ALNUM + "!$%&()*+,;=-._~/#?:@"  # token-like: up to the last @ of its token
URL_SPACED = ALNUM + " /#!$%&*+=-._~"  # with a space: up to the first @ (so no @ in it)
BARE_PASSWORD = ALNUM + "!$%&()*+=-._~/#?:@"  # user:pass@host:port, no , ; (list separators)
PLAIN = ALNUM + "!$%*+-./:=?@^_|~#"  # key=value in free text: up to a space & , ; quote or bracket
LINE = ALNUM + " !$%&*+,-./:;=?@^_|~#'\""  # a YAML value alone on its line: up to the end or " #"
DQ = ALNUM + " !#$%&'()*+,-./:;<=>?@[]^_`{|}~"  # inside "..."
SQ = ALNUM + ' !#$%&"()*+,-./:;<=>?@[]^_`{|}~'  # inside '...'
SPACED = ALNUM + "!$%&*+,./:;=?@^_|~#"  # --password x, passwd x, sasl.password   x: one token
TOKEN68 = ALNUM + "-._~+/"
BASE64 = ALNUM + "+/"
BLOCK = ALNUM + " +/=.-_"

# Documented limits: a scheme inside a URL password ends it; one starting like a port and a path
# (``1234/``) is read as that.
url_password = lambda s: "://" not in s and re.match(r"\d{1,5}[/\s]", s) is None  # noqa: E731


@dataclass(frozen=True)
class Shape:
    """A place a secret shows up in: *render* puts the drawn secret in a text; *alone* when the
    shape must start its own line (YAML)."""

    name: str
    secret: st.SearchStrategy[Any]
    render: Callable[[Any], str]
    alone: bool = False


def url_shape(scheme: str, user: str, tail: str) -> Callable[[str], str]:
    return lambda s: f"{scheme}://{user}:{s}@{tail}"


def pem(label: str, headers: str = "") -> Callable[[list[str]], str]:
    def render(lines: list[str]) -> str:
        body = "\n".join(lines)
        return f"-----BEGIN {label}-----\n{headers}{body}\n-----END {label}-----"

    return render


def pem_escaped(lines: list[str]) -> str:
    body = "\\n".join(lines)
    return '{"private_key": "-----BEGIN PRIVATE KEY-----\\n' + body + '\\n-----END PRIVATE KEY-----\\n"}'


def yaml_block(key: str, style: str, indent: str) -> Callable[[list[str]], str]:
    def render(lines: list[str]) -> str:
        body = "\n".join(f"{indent}  {line}" for line in lines)
        return f"{indent}{key}: {style}\n{body}\nuser: bob"

    return render


def yaml_plain(lines: list[str]) -> str:
    return "tls:\n  password:\n" + "\n".join(f"    {line}" for line in lines) + "\n  user: bob"


pem_lines = st.lists(secret(BASE64, max_size=30), min_size=1, max_size=5)
block_lines = st.lists(
    secret(BLOCK).map(str.strip).filter(lambda s: not re.match(r"[-\w\"'.]+\s*:(\s|$)|-(\s|$)", s)),
    min_size=1,
    max_size=4,
)

SHAPES: list[Shape] = [
    Shape(
        "url",
        secret(URL_PASSWORD).filter(url_password),
        url_shape("postgresql+asyncpg", "app", "db:5432/shop"),
    ),
    Shape("url, no user", secret(URL_PASSWORD).filter(url_password), url_shape("redis", "", "cache:6379/0")),
    Shape(
        "url, query after",
        secret(URL_PASSWORD).filter(url_password),
        url_shape("http", "default", "ch:8123/?db=x"),
    ),
    Shape(
        "url, kafka", secret(URL_PASSWORD).filter(url_password), url_shape("SASL_SSL", "svc-loom", "b1:9093")
    ),
    Shape(
        "url, password with spaces",
        secret(URL_SPACED).filter(lambda s: " " in s and url_password(s)),
        url_shape("postgresql", "app", "db/shop"),
    ),
    Shape(
        "bare user:pass@host:port",
        secret(BARE_PASSWORD).filter(url_password),
        lambda s: f"bootstrap app:{s}@broker-1:9092,app:x@broker-2:9092",
    ),  # fmt: skip
    Shape("password=", secret(PLAIN), lambda s: f"login failed: password={s} for bob"),
    Shape("pw=", secret(PLAIN), lambda s: f"pw={s}"),
    Shape("pass=", secret(PLAIN), lambda s: f"connect(host=db, pass={s})"),
    Shape("token=", secret(PLAIN), lambda s: f"https://api/x?token={s}&page=2"),
    Shape("query password", secret(PLAIN), lambda s: f"http://ch:8123/?user=default&password={s}&database=x"),
    Shape("sasl.password:", secret(PLAIN), lambda s: f"(sasl.password: {s})"),
    Shape("azure", secret(PLAIN), lambda s: f"AccountName=a;AccountKey={s};EndpointSuffix=x"),
    Shape("odbc", secret(PLAIN), lambda s: f"Server=db;Uid=sa;Password={s};Encrypt=yes"),
    Shape("env", secret(PLAIN), lambda s: f"LOOM__DATABASE__CH__PASSWORD={s}"),
    Shape("dsn=", secret(PLAIN), lambda s: f"sentry_dsn=https://{s}@o1.ingest.sentry.io/2"),
    Shape("--password x", secret(SPACED), lambda s: f"loom run --password {s} --user bob"),
    Shape("--password 'x y'", secret(SQ.replace("'", "")), lambda s: f"loom run --password '{s}' --user bob"),
    Shape("-storepass x", secret(SPACED), lambda s: f"keytool -list -storepass {s} -v"),
    Shape("passwd x", secret(SPACED), lambda s: f"passwd {s}"),
    Shape("sasl.password   x", secret(SPACED), lambda s: f"sasl.password   {s}"),
    Shape("db_password x", secret(SPACED), lambda s: f"DB_PASSWORD\t{s}"),
    Shape(
        "yaml",
        secret(LINE).map(str.strip).filter(lambda s: " #" not in s and s[:1] not in "'\""),
        lambda s: f"password: {s}",
        alone=True,
    ),  # fmt: skip
    Shape(
        "yaml list item",
        secret(LINE).map(str.strip).filter(lambda s: " #" not in s and s[:1] not in "'\""),
        lambda s: f"  - api_key: {s}",
        alone=True,
    ),  # fmt: skip
    Shape("json", secret(DQ), lambda s: json.dumps({"password": s, "user": "bob"})),
    Shape(
        "json escaped in a string",
        secret(DQ.replace("\\", "")),
        lambda s: json.dumps(json.dumps({"token": s})),
    ),
    Shape("python repr", secret(SQ), lambda s: repr({"sasl_password": s, "brokers": ["b:9092"]})),
    Shape(
        "jaas",
        secret(DQ),
        lambda s: f'sasl.jaas.config=PlainLoginModule required username="u" password="{s}";',
    ),
    Shape("bearer", secret(TOKEN68), lambda s: f"got Bearer {s} back"),
    Shape("authorization", secret(TOKEN68), lambda s: f"-H 'Authorization: Bearer {s}'"),
    Shape("basic", secret(TOKEN68), lambda s: f"Authorization: Basic {s}"),
    Shape("pem", pem_lines, pem("PRIVATE KEY")),
    Shape(
        "pem, rsa with headers",
        pem_lines,
        pem("RSA PRIVATE KEY", "Proc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,A1B2\n\n"),
    ),  # fmt: skip
    Shape("pem, openssh", pem_lines, pem("OPENSSH PRIVATE KEY")),
    Shape("pem in one line", pem_lines, pem_escaped),
    Shape("yaml block |", block_lines, yaml_block("private_key", "|", ""), alone=True),
    Shape("yaml block >-", block_lines, yaml_block("sasl.jaas.config", ">-", "  "), alone=True),
    Shape("yaml block, ssl.key.pem", block_lines, yaml_block("ssl.key.pem", "|+", "    "), alone=True),
    Shape("yaml plain multi-line", block_lines, yaml_plain, alone=True),
]

# Ordinary text, look-alikes included: each item is complete (it does not leave a key waiting for
# the next item to be its value).
VOCABULARY = [
    "the", "broker", "refused", "connection", "after", "3", "retries;", "see", "docs", "it's", '"quoted"',
    "pass the test", "password policy", "tokens: 5", "max_tokens=100", "secretary", "author",
    "pwd is /home/app", "git@github.com:org/repo.git", "user@example.com", "http://ch:8123/db",
    "https://example.com/docs#x", "10:30", "a/b#c", "compass: north", "bypass=1", "InvalidToken: the",
    "(while:", "step", "'orders.enrich')", "|", "#", "/", "=", "[x]", "{y}", "Traceback", "error:",
]  # fmt: skip
prose = st.lists(st.sampled_from(VOCABULARY), max_size=6).map(" ".join)


@st.composite
def leaky_texts(draw: st.DrawFn, shape: Shape | None = None) -> str:
    """One secret in one shape, among ordinary text."""
    chosen = shape or draw(st.sampled_from(SHAPES))
    text = chosen.render(draw(chosen.secret))
    before = draw(st.sampled_from(["\n"] if chosen.alone else [" ", "\n", ", ", "; "]))
    after = draw(st.sampled_from(["\n"] if chosen.alone else [" ", "\n", ", "]))
    return f"{draw(prose)}{before}{text}{after}{draw(prose)}"


batches = st.lists(leaky_texts(), min_size=1, max_size=6).map("\n".join)


def assert_masked(*outputs: object) -> None:
    for output in outputs:
        text = output if isinstance(output, str) else repr(output)
        assert MARK not in text, f"a secret got through:\n{text}"


# --------------------------------------------------------------------------- the redactor


@settings(database=None, max_examples=1500, deadline=None)
@given(leaky_texts())
def test_the_redactor_masks_every_shape(text: str) -> None:
    assert MARK in text
    out = redact_text(text)
    assert_masked(out)
    assert redact_text(out) == out, "redaction must be idempotent"
    redactor = LineRedactor()  # a stream of lines (a log being written or followed)
    assert_masked("\n".join(redactor(line) for line in text.split("\n")))
    assert_masked(json.dumps(redact_mapping({"notes": text, "nested": [{"detail": text}]})))


@pytest.mark.parametrize("shape", SHAPES, ids=[s.name for s in SHAPES])
@settings(database=None, max_examples=25, deadline=None)
@given(data=st.data())
def test_each_shape_alone(shape: Shape, data: st.DataObject) -> None:
    """Every shape gets its own examples (the test above mixes them)."""
    assert_masked(redact_text(data.draw(leaky_texts(shape))))


# --------------------------------------------------------------------------- errors


def _raise_chain(message: str) -> FlowLoadError:
    """A flow import error as loading.py raises it: ours, from the module's own exception."""
    try:
        try:
            raise RuntimeError(message)
        except RuntimeError as exc:
            raise FlowLoadError(f"importing module 'm' of flow 'm:f' raised RuntimeError: {exc}") from exc
    except FlowLoadError as err:
        return err


def _dagster_error_text(exc: BaseException) -> str:
    """What Dagster stores of a failure raised from *exc*: its serialized error info, chain included."""
    try:
        try:
            raise exc
        except (DeploymentError, FlowLoadError) as err:
            raise dg.Failure(description=str(err), allow_retries=False) from err
    except dg.Failure:
        return dg.serialize_value(serializable_error_info_from_exc_info(sys.exc_info()))
    raise AssertionError("unreachable")


@settings(database=None, max_examples=150, deadline=None)
@given(batches)
def test_errors_leaving_the_package_are_masked(message: str) -> None:
    """Text, repr, args, the chained exception (a flow module's own error), the formatted traceback,
    the ``dg.Failure`` Dagster serializes, and the runtime's one-line reason."""
    err = _raise_chain(message)
    deployment = DeploymentError(message)
    assert_masked(str(err), repr(err), err.args, str(deployment), repr(deployment))
    assert_masked("".join(traceback.format_exception(err)), err.__cause__)
    assert_masked(_dagster_error_text(err), _dagster_error_text(deployment))
    assert_masked(one_line_reason(err), one_line_reason(RuntimeError(message)))


# --------------------------------------------------------------------------- a deploy through Dagster


@pytest.fixture(scope="module")
def leaky_defs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dg.Definitions, Path]]:
    """Definitions of the shapes flow from a module that imports cleanly now (and not in the run)."""
    cfg = shapes_config(tmp_path_factory.mktemp("cfg"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOOM_DAGSTER_DEFS_STATE", "off")
        patch.setenv("LOOM_DAGSTER_COMPILE_CACHE", "off")
        yield build_loom_defs([LoomFlowSpec(LEAKY, config=cfg, environment="test")]), cfg


@contextlib.contextmanager
def flow_module_raising(message: str) -> Iterator[None]:
    """The next import of the leaky module raises ``RuntimeError(<message>)`` (set in its environment)."""
    saved = sys.modules.pop(LEAKY_MODULE, None)
    os.environ[LEAK_ENV] = message
    try:
        yield
    finally:
        os.environ.pop(LEAK_ENV, None)
        if saved is not None:
            sys.modules[LEAKY_MODULE] = saved


@settings(
    database=None, max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batches)
def test_a_flow_import_error_never_reaches_dagster_or_the_cli(
    leaky_defs: tuple[dg.Definitions, Path], message: str
) -> None:
    """The deploy asset's run fails on the flow module's import error: its ``dg.Failure`` and every
    stored event of the run are masked; so is ``loom-dagster refresh`` on a location of that flow."""
    defs, cfg = leaky_defs
    with flow_module_raising(message), dg.instance_for_test() as instance:
        result = dg.materialize(
            list(defs.assets or []),  # type: ignore[arg-type]
            selection=[dg.AssetKey(["loom", "events"])],
            resources={"loom": LoomDeployResource(mode="validate")},
            instance=instance,
            raise_on_error=False,
        )
        events = "\n".join(dg.serialize_value(record) for record in instance.all_logs(result.run_id))
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    description = str(failure.event_specific_data.error.message)  # type: ignore[union-attr]
    assert "cannot open the lookup database" in description
    assert_masked(description, events)

    with tempfile.TemporaryDirectory() as scratch:
        location = Path(scratch) / "location.py"
        location.write_text(
            "from loom_dagster import LoomFlowSpec, build_loom_defs\n"
            f"defs = build_loom_defs([LoomFlowSpec({LEAKY!r}, config={str(cfg)!r}, environment='test')])\n"
        )
        with flow_module_raising(message):
            code, out, err = run_cli_main("refresh", "-f", str(location))
    assert code == 2 and "cannot open the lookup database" in err
    assert_masked(out, err)


def run_cli_main(*args: str) -> tuple[int, str, str]:
    """``loom-dagster ARGS`` in this process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return code, out.getvalue(), err.getvalue()


# --------------------------------------------------------------------------- config -> asset metadata


url_secret = secret(ALNUM + "!$%&()*+,;=-._~/#?:@").filter(url_password)


@settings(database=None, max_examples=6, deadline=None)
@given(url_secret, url_secret)
def test_asset_metadata_from_a_config_with_secrets(ch_password: str, sql_password: str) -> None:
    """Sink URLs with passwords in the config: every asset spec (description, metadata, tags) is masked."""
    with tempfile.TemporaryDirectory() as scratch, pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOOM_TEST_SINKS", "delta,ch,sql,topic")
        patch.setenv("LOOM_DAGSTER_DEFS_STATE", "off")
        cfg = shapes_config(
            Path(scratch) / "cfg",
            ch_url=f"http://default:{ch_password}@127.0.0.1:8123",
            sql_url=f"postgresql://app:{sql_password}@db:5432/shop",
        )
        defs = build_loom_defs([LoomFlowSpec("tests.flows.shapes:make_flow", config=cfg, environment="test")])
    specs = [spec for a in defs.assets or [] for spec in getattr(a, "specs", None) or [a]]
    text = "\n".join(
        f"{s.key} {s.description} {s.tags} {json.dumps({k: str(v) for k, v in (s.metadata or {}).items()})}"
        for s in specs
    )
    assert "http://default:***@127.0.0.1:8123" in text and "postgresql://app:***@db:5432/shop" in text
    assert_masked(text)


# --------------------------------------------------------------------------- a job's files: checks, CLI, logs


def prepared_job(state_dir: Path, message: str) -> tuple[Deployment, Path]:
    """A dead job of flow ``ticks`` whose status record and ``job.log`` hold *message* unredacted
    (as written before the drainer took over, or by an older version), recorded as deployed."""
    job_dir = state_dir / "job"
    job_dir.mkdir(parents=True)
    status_path = job_dir / "status-0.json"
    status_path.write_text(
        json.dumps(
            {
                "flow": "ticks", "pid": os.getpid(), "started_at": time.time() - 5, "state": "failed",
                "exit_code": 1, "error": f"failed at run time: {message}",
                "sink_error": {"sink": "ticks_delta", "at": time.time(), "error": message, "count": 2},
            }
        )
    )  # fmt: skip
    log_path = job_dir / "job.log"
    log_path.write_text(f"starting\n{message}\nexit 1\n")
    request = LaunchRequest("ticks", "x:y", (), "test", "p", "c")
    process = JobProcess(pid=os.getpid(), start_ticks=1, status_path=str(status_path))  # not alive
    job = LaunchedJob("ticks", "local", os.uname().nodename, (process,), str(log_path), time.time(), request)
    deployment = Deployment("ticks", job, "p", "c", time.time())
    DeploymentStore(state_dir).save(deployment)
    return deployment, log_path


@settings(database=None, max_examples=15, deadline=None)
@given(batches)
def test_check_metadata_cli_and_log_tail_of_a_job(message: str) -> None:
    """The job-health check's metadata and death reason, ``loom-dagster status`` (table and JSON) and
    ``logs``, and the health gate's ``log_tail`` of a job whose own files hold the secrets raw."""
    with tempfile.TemporaryDirectory() as scratch:
        state_dir = Path(scratch)
        deployment, log_path = prepared_job(state_dir, message)
        report = LocalProcessLauncher().report(deployment.job)
        metadata = job_metadata(deployment, report)
        death = job_death(deployment, report)
        assert death is not None and "loom/error" in metadata
        assert_masked(report.reason, {k: str(getattr(v, "value", v)) for k, v in metadata.items()}, death)

        outputs = [
            run_cli_main("--state-dir", scratch, "status", "--no-lag"),
            run_cli_main("--state-dir", scratch, "status", "--json", "--no-lag"),
            run_cli_main("--state-dir", scratch, "logs", "ticks", "-n", "1000"),
        ]
        for code, out, err in outputs:
            assert code == 0, err
            assert_masked(out, err)
        assert "exit 1" in outputs[2][1]
        assert_masked(log_tail(log_path, lines=1000), read_tail(log_path, 1 << 20)[0].decode())


# --------------------------------------------------------------------------- the job log and status record


@settings(database=None, max_examples=40, deadline=None)
@given(batches, st.lists(st.integers(min_value=1, max_value=400), max_size=8))
def test_job_log_writer_masks_by_record(message: str, cuts: list[int]) -> None:
    """The drainer (the job's fd 1/2 -> rotated files), fed in pieces cut anywhere (a key block spans
    reads), then the log read back: files, tail and ``log_tail``."""
    data = f"{message}\nlast line\n".encode()
    with tempfile.TemporaryDirectory() as scratch:
        settings_ = LogSettings(Path(scratch) / "job.log", max_bytes=1 << 20, max_files=2)
        log = RotatingLog(settings_)
        read_end, write_end = os.pipe()

        def feed() -> None:
            start = 0
            for cut in sorted(cuts):
                if cut > start:
                    os.write(write_end, data[start:cut])
                    start = cut
                    time.sleep(0.001)  # the drainer reads what is there: pieces, not the whole
            os.write(write_end, data[start:])
            os.close(write_end)

        writer = threading.Thread(target=feed)
        writer.start()
        try:
            drain(read_end, log)
        finally:
            writer.join()
            os.close(read_end)
            log.close()
        written = b"".join(f.read_bytes() for f in log_files(settings_.path)).decode()
        assert written.endswith("last line\n")
        assert_masked(written, log_tail(settings_.path, lines=1000))


@settings(database=None, max_examples=60, deadline=None)
@given(batches)
def test_status_record_is_masked_however_it_is_written(message: str) -> None:
    """Written (``write_status``), read back from a file an older version wrote raw, kept by the
    reporter (a failure), and the runtime's failure reason."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "status.json"
        status = JobStatus(flow="ticks", pid=1, error=message)
        status.error = message  # set after construction, as the reporter does
        status.sink_error = SinkError(sink="ticks_delta", at=1.0, error=message)
        write_status(path, status)
        assert_masked(path.read_text())

        raw = {"flow": "ticks", "pid": 1, "started_at": 1.0, "error": message,
               "sink_error": {"sink": "s", "at": 1.0, "error": message}}  # fmt: skip
        path.write_text(json.dumps(raw))
        read = read_status(path)
        assert read is not None and read.sink_error is not None
        assert_masked(read.error, read.sink_error.error, read.sink_error.summary(), read.to_dict())

        reporter = StatusReporter(path, JobStatus(flow="ticks", pid=1))
        reporter.set_state(STATE_FAILED, exit_code=1, error=one_line_reason(RuntimeError(message)))
        assert_masked(path.read_text(), reporter.snapshot())
