"""One strict redaction module, and errors told in full.

First the matrix: every secret shape through ``redact_text`` / ``redact_mapping`` (and what must stay
untouched); the head-and-tail cap of failure reasons; the preflight detail and the log tail. Then the
same secrets pushed through every path that reaches Dagster or an operator, with real parts (Kafka
broker, Delta tables, detached jobs, Dagster instances): the run failure of a deploy (health gate and
preflight), materialization and asset check metadata, our log lines (run events and Python logging),
the CLI, and the job's own status record and log. Each asserts the secret never appears and ``***``
does.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from dagster._utils.error import serializable_error_info_from_exc_info

from loom_dagster import LoomDeployResource, LoomFlowSpec, build_loom_asset_graph, build_loom_defs
from loom_dagster.core import procfs
from loom_dagster.core.errors import FlowLoadError, redacted_chain
from loom_dagster.core.flows.loading import import_flow
from loom_dagster.core.job.failure import MAX_REASON_CHARS, clip, one_line_reason
from loom_dagster.core.launchers.local import log_tail
from loom_dagster.core.launchers.preflight import MARKER, failure_detail
from loom_dagster.core.redact import (
    REDACTED,
    LineRedactor,
    is_secret_key,
    redact_mapping,
    redact_text,
    redact_url,
)
from loom_dagster.core.sensor_settings import JobHealthSettings
from loom_dagster.dev.kafka import KafkaBroker
from loom_dagster.sensors.health import build_job_health_sensor, one_shot_result
from tests.conftest import shapes_config
from tests.flows.delta_only import Tick
from tests.flows.leaky import LEAK_ID
from tests.flows.leaky_import import LEAK_ENV
from tests.support.deploy_env import DeployBench, bench_fixture, runtime_pids_for
from tests.support.helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]
LEAKY = "tests.flows.leaky:ticks_flow"
S = f"Hunter2x{uuid.uuid4().hex[:10]}"  # unique: any occurrence of it is a leak
REMEDY = "to run it anyway, list its id under checks.silenced"
MIDDLE = "MIDDLE-OF-A-LONG-REASON"


# --------------------------------------------------------------------------- the matrix

# (shape, text with {s} for the secret, what the redacted text must contain)
SHAPES: list[tuple[str, str, str]] = [
    (
        "url userinfo",
        "postgresql+asyncpg://app:{s}@db:5432/shop",
        "postgresql+asyncpg://app:***@db:5432/shop",
    ),
    ("url userinfo, no user", "redis://:{s}@cache:6379/0", "redis://:***@cache:6379/0"),
    ("url userinfo, @ in password", "http://default:{s}@x@ch:8123/db", "http://default:***@ch:8123/db"),
    ("url userinfo, ipv6 host", "http://default:{s}@[::1]:8123", "http://default:***@[::1]:8123"),
    ("query password", "http://ch:8123/?user=default&password={s}&database=x", "&password=***&database=x"),
    ("query passwd", "mysql://db/x?passwd={s}", "?passwd=***"),
    ("query pwd", "odbc://db/x?uid=sa&pwd={s}#frag", "&pwd=***"),
    ("free text password=", "login failed: password={s} for user bob", "password=*** for user bob"),
    ("free text password is", "Enter your password: {s}", "password: ***"),
    ("sasl.password=", "sasl.password={s} sasl.username=bob", "sasl.password=*** sasl.username=bob"),
    ("sasl.password:", "sasl.password: {s}", "sasl.password: ***"),
    ("token:", "refresh failed (token: {s})", "token: ***"),
    ("token=", "https://api/x?token={s}&page=2", "token=***&page=2"),
    ("Bearer", "got Bearer {s} back", "Bearer *** back"),
    ("Authorization header", "Authorization: Bearer {s}", "Authorization: "),
    (
        "Authorization Basic in text",
        "curl -H 'Authorization: Basic {s}' http://x",
        "'Authorization: Basic ***'",
    ),
    ("json", '{{"password": "{s}", "user": "bob"}}', '{{"password": "***", "user": "bob"}}'),
    ("json, spaces in value", '{{"password": "{s} and more words"}}', '{{"password": "***"}}'),
    ("json, escaped quote in value", '{{"password": "a\\"{s}"}}', '{{"password": "***"}}'),
    ("json inside a string", '"{{\\"password\\": \\"{s} x\\"}}"', '\\"password\\": \\"***\\"'),
    ("python repr", "{{'password': '{s} x', 'user': 'bob'}}", "{{'password': '***', 'user': 'bob'}}"),
    ("python repr, escaped", "RuntimeError('{{\\'token\\': \\'{s}\\'}}')", "\\'token\\': \\'***\\'"),
    ("python kwargs", "KafkaSettings(sasl_password='{s}', brokers=['b:9092'])", "sasl_password='***'"),
    ("yaml", "password: {s}\nuser: bob", "password: ***\nuser: bob"),
    ("yaml, unquoted spaces", "db:\n  password: {s} two words  # note", "  password: ***  # note"),
    ("yaml, list item", "- api_key: {s}", "- api_key: ***"),
    ("yaml, quoted", "password: '{s} x'", "password: '***'"),
    ("unterminated quote", 'password: "{s}', 'password: "***"'),
    ("api_key=", "api_key={s}", "api_key=***"),
    ("apiKey json", '{{"apiKey": "{s}"}}', '{{"apiKey": "***"}}'),
    ("X-Api-Key header", "X-Api-Key: {s}", "X-Api-Key: ***"),
    ("secret", "client_secret={s}", "client_secret=***"),
    ("camelCase secret", "clientSecret={s}", "clientSecret=***"),
    ("secret:", "secret: {s}", "secret: ***"),
    ("access_key", "access_key: {s}", "access_key: ***"),
    ("aws secret", "AWS_SECRET_ACCESS_KEY={s}", "AWS_SECRET_ACCESS_KEY=***"),
    ("loom env override", "LOOM__DATABASE__CH__PASSWORD={s}", "LOOM__DATABASE__CH__PASSWORD=***"),
    ("jaas", 'sasl.jaas.config=PlainLoginModule required username="u" password="{s}";', 'password="***";'),
    (
        "azure",
        "AccountName=a;AccountKey={s};EndpointSuffix=x",
        "AccountName=a;AccountKey=***;EndpointSuffix=x",
    ),
    ("special characters", "password={s}/+=x", "password=***"),
    # issue 17: shapes that used to leak
    ("--password x", "loom run --password {s} --user bob", "--password *** --user bob"),
    ("--password=x", "loom run --password={s} -v", "--password=*** -v"),
    ("-storepass x", "keytool -list -storepass {s} -v", "-storepass *** -v"),
    ("passwd x", "passwd {s}", "passwd ***"),
    ("sasl.password   x", "sasl.password   {s}", "sasl.password   ***"),
    ("DB_PASSWORD<tab>x", "DB_PASSWORD\t{s}", "DB_PASSWORD\t***"),
    ("pw=", "pw={s}", "pw=***"),
    ("pass=", "connect(host=db, pass={s})", "pass=***)"),
    ("db_pass:", "db_pass: {s}", "db_pass: ***"),
    ("dsn=", "SENTRY_DSN=https://{s}@o1.ingest.sentry.io/2", "SENTRY_DSN=***"),
    ("url password with /", "postgresql://app:a/{s}@db:5432/shop", "postgresql://app:***@db:5432/shop"),
    ("url password with #", "postgresql://app:{s}#x@db/shop", "postgresql://app:***@db/shop"),
    ("url password with ?", "mysql://app:{s}?x@db/shop", "mysql://app:***@db/shop"),
    ("url password with a space", "postgresql://app:my {s} pass@db/shop", "postgresql://app:***@db/shop"),
    (
        "bare user:pass@host:port",
        "bootstrap app:{s}@broker:9092,app:{s}@b2:9093",
        "app:***@broker:9092,app:***@b2:9093",
    ),
    (
        "pem",
        "key:\n-----BEGIN RSA PRIVATE KEY-----\nMIIEpA{s}\n{s}AbC==\n-----END RSA PRIVATE KEY-----\nnext",
        "-----BEGIN RSA PRIVATE KEY-----\n***\n***\n-----END RSA PRIVATE KEY-----\nnext",
    ),
    (
        "pem with headers",
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n\n{s}\n-----END ENCRYPTED PRIVATE KEY-----",
        "\n***\n\n***\n-----END",
    ),
    (
        "pem in one line",
        '{{"private_key": "-----BEGIN PRIVATE KEY-----\\nMII{s}\\n-----END PRIVATE KEY-----\\n"}}',
        '{{"private_key": "***"}}',
    ),
    (
        "pem, BEGIN cut off",
        "MIIEpA{s}\n{s}==\n-----END PRIVATE KEY-----",
        "***\n***\n-----END PRIVATE KEY-----",
    ),
    (
        "yaml block scalar",
        "tls:\n  private_key: |\n    MIIEpA{s}\n    second {s} line\n  cert: public",
        "  private_key: ***\n    ***\n    ***\n  cert: public",
    ),
    ("yaml folded, anywhere", "bad value ssl.key.pem: >-\n  {s}\n  {s}\nnext", ": ***\n  ***\n  ***\nnext"),
    ("yaml plain multi-line", "db:\n  password:\n    {s}\n  user: bob", "  password:\n    ***\n  user: bob"),
]

NEGATIVES = [
    "The secretary counted 120 tokens consumed by the step.",
    "max_tokens=100, tokens: 5, token_count 3",
    "author: Jane; authority granted; the secret sauce is salt",
    "http://ch:8123/db?user=default&database=x and user@host, mail@example.com",
    "deploy check failed: to run it anyway, list its id under checks.silenced",
    "Kafka topic orders.tokens has 3 partitions (pwd is /home/app)",
    "postgresql://app@db:5432/shop",
    # issue 17: look-alikes of the new shapes stay readable
    "pass the test, password policy, the compass: north; bypass=1; pass_rate=0.9",
    "clone git@github.com:org/repo.git and scp a.txt user@host:/tmp",
    "see /etc/passwd for details; db_password must be set; token_count 3; --password-file /run/secrets/db",
    "set sasl.password in the config (the api_key is missing)",
    "http://db:5432/shop failed, ask ops@example.com; redis:7@sha256:9f86d08; python:3.11@sha256:1234abc",
    "Error at 10:30 in file.py:12 (a:b, x@y)",
    "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----",
    "auth:\n  mechanism: PLAIN\n  username: bob\ncredentials:\n  - name: x",
    'Traceback (most recent call last):\n  File "x.py", line 3, in <module>\nValueError: bad',
]
# Over-redaction that is accepted: a secret-named word before ``:`` masks one word, never more.
MANGLED_A_LITTLE = [
    (
        "InvalidToken: the broker refused the request; renew it",
        "InvalidToken: *** broker refused the request; renew it",
    ),
    ("LeakedSecret: see the docs\nnext line", "LeakedSecret: *** the docs\nnext line"),
]


@pytest.mark.parametrize(("shape", "template", "expected"), SHAPES, ids=[s[0] for s in SHAPES])
def test_every_secret_shape_is_masked(shape: str, template: str, expected: str) -> None:
    text = template.format(s=S)
    out = redact_text(text)
    assert S not in out and REDACTED in out, out
    assert expected.format() in out, out
    assert redact_text(out) == out, "redaction must be idempotent"


@pytest.mark.parametrize("text", NEGATIVES)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert redact_text(text) == text


@pytest.mark.parametrize(("text", "expected"), MANGLED_A_LITTLE)
def test_exception_names_lose_one_word_at_most(text: str, expected: str) -> None:
    assert redact_text(text) == expected


def test_redact_url_masks_userinfo_and_query_passwords() -> None:
    url = f"http://default:{S}@ch:8123/db?password={S}&database=analytics"
    assert redact_url(url) == "http://default:***@ch:8123/db?password=***&database=analytics"
    assert redact_url("http://ch:8123/db") == "http://ch:8123/db"


def test_secret_keys() -> None:
    secret = ["password", "sasl.password", "DB_PASSWORD", "passwd", "pwd", "api_key", "apiKey", "token",
              "aws_secret_access_key", "clientSecret", "access_key", "credentials", "Authorization",
              "password_policy_version", "pw", "db_pw", "pass", "db_pass", "dsn", "sentry_dsn",
              "sasl.jaas.config", "ssl.key.pem", "ssl.keystore.key", "ssl.key.password"]  # fmt: skip
    plain = ["user", "url", "max_tokens", "tokens", "secretary", "author", "brokers", "topic", "bypass",
             "compass", "pass_rate", "passes", "ssl.key.location", "ssl.certificate.pem",
             "ssl.truststore.location"]  # fmt: skip
    assert [k for k in secret if not is_secret_key(k)] == []
    assert [k for k in plain if is_secret_key(k)] == []


def test_redact_mapping_masks_keys_and_strings_deeply() -> None:
    config = {
        "kafka": {
            "consumer": {"brokers": ["b:9092"], "sasl.password": S, "security": {"sasl_password": S}},
            "producers": [{"topic": "x", "token": S}],
        },
        "database": {"ch": {"url": f"http://default:{S}@ch:8123"}, "pg": {"password": S, "port": 5432}},
        "notes": f"connect with password={S}",
        "api_key": None,
        "max_tokens": 100,
        "secretary": "Jane",
    }
    out = redact_mapping(config)
    assert S not in json.dumps(out)
    assert out["kafka"]["consumer"] == {
        "brokers": ["b:9092"],
        "sasl.password": "***",
        "security": {"sasl_password": "***"},
    }
    assert out["kafka"]["producers"] == [{"topic": "x", "token": "***"}]
    assert out["database"] == {
        "ch": {"url": "http://default:***@ch:8123"},
        "pg": {"password": "***", "port": 5432},
    }
    assert out["notes"] == "connect with password=***"
    assert out["api_key"] is None and out["max_tokens"] == 100 and out["secretary"] == "Jane"


def test_a_stream_of_lines_is_masked_by_record() -> None:
    """Fed one line at a time (a log being written or followed), multi-line secrets are masked to
    their end, as in a whole text; ordinary lines around them are untouched."""
    text = (
        f"starting\n-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn{S}\n{S}AAAA\n-----END OPENSSH PRIVATE KEY-----\n"
        f"config:\n  sasl:\n    password: |\n      {S} one\n\n      {S} two\n    username: bob\n"
        "ready: 3 partitions"
    )
    redactor = LineRedactor()
    streamed = "\n".join(redactor(line) for line in text.split("\n"))
    assert streamed == redact_text(text)
    assert S not in streamed and streamed.count(REDACTED) == 5
    assert streamed.startswith("starting\n-----BEGIN OPENSSH PRIVATE KEY-----\n***\n***\n-----END")
    assert streamed.endswith("      ***\n\n      ***\n    username: bob\nready: 3 partitions")


def test_redaction_is_fast_on_large_text() -> None:
    text = "a." * 100_000 + " " + "x" * 200_000 + f" password={S}" * 2000 + "http://" * 20_000
    started = time.perf_counter()
    out = redact_text(text)
    assert time.perf_counter() - started < 2.0
    assert S not in out


# --------------------------------------------------------------------------- reasons in full


def leaky_message(secret: str, filler: int = 0, lines: int = 1) -> str:
    """An error text with the secret in several shapes, *filler* characters and the remedy last."""
    first = (
        f"cannot reach postgresql://app:{secret}@db:5432/shop?password={secret} with "
        f"sasl.password={secret}; settings {{'password': '{secret} x', \"api_key\": \"{secret}\"}} "
        f"Authorization: Bearer {secret}"
    )
    middle = [f"detail line {i}: token={secret}" for i in range(lines - 1)]
    pad = f"{'x' * (filler // 2)} {MIDDLE} {'y' * (filler // 2)}" if filler else ""
    return "\n".join([first, *middle, f"{pad} {REMEDY}".strip()])


def test_clip_keeps_head_and_tail() -> None:
    assert clip("short", 10) == "short"
    text = "HEAD " + "x" * 20_000 + " TAIL"
    out = clip(text, 200)
    assert len(out) <= 200 and out.startswith("HEAD ") and out.endswith(" TAIL")
    cut = int(out.split("[", 1)[1].split(" chars cut]")[0])
    head, tail = out.split(f" ... [{cut} chars cut] ... ")
    assert len(head) + len(tail) + cut == len(text)


def test_reason_keeps_the_remedy_and_masks_secrets(caplog: pytest.LogCaptureFixture) -> None:
    long = one_line_reason(RuntimeError(leaky_message(S, filler=1500, lines=3)))
    assert len(long) > 1500 and "chars cut" not in long  # the old 600-char cut is gone
    assert long.startswith("RuntimeError: cannot reach postgresql://app:***@db") and long.endswith(REMEDY)
    assert S not in long and " | detail line 1: token=***" in long

    with caplog.at_level(logging.ERROR, logger="loom_dagster.runtime"):
        huge = one_line_reason(RuntimeError(leaky_message(S, filler=3 * MAX_REASON_CHARS)))
    assert len(huge) <= MAX_REASON_CHARS and "chars cut" in huge and MIDDLE not in huge
    assert huge.startswith("RuntimeError: cannot reach") and huge.endswith(REMEDY) and S not in huge
    (full,) = [r.getMessage() for r in caplog.records if MIDDLE in r.getMessage()]
    assert REMEDY in full and S not in full and "***" in full, "the cut reason is logged whole, redacted"


def test_preflight_detail_is_whole_and_redacted() -> None:
    printed = leaky_message(S, lines=40)  # more than the 25 lines the old handling kept
    output = f"loom says: password={S}\n{MARKER}{printed}\n"
    detail = failure_detail(output)
    assert detail.startswith("cannot reach postgresql://app:***@db") and detail.endswith(REMEDY)
    assert "detail line 0: token=***" in detail and "loom says" not in detail and S not in detail
    huge = failure_detail(f"{MARKER}{leaky_message(S, filler=3 * MAX_REASON_CHARS)}")
    assert len(huge) <= MAX_REASON_CHARS and huge.endswith(REMEDY) and S not in huge
    assert (
        failure_detail(f"Traceback ...\nValueError: password={S}")
        == "Traceback ...\nValueError: password=***"
    )


def test_log_tail_redacts_and_never_shows_a_cut_line(tmp_path: Path) -> None:
    log = tmp_path / "job.log"
    secret_line = f"connecting with sasl.password={S}"
    log.write_text("\n".join([*(f"line {i}" for i in range(100)), secret_line, "last line"]) + "\n")
    tail = log_tail(log, lines=3)
    assert tail.splitlines() == ["line 99", "connecting with sasl.password=***", "last line"]
    # A window that starts inside the secret's key ("...word=<secret>"): that partial line is dropped.
    window = len("word=") + len(S) + len("\nlast line\n")
    assert log_tail(log, lines=5, window_bytes=window) == "last line"
    assert log_tail(tmp_path / "missing.log") == ""
    one_line = " | ".join(leaky_message(S, filler=3 * MAX_REASON_CHARS).splitlines())
    log.write_text(f"first\n{one_line}\n")
    first, long = log_tail(log).splitlines()
    assert first == "first" and len(long) <= MAX_REASON_CHARS and "chars cut" in long
    assert long.startswith("cannot reach postgresql://app:***@db") and long.endswith(REMEDY) and S not in long


# --------------------------------------------------------------------------- errors leaving the package


DSN = f"postgresql://app:{S}@db/shop"
MASKED_DSN = "postgresql://app:***@db/shop"


def test_an_import_error_is_masked_in_text_chain_and_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flow module raising at import with a DSN written in its source: the FlowLoadError's text, its
    chained exception, a formatted traceback (source lines included) and the error Dagster stores for
    a dg.Failure raised from it show the DSN masked."""
    (tmp_path / "leaky_source_mod.py").write_text(f'raise RuntimeError("cannot connect to {DSN}")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(FlowLoadError) as caught:
        import_flow("leaky_source_mod:flow")
    err = caught.value
    assert MASKED_DSN in str(err) and S not in repr(err) and S not in str(err.args)
    assert isinstance(err.__cause__, Exception) and str(err.__cause__).startswith("RuntimeError: cannot")
    formatted = "".join(traceback.format_exception(err))
    assert S not in formatted and MASKED_DSN in formatted and "leaky_source_mod.py" in formatted
    try:
        raise dg.Failure(description=str(err)) from err
    except dg.Failure:
        stored = dg.serialize_value(serializable_error_info_from_exc_info(sys.exc_info()))
    assert S not in stored and MASKED_DSN in stored


def test_a_clean_chain_is_left_as_it_is() -> None:
    """Without a secret, the chained exception is the original one (its type, its traceback)."""
    original = KeyError("orders")
    try:
        raise FlowLoadError("no route") from original
    except FlowLoadError as err:
        assert err.__cause__ is original and redacted_chain(original) is original
        err.__cause__ = ValueError(f"token={S}")  # set later: redacted all the same
        assert S not in str(err.__cause__) and "token=***" in str(err.__cause__)


def test_errors_with_a_redacted_chain_still_pickle() -> None:
    """Errors cross processes pickled (a Kafka client's child process): reading the chain leaves
    nothing on the error that would not unpickle."""
    try:
        raise FlowLoadError(f"cannot load: password={S}") from RuntimeError(DSN)
    except FlowLoadError as err:
        stand_in = err.__cause__
        again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, FlowLoadError) and str(again) == "cannot load: password=***"
    assert str(pickle.loads(pickle.dumps(stand_in))) == f"RuntimeError: {MASKED_DSN}"


