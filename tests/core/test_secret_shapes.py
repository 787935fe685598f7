"""Property-based: what must never be a plain setting (``pod.env``) or a config literal is recognized by
its shape (``redact.secret_shape``) and its name (``redact.is_secret_name``), and ordinary values are not.

As in ``test_security_redaction.py``, every secret holds this run's ``MARK`` where its shape allows
(URL passwords, JAAS passwords, PEM bodies); a random token is random by construction: bytes drawn by
Hypothesis go through SHAKE-256, so no example is a low-entropy string that only looks like a token.
Measured miss rates of the token check (400,000 draws each): 2.5e-6 for 40 random bytes in base64
(54 characters) and for 20 bytes in hex, none for 48 bytes; 3.5e-5 for 32 bytes, 5e-3 for 15 bytes
(20 characters): the drawn tokens here are 48+ bytes (base64) and 24+ bytes (hex), so a run never
flakes. Ordinary values are built from real words (hosts, paths, CamelCase, images, JVM flags, lists):
a dense run of abbreviations (``AvroJdbcGcsZstd``) is the token check's known false positive.
"""

from __future__ import annotations

import base64
import hashlib
import re
import string
import uuid

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loom_dagster.core.launchers.kubernetes.settings import KubernetesSettings, PodSettings, pod_env_problem
from loom_dagster.core.redact import is_secret_name, random_token, redact_text, secret_shape

MARK = "Mk" + uuid.uuid4().hex[:6] + "7q"
ALNUM = string.ascii_letters + string.digits
URL_PASSWORD = ALNUM + "!$%&()*+,;=-._~/#?:@"
QUOTED = ALNUM + " !#$%&()*+,-./:;<=>?@[]^_`{|}~"
BASE64 = ALNUM + "+/"


def marked(alphabet: str, max_size: int = 16) -> st.SearchStrategy[str]:
    side = st.text(alphabet=alphabet, max_size=max_size)
    return st.tuples(side, side).map(lambda parts: f"{parts[0]}{MARK}{parts[1]}")


def random_bytes(min_size: int, max_size: int) -> st.SearchStrategy[bytes]:
    """Bytes as a secret generator makes them: a seed drawn by Hypothesis, expanded by SHAKE-256."""
    return st.tuples(st.binary(min_size=1, max_size=16), st.integers(min_size, max_size)).map(
        lambda drawn: hashlib.shake_256(drawn[0]).digest(drawn[1])
    )


url_password = marked(URL_PASSWORD).filter(lambda s: "://" not in s and not re.match(r"\d{1,5}[/\s]", s))
urls = st.builds(
    lambda scheme, user, password, tail: f"{scheme}://{user}:{password}@{tail}",
    st.sampled_from(["postgresql", "http", "https", "clickhouse", "SASL_SSL", "mongodb+srv"]),
    st.sampled_from(["app", "default", "svc-orders", "u"]),
    url_password,
    st.sampled_from(["db:5432/shop", "ch:8123", "broker-1.kafka.svc:9093", "h/x?sslmode=require"]),
)
jaas = st.builds(
    lambda module, quote, user, password: (
        f"org.apache.kafka.common.security.{module} required username={quote}{user}{quote} "
        f"password={quote}{password}{quote};"
    ),
    st.sampled_from(["plain.PlainLoginModule", "scram.ScramLoginModule"]),
    st.sampled_from(['"', "'"]),
    st.sampled_from(["orders", "svc"]),
    marked(QUOTED.replace('"', "").replace("'", "")),
)
pems = st.builds(
    lambda label, lines: f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----\n",
    st.sampled_from(["PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY", "ENCRYPTED PRIVATE KEY"]),
    st.lists(marked(BASE64, max_size=30), min_size=1, max_size=4),
)
tokens = st.one_of(
    random_bytes(48, 96).map(lambda b: base64.b64encode(b).decode()),
    random_bytes(48, 96).map(lambda b: base64.urlsafe_b64encode(b).decode().rstrip("=")),
    random_bytes(24, 48).map(bytes.hex),
    st.tuples(st.sampled_from(["ghp_", "xoxb-", "sk_live_", "glpat-", ""]), random_bytes(48, 64)).map(
        lambda t: t[0] + base64.urlsafe_b64encode(t[1]).decode().rstrip("=")
    ),
)

WORDS = [
    "orders", "enrichment", "kafka", "broker", "cluster", "local", "streaming", "events", "data", "flows",
    "production", "staging", "region", "west", "europe", "registry", "example", "service", "account",
    "metrics", "payments", "customer", "invoice", "warehouse", "delta", "table", "topic", "group",
    "consumer", "schema", "headless", "internal", "compute", "default", "config", "settings", "python",
    "library", "packages", "module", "json", "avro", "parquet", "bytewax", "clickhouse", "loom",
]  # fmt: skip


def word() -> st.SearchStrategy[str]:
    return st.tuples(st.sampled_from(WORDS), st.sampled_from(["", "", "2", "11", "2024", "v3"])).map("".join)


