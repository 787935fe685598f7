"""Remove secrets from anything we show or log: the one redaction module of loom-dagster.

What is masked (with ``***``), in free text, URLs, JSON, YAML and Python reprs alike:

- URL userinfo: ``scheme://user:pass@host`` -> ``scheme://user:***@host``;
- the value of a secret-named key: ``password=x``, ``sasl.password: x``, ``"api_key": "x y"``,
  ``'token': 'x'``, ``?pwd=x&``, ``AccountKey=x;``, ``Authorization: Bearer x``; quoted values are
  masked whole (spaces included), unquoted ones up to a space, ``&``, ``,``, ``;``, a quote or a
  closing bracket;
- ``Bearer <token>`` anywhere.

A key is secret when it contains one of the secret words (password, passwd, pwd, passphrase, secret,
token, api key, access key, account key, private key, credential(s), authorization, auth) with
nothing or a ``_``/``.``/``-`` suffix after it: ``db_password``, ``sasl.password``, ``clientSecret``
and ``password_policy_version`` are secret; ``max_tokens``, ``secretary`` and ``author`` are not.
A ``key: value`` line (YAML) whose key starts lower-case is masked to the end of the line (or a
`` #`` comment). Accepted over-redaction: ``InvalidToken: the broker ...`` loses one word. Only the
standard library is imported (the job runtime uses this module).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***"

_WORDS = (
    r"pass(?:word|wd|phrase)|pwd|secret(?:[_-]?key)?|token|api[_-]?key|access[_-]?key|account[_-]?key"
    r"|private[_-]?key|sas[_-]?key|credentials?|authorization|auth"
)
# A key: up to 64 characters before the secret word, then the word, then nothing or a ``_ . -``
# joined suffix; the word must not run on into letters ("secretary", "tokens", "author").
_KEY = rf"[\w.\-]{{0,64}}?(?:{_WORDS})(?:[_.\-][\w.\-]{{0,64}})?(?![A-Za-z0-9])"
_KEY_RE = re.compile(_KEY, re.IGNORECASE)

_USERINFO = re.compile(
    r"(?P<scheme>(?<![a-zA-Z0-9+.\-])[a-zA-Z][a-zA-Z0-9+.\-]{0,31}://)(?P<user>[^:/@\s'\"<>]*):(?P<password>[^\s/?#'\"<>]*)@"
)
_AUTH_SCHEME = r"(?:(?:Bearer|Basic|Token|Digest|Negotiate)[ \t]+)?"
_END = r"(?:(?=\n)|\Z)"  # an unterminated quoted value runs to the end of its line
_KEY_VALUE = re.compile(
    rf"(?<![\w.\-])(?P<key>{_KEY})(?P<close>\\?[\"']?)(?P<sep>[ \t]*(?::(?!//)|=(?!=))[ \t]*)"
    r"(?:"
    rf"(?P<dq>\")(?:[^\"\\\n]|\\.)*(?:\"|{_END})"  # "value"
    rf"|(?P<eq>\\[\"'])(?:(?!(?P=eq))[^\n])*(?:(?P=eq)|{_END})"  # \"value\" or \'value\' (escaped)
    rf"|(?P<sq>')(?:[^'\\\n]|\\.)*(?:'|{_END})"  # 'value'
    rf"|(?P<scheme>{_AUTH_SCHEME})(?P<plain>[^\s&,;'\"}})\]]+)"  # value, Bearer value
    r")",
    re.IGNORECASE,
)
# ``key: value`` alone on a line (YAML): the unquoted value runs to the end of the line or a `` #``.
# Only for keys starting lower-case, so ``InvalidToken: <message>`` (an exception) keeps its message.
_LINE_VALUE = re.compile(
    rf"^(?P<head>[ \t]*(?:-[ \t]+)?(?P<q>[\"']?)(?=(?-i:[a-z_])){_KEY}(?P=q)[ \t]*:[ \t]+)"
    r"(?P<value>[^\s'\"][^\n]*?)(?=[ \t]+#|[ \t]*$)",
    re.IGNORECASE | re.MULTILINE,
)
_BEARER = re.compile(r"\bBearer[ \t]+[A-Za-z0-9\-._~+/]+=*")


def redact_url(url: str) -> str:
    """Mask the password of a URL (``scheme://user:pass@host``) and secret query parameters.

    Example:
        >>> redact_url("postgresql://app:s3cret@db:5432/shop?sslmode=require&password=x")
        'postgresql://app:***@db:5432/shop?sslmode=require&password=***'
    """
    return redact_text(url)


def strip_userinfo(url: str) -> str:
    """A URL without its ``user:password@`` (or ``user@``) part: for names that must carry no account.

    Example:
        >>> strip_userinfo("http://default:s3cret@ch:8123/db"), strip_userinfo("SASL_SSL://u:p@b1:9093")
        ('http://ch:8123/db', 'SASL_SSL://b1:9093')
        >>> strip_userinfo("app:pw@broker:9092"), strip_userinfo("/data/lake/events")
        ('broker:9092', '/data/lake/events')
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    authority_end = len(rest)
    for mark in "/?#":
        found = rest.find(mark)
        if found != -1:
            authority_end = min(authority_end, found)
    authority, tail = rest[:authority_end], rest[authority_end:]
    host = authority.rpartition("@")[2]
    return f"{scheme}{sep}{host}{tail}"


def redact_text(text: str) -> str:
    """Mask every URL password, secret-named value and bearer token found in free text.

    Example:
        >>> redact_text("sasl.password=hunter2 url=http://default:s3cret@ch:8123/db?password=x")
        'sasl.password=*** url=http://default:***@ch:8123/db?password=***'
        >>> redact_text('{"api_key": "a b c"} Bearer abc123 tokens consumed: 5')
        '{"api_key": "***"} Bearer *** tokens consumed: 5'
    """
    if not text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    text = _LINE_VALUE.sub(lambda m: f"{m['head']}{REDACTED}", text)
    text = _KEY_VALUE.sub(_mask_value, text)
    return _BEARER.sub(f"Bearer {REDACTED}", text)


def _mask_value(match: re.Match[str]) -> str:
    """``key<sep>***``, keeping the value's quotes and auth scheme."""
    head = f"{match['key']}{match['close']}{match['sep']}"
    for quote in ("dq", "eq", "sq"):
        if match[quote] is not None:
            return f"{head}{match[quote]}{REDACTED}{match[quote]}"
    return f"{head}{match['scheme']}{REDACTED}"


def is_secret_key(key: str) -> bool:
    """Whether a config key names a secret (``password``, ``sasl.password``, ``api_key``, ...).

    Example:
        >>> is_secret_key("sasl.password"), is_secret_key("max_tokens")
        (True, False)
    """
    return _KEY_RE.fullmatch(key.strip()) is not None


def redact_mapping(value: Any) -> Any:
    """Deep-copy a config value, masking the values of secret keys and secrets inside strings.

    Example:
        >>> redact_mapping({"database": {"url": "http://u:p@h", "password": "p", "port": 1}})
        {'database': {'url': 'http://u:***@h', 'password': '***', 'port': 1}}
    """
    if isinstance(value, Mapping):
        return {
            str(k): (REDACTED if is_secret_key(str(k)) and v not in (None, "") else redact_mapping(v))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact_mapping(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value