def test_an_import_error_at_definitions_load_is_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(LEAK_ENV, DSN)
    monkeypatch.delitem(sys.modules, "tests.flows.leaky_import", raising=False)
    with pytest.raises(FlowLoadError) as caught:
        build_loom_defs(
            [
                LoomFlowSpec(
                    "tests.flows.leaky_import:make_flow", config=shapes_config(tmp_path), environment="test"
                )
            ]
        )
    text = "".join(traceback.format_exception(caught.value))
    assert str(caught.value).startswith("[tests.flows.leaky_import:make_flow]") and MASKED_DSN in str(
        caught.value
    )
    assert S not in text


def test_an_import_error_in_a_deploy_reaches_dagster_and_the_cli_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The definitions load (the module imports), then the run's import raises with the DSN: the
    dg.Failure and every stored event of the run mask it; ``loom-dagster refresh`` too."""
    cfg = shapes_config(tmp_path / "cfg")
    spec = LoomFlowSpec("tests.flows.leaky_import:make_flow", config=cfg, environment="test")
    monkeypatch.setenv("LOOM_DAGSTER_DEFS_STATE", "off")
    defs = build_loom_defs([spec])
    monkeypatch.setenv(LEAK_ENV, DSN)
    monkeypatch.delitem(sys.modules, "tests.flows.leaky_import")
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            list(defs.assets or []),  # type: ignore[arg-type]
            selection=[dg.AssetKey(["loom", "events"])],
            resources={"loom": LoomDeployResource(mode="validate")},
            instance=instance,
            raise_on_error=False,
        )
        failure = failure_text(result)
        events = run_record_text(instance, result.run_id)
    assert f"cannot open the lookup database: {MASKED_DSN}" in failure
    assert S not in failure and S not in events

    location = tmp_path / "location.py"
    location.write_text(
        "from loom_dagster import LoomFlowSpec, build_loom_defs\n"
        f"defs = build_loom_defs([LoomFlowSpec({spec.import_path!r}, config={str(cfg)!r}, environment='test')])\n"
    )
    done = subprocess.run(
        [str(Path(sys.executable).with_name("loom-dagster")), "refresh", "-f", str(location)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 2, done.stderr
    assert MASKED_DSN in done.stderr and S not in done.stdout + done.stderr


# --------------------------------------------------------------------------- through Dagster, for real


@pytest.fixture()
def bench(kafka: KafkaBroker, tmp_path: Path, topic_prefix: str) -> Iterator[DeployBench]:
    yield from bench_fixture(kafka, tmp_path, topic_prefix)


def leaky_spec(bench: DeployBench, processes: int = 1, **env: str) -> LoomFlowSpec:
    """The leaky ticks flow on the bench's config; *env* goes to the job's environment only."""
    return LoomFlowSpec(LEAKY, config=bench.config, environment="test", env=env, processes=processes)


def failure_text(result: dg.ExecuteInProcessResult) -> str:
    """The ``dg.Failure`` description of the failed deploy step."""
    assert not result.success
    event = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    return str(event.event_specific_data.error.message)  # type: ignore[union-attr]


def run_record_text(instance: dg.DagsterInstance, run_id: str) -> str:
    """Every event of the run as stored (messages, errors, metadata), serialized."""
    return "\n".join(dg.serialize_value(record) for record in instance.all_logs(run_id))


def user_log_lines(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """The ``context.log`` lines of a run."""
    return [r.user_message for r in instance.all_logs(run_id) if r.dagster_event is None]


def job_files(bench: DeployBench) -> tuple[list[dict[str, object]], str]:
    """Every status record and the concatenated job logs under the bench's state dir."""
    root = bench.state_dir / "flows" / "ticks"
    statuses = [json.loads(p.read_text()) for p in sorted(root.glob("*/*/status-*.json"))]
    logs = "\n".join(p.read_text() for p in sorted(root.glob("*/*/job.log")))
    return statuses, logs