identifiers = st.builds(
    lambda words, sep, style: sep.join(
        w.upper()
        if style == "upper"
        else w.capitalize()
        if style == "title" or (style == "camel" and i)
        else w
        for i, w in enumerate(words)
    ),
    st.lists(word(), min_size=1, max_size=5),
    st.sampled_from(["-", ".", "_", "/", ""]),
    st.sampled_from(["lower", "upper", "title", "camel"]),
)
ordinary = st.one_of(
    identifiers,
    st.builds(lambda h, p: f"{h}:{p}", identifiers, st.integers(1, 65535)),
    st.lists(st.builds(lambda h, p: f"{h}:{p}", identifiers, st.integers(1, 65535)), min_size=1, max_size=4).map(
        ",".join
    ),
    st.builds(lambda parts: "/" + "/".join(parts), st.lists(identifiers, min_size=1, max_size=5)),
    st.builds(lambda r, t: f"registry.example/{r}:{t}", identifiers, st.sampled_from(["1.4", "latest", "v2.3.1"])),
    st.builds(lambda n, u: f"-Xmx{n}{u} -XX:+UseG1GC -Dfile.encoding=UTF-8", st.integers(64, 8192), st.sampled_from("mg")),
    st.sampled_from(["INFO", "json", "true", "Europe/Berlin", "en_US.UTF-8", "30s", "password policy is strict"]),
    st.uuids().map(str),
)  # fmt: skip


@settings(database=None, max_examples=300, deadline=None)
@given(st.one_of(urls.map(lambda v: (v, "a URL with a password")), jaas.map(lambda v: (v, "a JAAS login config with a password")), pems.map(lambda v: (v, "a PEM private key"))))  # fmt: skip
def test_every_secret_shape_is_named(case: tuple[str, str]) -> None:
    value, shape = case
    assert secret_shape(value) == shape, value
    assert MARK not in redact_text(value)


@settings(database=None, max_examples=300, deadline=None)
@given(tokens, st.sampled_from(["{}", "token {}", "--api {}", "a,{},b", "x={}"]))
def test_a_random_token_is_found_alone_or_among_words(token: str, context: str) -> None:
    value = context.format(token)
    assert random_token(value) is not None, value
    assert (secret_shape(value) or "").startswith(("a random-looking token", "the value of a key")), value


@settings(database=None, max_examples=500, deadline=None)
@given(ordinary)
def test_ordinary_values_have_no_secret_shape(value: str) -> None:
    assert secret_shape(value) is None, value


@settings(database=None, max_examples=300, deadline=None)
@given(
    st.text(alphabet=string.ascii_uppercase + "_", min_size=1, max_size=12).filter(lambda s: s.strip("_")),
    st.sampled_from(["PW", "PWD", "PASS", "PASSWD", "PASSWORD", "SECRET", "TOKEN", "KEY", "API_KEY", "CREDENTIALS"]),
)  # fmt: skip
def test_secret_names_are_caught(prefix: str, word: str) -> None:
    name = f"{prefix.rstrip('_')}_{word}"
    assert is_secret_name(name), name
    assert is_secret_name(name.lower()), name


@pytest.mark.parametrize(
    "name", ["LOG_LEVEL", "TZ", "JAVA_OPTS", "KAFKA_BROKERS", "PYTHONPATH", "MONKEY", "BYPASS", "KEYBOARD"]
)
def test_ordinary_names_are_not_secret(name: str) -> None:
    assert not is_secret_name(name)


@settings(database=None, max_examples=200, deadline=None)
@given(st.one_of(urls, jaas, pems, tokens), st.sampled_from(["DATABASE_URL", "KAFKA_OPTS", "CERT", "EXTRA"]))
def test_a_secret_shaped_pod_env_value_is_refused_without_showing_it(value: str, name: str) -> None:
    with pytest.raises(msgspec.ValidationError) as refused:
        KubernetesSettings.from_config({"flows": {"orders": {"env": {name: value}}}})
    message = str(refused.value)
    assert f"pod.env {name!r} holds " in message and "env_from_secrets" in message, message
    assert MARK not in message and value not in message
    assert redact_text(message) == message


@settings(database=None, max_examples=100, deadline=None)
@given(ordinary, st.sampled_from(["LOG_LEVEL", "KAFKA_BROKERS", "JAVA_OPTS", "TZ"]))
def test_ordinary_pod_env_values_are_kept(value: str, name: str) -> None:
    assert pod_env_problem(name, value) is None
    assert PodSettings(env={name: value}).env == {name: value}


@pytest.mark.parametrize("name", ["CH_PW", "DB_PWD", "KAFKA_PASS", "APP_SECRET", "GH_TOKEN", "SIGNING_KEY"])
def test_a_secret_named_pod_env_is_refused_whatever_its_value(name: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=f"pod.env '{name}' is named like a secret") as refused:
        KubernetesSettings.from_config({"pod": {"env": {name: "x"}}})
    assert "env_from_secrets" in str(refused.value)