def cli(bench: DeployBench, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed console script on the bench's state dir."""
    return run_cli(bench.state_dir, *args, timeout_s=60)


def _spec_text(defs: dg.Definitions) -> str:
    """Every asset spec of *defs* (descriptions, metadata, tags) as text."""
    specs = [spec for a in defs.assets or [] for spec in getattr(a, "specs", None) or [a]]
    return "\n".join(
        f"{s.key} {s.description} {s.tags} " + json.dumps({k: str(v) for k, v in (s.metadata or {}).items()})
        for s in specs
    )


def test_asset_and_materialization_metadata_are_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sink URLs with passwords (ClickHouse userinfo, a SQL URL query password) in the config: the asset
    specs, the materialization metadata (``loom/summary``, ``loom/sinks``) and the run's events mask them."""
    monkeypatch.setenv("LOOM_TEST_SINKS", "delta,ch,sql,topic")
    cfg = shapes_config(
        tmp_path / "cfg",
        ch_url=f"http://default:{S}@127.0.0.1:8123",
        sql_url=f"sqlite+aiosqlite:///{tmp_path / 'w.db'}?password={S}",
    )
    defs = build_loom_defs([LoomFlowSpec("tests.flows.shapes:make_flow", config=cfg, environment="test")])
    specs = _spec_text(defs)
    assert S not in specs and "http://default:***@127.0.0.1:8123" in specs and "?password=***" in specs
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            list(defs.assets or []),  # type: ignore[arg-type]
            selection=[dg.AssetKey(["loom", "events"])],
            resources={"loom": LoomDeployResource(mode="validate")},
            instance=instance,
        )
        (mat,) = result.asset_materializations_for_node("loom_deploy")
        metadata = json.dumps({k: str(v.value) for k, v in mat.metadata.items()})
        events = run_record_text(instance, result.run_id)
    assert "loom/summary" in metadata and S not in metadata and S not in events


@pytest.mark.kafka
@pytest.mark.slow
def test_start_failure_reaches_dagster_whole_and_masked(
    bench: DeployBench, caplog: pytest.LogCaptureFixture
) -> None:
    """The job refuses to start with a long error full of secrets (health gate path): the dg.Failure,
    the run's events, our Python log records, the status record and job.log never show the secret;
    the remedy at the end survives; job.log has the whole text, the status record head + tail."""
    message = leaky_message(S, filler=2 * MAX_REASON_CHARS, lines=3)
    spec = leaky_spec(bench, LOOM_TEST_LEAK_AT_START=message)
    with caplog.at_level(logging.DEBUG, logger="loom_dagster"), dg.instance_for_test() as instance:
        result = bench.materialize(instance, bench.resource(preflight=False, health_timeout_s=60), spec=spec)
        failure = failure_text(result)
        events = run_record_text(instance, result.run_id)
        lines = user_log_lines(instance, result.run_id)
    assert "failed its health gate" in failure and "nothing is running now" in failure
    assert S not in failure and "***" in failure
    assert REMEDY in failure and "chars cut" in failure and MIDDLE not in failure
    assert "postgresql://app:***@db:5432/shop?password=***" in failure
    assert S not in events and REMEDY in events
    assert lines and not [line for line in lines if S in line]
    assert S not in caplog.text

    statuses, job_log = job_files(bench)
    (status,) = statuses
    error = str(status["error"])
    assert status["state"] == "failed" and status["exit_code"] == 2
    assert S not in error and "***" in error and error.endswith(REMEDY) and "chars cut" in error
    assert len(error) <= MAX_REASON_CHARS + 100  # the cap plus the runtime's "cannot compile ..." label
    assert S not in job_log and MIDDLE in job_log and REMEDY in job_log, "job.log has the whole text"
    assert runtime_pids_for(bench.state_dir) == []


@pytest.mark.kafka
@pytest.mark.slow
def test_preflight_failure_reaches_dagster_whole_and_masked(bench: DeployBench) -> None:
    """A two-process job is preflighted: its error (40 lines, secrets in the first) reaches the
    dg.Failure whole and masked; nothing is launched."""
    message = leaky_message(S, filler=1200, lines=40)
    spec = leaky_spec(bench, processes=2, LOOM_TEST_LEAK_AT_START=message)
    with dg.instance_for_test() as instance:
        result = bench.materialize(instance, spec=spec)
        failure = failure_text(result)
        events = run_record_text(instance, result.run_id)
    assert "fails before start (nothing was stopped)" in failure
    assert S not in failure and S not in events
    assert "postgresql://app:***@db:5432/shop?password=***" in failure  # the first line survived
    assert "detail line 1: token=***" in failure and MIDDLE in failure and REMEDY in failure
    assert runtime_pids_for(bench.state_dir) == [] and bench.store.current("ticks") is None


def _wait_dead(bench: DeployBench, pid: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while procfs.is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not procfs.is_alive(pid), "the job did not fail on the leak message"


@pytest.mark.kafka
@pytest.mark.slow
def test_secrets_stay_out_of_metadata_checks_cli_and_job_files(
    bench: DeployBench, caplog: pytest.LogCaptureFixture
) -> None:
    """A healthy deploy whose config and job environment hold secrets, then a run-time failure whose
    text holds them: materialization metadata, run events, the job_running check (sensor and one-shot),
    the CLI (status table/JSON, logs), the status record and job.log never show the secret."""
    config = bench.config / "base.yaml"
    config.write_text(
        config.read_text()
        + f'database:\n  vault: {{url: "postgresql+asyncpg://app:{S}@db:5432/shop?password={S}"}}\n'
    )
    message = leaky_message(S, filler=1000)
    spec = leaky_spec(bench, LOOM_TEST_LEAK_AT_RUN=message, DB_PASSWORD=S)
    bench.produce(0, 20)
    with caplog.at_level(logging.DEBUG, logger="loom_dagster"), dg.instance_for_test() as instance:
        result = bench.materialize(instance, spec=spec)
        assert result.success, failure_text(result)
        (mat,) = result.asset_materializations_for_node("loom_deploy")
        metadata = json.dumps({k: str(v.value) for k, v in mat.metadata.items()})
        events = run_record_text(instance, result.run_id)
        assert S not in metadata and S not in events
        (pid,) = bench.alive_pids()

        from loom_dagster.dev.produce import produce

        produce(bench.bootstrap, f"{bench.prefix}.ticks", [Tick(id=LEAK_ID, seq=-1)])
        _wait_dead(bench, pid)

        graph = build_loom_asset_graph([spec])
        sensor = build_job_health_sensor(graph, JobHealthSettings(restart=False))
        context = dg.build_sensor_context(instance=instance, resources={"loom": bench.resource()})
        tick = sensor(context)
        assert isinstance(tick, dg.SensorResult)
        tick_text = dg.serialize_value(list(tick.asset_events or []))
        key = dg.AssetKey(["loom", "ticks"])
        check = one_shot_result(bench.resource().deployer(), "ticks", key, grace_s=1.0)
        check_text = json.dumps([check.description, {k: str(v.value) for k, v in check.metadata.items()}])
    assert S not in caplog.text
    for text in (tick_text, check_text):
        assert S not in text and "***" in text and "failed at run time" in text and REMEDY in text
    assert not check.passed

    statuses, job_log = job_files(bench)
    (status,) = statuses
    assert status["state"] == "failed" and status["exit_code"] == 1
    assert S not in str(status["error"]) and "***" in str(status["error"]) and REMEDY in str(status["error"])
    assert S not in job_log and REMEDY in job_log

    outputs = [cli(bench, "status", "--no-lag"), cli(bench, "status", "--json", "--no-lag"),
               cli(bench, "logs", "ticks", "-n", "100")]  # fmt: skip
    for done in outputs:
        assert done.returncode == 0, done.stderr
        assert S not in done.stdout + done.stderr
    assert "***" in outputs[1].stdout and "***" in outputs[2].stdout and REMEDY in outputs[2].stdout
