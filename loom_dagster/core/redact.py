"""Remove secrets from anything we show or log: the one redaction module of loom-dagster.

What is masked (with ``***``), in free text, URLs, JSON, YAML and Python reprs alike:

- URL userinfo: ``scheme://user:pass@host`` -> ``scheme://user:***@host``; the password may hold
  ``/ ? # @ :`` (up to the last ``@`` of its token) or spaces (up to the first ``@``); a bare
  ``user:pass@host:port`` (a Kafka bootstrap entry) too, but not ``git@github.com:x``;
- the value of a secret-named key: ``password=x``, ``sasl.password: x``, ``"api_key": "x y"``,
  ``'token': 'x'``, ``?pwd=x&``, ``AccountKey=x;``, ``Authorization: Bearer x``; quoted values are
  masked whole (spaces included), unquoted ones up to a space, ``&``, ``,``, ``;``, a quote or a
  closing bracket;
- a value after spaces when the key cannot be prose: a flag (``--password x``, ``-storepass x``), a
  joined key (``sasl.password   x``, ``db_password x``) or ``passwd``/``pwd``/``pw``; not when the next
  word is an ordinary one (``pwd is /home``, ``db_password must be set``), and never for a bare
  English word (``password policy``, ``pass the test``);
- ``Bearer <token>`` anywhere;
- multi-line secrets, by record rather than by line: a PEM private key (``-----BEGIN ... PRIVATE
  KEY-----`` to ``-----END ...-----``, also inside one line with ``\\n`` escapes, also when its
  ``BEGIN`` was cut off before an ``END``) and the indented lines of a YAML value under a secret key
  (``private_key: |`` block scalars, and ``password:`` followed by a more-indented plain value).

A key is secret when it contains one of the secret words (password, passwd, pwd, passphrase, secret,
token, api key, access key, account key, private key, sas key, key pem, keystore key, credential(s),
authorization, auth, dsn, jaas) with nothing or a ``_``/``.``/``-`` suffix after it, or ends in the
short words ``pass``/``pw`` after nothing or a separator: ``db_password``, ``sasl.password``,
``clientSecret``, ``sasl.jaas.config``, ``ssl.key.pem``, ``db_pass`` and ``pw`` are secret;
``max_tokens``, ``secretary``, ``author``, ``bypass`` and ``compass`` are not. A ``key: value`` line
(YAML) whose key starts lower-case is masked to the end of the line (or a `` #`` comment).

A key's value that is ``true``, ``false``, ``null``, ``none`` or ``~`` is left alone (it says whether
a secret is used, it is not one). Accepted over-redaction: ``InvalidToken: the broker ...`` loses one word; ``pass: 3`` at the start of
a line loses its value; a URL with a password (or a port right before a query) and an ``@`` further
on (``http://u:p@h/db?to=me@x``, ``http://h:8123?to=me@x``) is masked up to that last ``@``: a
password may hold ``@``, ``/`` and ``?``. Known limits: a URL password with a space is
masked up to the first ``@`` only; a URL password that starts like a port and a path (``1234/``,
``1234 ``) is read as one, as the URL standard does (so ``http://db:5432/shop?to=ops@x.org`` keeps
its host); a spaced value starting with ``-`` is read as the next flag; a YAML block cut off above
its key (a log window starting inside it) cannot be recognized. Only the standard library is
imported (the job runtime uses this module).

``redact_text`` takes a whole text (a message, a log window); a stream of lines (a log being
written or followed) goes through one :class:`LineRedactor`, which carries the multi-line state from
line to line.

What must never be a plain setting or a config literal (``secret_shape``, ``is_secret_name``): every
shape above (in words: a URL with a password, a PEM private key, a JAAS login config with a password, a
bearer token, the value of a key naming a secret) and a random-looking token (``random_token``): a run of 20 or
more characters of the base64/hex alphabets that is 32+ hex digits (with letters and digits), or mixes
lower and upper case with the character-class changes and uncommon letter pairs of random text (an
identifier made of words, ``OrdersEnrichmentV2``, a host name or a path does not). Known limits of the
token check: lower-case-only or upper-case-only tokens (other than hex) and tokens under 20 characters
pass; a hex digest of 32+ digits (a commit id, a checksum) counts as a token; a UUID does not.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***"

_WORDS = (
    r"pass(?:word|wd|phrase)|pwd|secret(?:[_-]?key)?|token|api[_-]?key|access[_-]?key|account[_-]?key"
    r"|private[_-]?key|sas[_-]?key|key[_.\-]?pem|keystore[_.\-]?key|credentials?|authorization|auth"
    r"|dsn|jaas"
)
_SHORT_WORDS = r"pass|pw"
# A key: up to 64 characters before the secret word, then the word, then nothing or a ``_ . -``
# joined suffix; the word must not run on into letters ("secretary", "tokens", "author"). The short
# words only end a key, after nothing or a separator ("db_pass", but not "bypass" or "pass_rate").
_KEY = (
    rf"(?:[\w.\-]{{0,64}}?(?:{_WORDS})(?:[_.\-][\w.\-]{{0,64}})?"
    rf"|(?:[\w.\-]{{0,64}}?[_.\-])?(?:{_SHORT_WORDS}))(?![A-Za-z0-9])"
)
_KEY_RE = re.compile(_KEY, re.IGNORECASE)

# ``scheme://user:password@host``: the password runs to the last ``@`` of its token (it may hold
# ``/ ? # @ :``), else, holding spaces, to the first ``@`` of the line (at most 128 characters).
_USERINFO = re.compile(
    r"(?P<scheme>(?<![a-zA-Z0-9+.\-])[a-zA-Z][a-zA-Z0-9+.\-]{0,31}://)(?P<user>[^:/@\s'\"<>]*):"
    r"(?:(?P<password>(?:(?!://)[^\s'\"<>])*)@(?=[\w\[%.\-])"
    r"|(?P<spaced>(?:(?!://)[^\n'\"<>@]){1,128}?)@(?=[\w\[%.\-]))"
)
# A "password" starting like a port and a path is a port and a path: ``http://h:8123/?to=me@x``.
_PORT_FIRST = re.compile(r"\d{1,5}[/\s]")
# ``user:password@host:port`` without a scheme (Kafka ``bootstrap.servers``, ``host:port`` lists).
_BARE_USERINFO = re.compile(
    r"(?<![\w.\-+/:@%~])(?P<user>[A-Za-z0-9._\-~%+]{1,64}):(?!//)(?P<password>[^\s'\"<>,;]+)@"
    r"(?=(?:[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*|\[[0-9A-Fa-f:.]+\]):\d{1,5}(?![\w.]))"
)
_AUTH_SCHEME = r"(?:(?:Bearer|Basic|Token|Digest|Negotiate)[ \t]+)?"
_END = r"(?:(?=\n)|\Z)"  # an unterminated quoted value runs to the end of its line
_KEY_VALUE = re.compile(
    rf"(?<![\w.\-])(?P<key>{_KEY})(?P<close>\\?[\"']?)(?P<sep>[ \t]*(?::(?!//)|=(?!=[ \t]))[ \t]*)"
    r"(?:"
    rf"(?P<dq>\")(?P<dqv>(?:[^\"\\\n]|\\.)*)(?:\"|{_END})"  # "value"
    rf"|(?P<eq>\\[\"'])(?P<eqv>(?:(?!(?P=eq))[^\n])*)(?:(?P=eq)|{_END})"  # \"value\" or \'value\' (escaped)
    rf"|(?P<sq>')(?P<sqv>(?:[^'\\\n]|\\.)*)(?:'|{_END})"  # 'value'
    # value (even ;value), Bearer value; a quote inside it is part of it (``pw=ab"cd``: all masked),
    # a quote that ends it is not (``"pw=x"`` keeps its closing quote); it may start with ``&`` unless
    # that is the next query parameter (``pw=&x=1``)
    rf"|(?P<scheme>{_AUTH_SCHEME})(?P<plain>;?(?:[^\s&,;'\"}})\]]|&(?=[^\s&=,;]+(?:$|[\s,;])))(?:[^\s&,;}})\]]*[^\s&,;'\"}})\]])?)"
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
# ``key value`` where the key cannot be prose: a flag, a joined key, or passwd/pwd/pw. The secret
# word ends the key here (or ``.config``/``_value``...): ``token_count 3`` and ``--password-file f``
# name something about the secret, not the secret.
_VALUE_SUFFIX = r"(?:[_.\-](?:config|value|string|str|text))?"
_SPACED = re.compile(
    r"(?<![\w.\-/])(?P<key>"
    rf"-{{1,2}}(?=[A-Za-z])[\w\-]{{0,64}}?(?:{_WORDS}|{_SHORT_WORDS}){_VALUE_SUFFIX}"
    rf"|(?=[\w.\-]*[_.\-])(?:[\w.\-]{{0,64}}?(?:{_WORDS}){_VALUE_SUFFIX}|[\w.\-]{{0,64}}?[_.\-](?:{_SHORT_WORDS}))"
    r"|passwd|pwd|pw"
    r")(?![\w.\-])(?P<sp>[ \t]+)"
    r"(?P<value>(?P<dq>\")(?P<dqv>(?:[^\"\\\n]|\\.)*)(?:\"|$)|(?P<sq>')(?P<sqv>(?:[^'\\\n]|\\.)*)(?:'|$)"
    r"|(?P<plain>(?!-|[=:](?:\s|$))\S+))",  # not the next flag, not a lone = or : (key = value)
    re.IGNORECASE,
)
# Words after a key that say something about it rather than being its value.
_ORDINARY = frozenset(
    "a an and are as at be been by can cannot could did does for from has have if in into is it its "
    "may must no not of on or should than that the then this to was were will with would "
    "missing required invalid incorrect wrong empty unset expired field value file option flag "
    "argument prompt policy reset change changed none null".split()
)
_BEARER = re.compile(r"\bBearer[ \t]+(?P<token>[A-Za-z0-9\-._~+/]+=*)")
_LITERALS = frozenset({"true", "false", "null", "none", "~"})
"""Values that say a secret is off or absent (``automountServiceAccountToken: false``): left alone."""

# PEM: a private (or secret, or encrypted) key block; its body lines; the RFC 1421 / PGP armor headers.
_PEM_BEGIN = re.compile(r"-----BEGIN [A-Z0-9 ]*?(?:PRIVATE|SECRET|ENCRYPTED)[A-Z0-9 ]*?-----")
_PEM_END = re.compile(r"-----END [A-Z0-9 ]*?-----")
_PEM_SECRET_END = re.compile(r"-----END [A-Z0-9 ]*?(?:PRIVATE|SECRET|ENCRYPTED)[A-Z0-9 ]*?-----")
_PEM_BODY = re.compile(
    r"[ \t]*[\"']?(?:[A-Za-z0-9+/=]+|(?:Proc-Type|DEK-Info|Version|Comment|Hash|Charset|MessageID):.*)?"
    r"(?:\\n)?[\"',)\\]*[ \t]*"
)
# A YAML value that continues on the next, more-indented lines: ``key: |`` (anywhere on a line) or
# ``key:`` alone on a line (a plain multi-line value, or a nested mapping).
_BLOCK_KEY = re.compile(
    rf"(?:^|(?<=[\s{{,]))(?P<q>[\"']?){_KEY}(?P=q)[ \t]*:[ \t]*[|>][-+0-9]*[ \t]*(?:#.*)?$", re.IGNORECASE
)
_EMPTY_KEY = re.compile(
    rf"^[ \t]*(?:-[ \t]+)?(?P<q>[\"']?)(?=(?-i:[a-z_])){_KEY}(?P=q)[ \t]*:[ \t]*(?:#.*)?$", re.IGNORECASE
)
# Every shape needs one of these in its line: most log lines have none and are passed as they are.
_HINT = re.compile(rf"{_WORDS}|{_SHORT_WORDS}|://|@|-----|bearer", re.IGNORECASE)
_STRUCTURE = re.compile(r"[ \t]*(?:-(?:[ \t]|$)|[\"']?[\w.\-]+[\"']?[ \t]*:(?:[ \t]|$))")


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
        >>> strip_userinfo("postgresql://app:pa/ss#w@db:5432/shop")  # as redact_text reads the password
        'postgresql://db:5432/shop'
    """
    match = _USERINFO.match(url)
    if match is not None and match["password"] is not None and not _PORT_FIRST.match(match["password"]):
        return f"{match['scheme']}{url[match.end() :]}"
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
    """Mask every URL password, secret-named value, bearer token and private key found in a text.

    Multi-line secrets (PEM blocks, YAML values under a secret key) are recognized across its lines.

    Example:
        >>> redact_text("sasl.password=hunter2 url=http://default:s3cret@ch:8123/db?password=x")
        'sasl.password=*** url=http://default:***@ch:8123/db?password=***'
        >>> redact_text('{"api_key": "a b c"} Bearer abc123 tokens consumed: 5')
        '{"api_key": "***"} Bearer *** tokens consumed: 5'
        >>> redact_text("key:\\n  private_key: |\\n    MIIEvQ\\n    AbC\\n  user: bob")
        'key:\\n  private_key: ***\\n    ***\\n    ***\\n  user: bob'
    """
    if not text:
        return text
    lines = text.split("\n")
    redactor = LineRedactor()
    out: list[str] = []
    for index, line in enumerate(lines):
        masked, orphan_end = redactor.feed(line)
        if orphan_end:  # the block's BEGIN is not in this text: its body lines are right above
            above = index - 1
            while above >= 0 and lines[above].strip() and _PEM_BODY.fullmatch(lines[above]):
                out[above] = _masked_line(lines[above])
                above -= 1
        out.append(masked)
    return "\n".join(out)


class LineRedactor:
    """Redacts a stream of lines one at a time, carrying multi-line secrets from line to line: the
    body of a PEM private key until its ``END`` line, the indented lines of a YAML value under a
    secret key until the indentation comes back.

    Example:
        >>> redactor = LineRedactor()
        >>> [redactor(line) for line in ["-----BEGIN PRIVATE KEY-----", "MIIEvQ", "-----END PRIVATE KEY-----"]]
        ['-----BEGIN PRIVATE KEY-----', '***', '-----END PRIVATE KEY-----']
    """

    def __init__(self) -> None:
        self._pem = False
        self._block: tuple[int, bool] | None = None  # (indentation of the key's line, plain value)

    def __call__(self, line: str) -> str:
        """*line* (without its newline) redacted."""
        return self.feed(line)[0]

    def feed(self, line: str) -> tuple[str, bool]:
        """*line* redacted, and whether it ends a PEM block whose ``BEGIN`` this redactor never saw."""
        if line.endswith("\r"):
            masked, orphan = self.feed(line[:-1])
            return masked + "\r", orphan
        if self._block is not None:
            indent, plain = self._block
            if not line.strip():
                return line, False
            depth = _indentation(line)
            if depth > indent and not (plain and _STRUCTURE.match(line)):
                return _masked_line(line), False
            self._block = None
        if self._pem:
            end = _PEM_END.search(line)
            if end is not None:
                self._pem = False
                head = (
                    _masked_line(line[: end.start()]) if line[: end.start()].strip() else line[: end.start()]
                )
                return head + end.group(0) + self.feed(line[end.end() :])[0], False
            if not line.strip():
                return line, False
            if _PEM_BODY.fullmatch(line):
                return _masked_line(line), False
            self._pem = False  # a block cut short: this line is ordinary text again
        return self._text(line)

    def _text(self, line: str) -> tuple[str, bool]:
        """A line outside any multi-line secret (it may start one)."""
        if not _HINT.search(line):
            return line, False
        if _BLOCK_KEY.search(line):
            self._block = (_indentation(line), False)
        elif _EMPTY_KEY.match(line):
            self._block = (_indentation(line), True)
        orphan = False
        if "-----" in line:
            line, orphan = self._pem_in_line(line)
        return _single_line(line), orphan

    def _pem_in_line(self, line: str) -> tuple[str, bool]:
        """Mask the PEM bodies in one line; start a block when the last one does not end here."""
        out: list[str] = []
        rest = line
        orphan = False
        end = _PEM_SECRET_END.search(rest)
        begin = _PEM_BEGIN.search(rest)
        if end is not None and (begin is None or end.start() < begin.start()):
            orphan = True  # the body before it was cut off from its BEGIN (a log window, a clipped text)
            before = rest[: end.start()]
            out.append(_mask_pem_tail(before) + end.group(0))
            rest = rest[end.end() :]
        while (begin := _PEM_BEGIN.search(rest)) is not None:
            out.append(rest[: begin.end()])
            after = rest[begin.end() :]
            end = _PEM_END.search(after)
            if end is None:
                out.append(REDACTED if after.strip() else after)
                self._pem = True
                return "".join(out), orphan
            out.append(REDACTED + end.group(0))
            rest = after[end.end() :]
        out.append(rest)
        return "".join(out), orphan


def _mask_pem_tail(text: str) -> str:
    """The part of a line before an orphan ``END``: its trailing key material masked."""
    match = re.search(r"(?:\\n|[A-Za-z0-9+/=])+$", text)
    if match is None:
        return text
    return text[: match.start()] + REDACTED


def _indentation(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def _masked_line(line: str) -> str:
    """A whole line of key material: its indentation kept, the rest masked."""
    return line[: _indentation(line)] + REDACTED


def _single_line(line: str) -> str:
    """Every one-line shape: URL userinfo, secret-named values, bearer tokens.

    Each shape is looked for in the line as it is, and the union of what they find is masked: a
    shape never hides another (``http://h:8123/?password=x@y``: the userinfo guess and the query
    password overlap, both are masked)."""
    spans: list[tuple[int, int, str]] = []  # (start, end, what follows the mask: a missing quote)
    if "://" in line:
        for match in _USERINFO.finditer(line):
            group = "password" if match["password"] is not None else "spaced"
            if not _PORT_FIRST.match(match[group]):
                spans.append((*match.span(group), ""))
    if "@" in line:
        spans.extend((*match.span("password"), "") for match in _BARE_USERINFO.finditer(line))
    spans.extend((*match.span("value"), "") for match in _LINE_VALUE.finditer(line))
    spans.extend(_value_span(match) for match in _KEY_VALUE.finditer(line))
    spans.extend(_value_span(match) for match in _SPACED.finditer(line) if _spaced_secret(match))
    spans.extend((*match.span("token"), "") for match in _BEARER.finditer(line))
    spans = [span for span in spans if line[span[0] : span[1]].strip().lower() not in _LITERALS]
    return _masked(line, spans)


def _value_span(match: re.Match[str]) -> tuple[int, int, str]:
    """Where the value of a key-value match is (inside its quotes), and the quote to add when the
    value runs to the end of the line unterminated."""
    for group, quote in (("dqv", "dq"), ("eqv", "eq"), ("sqv", "sq")):
        if match.re.groupindex.get(group) and match[group] is not None:
            start, end = match.span(group)
            return start, end, match[quote] if end == match.end() else ""
    return (*match.span("plain"), "")


def _spaced_secret(match: re.Match[str]) -> bool:
    """False when the word after the key is an ordinary one (``pwd is ...``) or already masked."""
    value = match["value"]
    return value.lower().rstrip(".,;:!?)") not in _ORDINARY and value.strip("\"'") != REDACTED


def _masked(line: str, spans: list[tuple[int, int, str]]) -> str:
    """*line* with each run of overlapping or touching spans replaced by ``***``."""
    if not spans:
        return line
    spans.sort()
    out: list[str] = []
    done = 0
    start, end, tail = spans[0]
    for next_start, next_end, next_tail in spans[1:]:
        if next_start <= end:
            if next_end > end or (next_end == end and next_tail):
                end, tail = next_end, next_tail
            continue
        out.append(f"{line[done:start]}{REDACTED}{tail}")
        done = end
        start, end, tail = next_start, next_end, next_tail
    out.append(f"{line[done:start]}{REDACTED}{tail}{line[end:]}")
    return "".join(out)


def is_secret_key(key: str) -> bool:
    """Whether a config key names a secret (``password``, ``sasl.password``, ``api_key``, ...).

    Example:
        >>> is_secret_key("sasl.password"), is_secret_key("sasl.jaas.config"), is_secret_key("max_tokens")
        (True, True, False)
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


# ------------------------------------------------------------------ shapes a plain value must not have

_SECRET_NAME_END = re.compile(
    r"(?:^|[_.\-])(?:pw|pwd|pass|passwd|secrets?|tokens?|keys?|creds?|auth)$", re.IGNORECASE
)
_JAAS = re.compile(r"LoginModule|org\.apache\.kafka\.common\.security", re.IGNORECASE)
_TOKEN_RUN = re.compile(r"[A-Za-z0-9+/_\-.~]+={0,2}")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_HEX = re.compile(r"[0-9a-fA-F]+")
_SEGMENT = re.compile(r"[A-Za-z0-9]+")
# Letter pairs covering 97% of those in identifiers and prose (measured on Python sources), and those
# of this domain's words: a random text has many pairs outside them (``qz``, ``vk``), words very few.
_COMMON_PAIRS = frozenset(
    "ab ac ad af ag ai ak al am an ap ar as at au av ax ay ba be bi bj bl bo br bs bu by ca cc ce ch ci "
    "ck cl co cr cs ct cu da dd de df di dl do dr ds dt du ea ec ed ee ef eg el em en ep eq er es et ev "
    "ew ex ey fa fe ff fi fl fo fr ft fu ga ge gg gh gi gl gm gn go gr gs gu ha he hi ho ht ia ib ic id "
    "ie if ig il im in io ip ir is it iv ix iz je ke ki la ld le lf li ll lo ls lt lu ly ma mb me mi mm "
    "mn mo mp ms mu na nc nd ne nf ng ni nk nl nn no np ns nt nu nv ny oa ob oc od of og oi ok ol om on "
    "oo op or os ot ou ov ow pa pd pe pi pl po pp pr ps pt pu py ql qu ra rc rd re rg ri rk rl rm rn ro "
    "rr rs rt ru rv ry sa sc se sh si sk sl so sp sq ss st su sy ta tc te th ti tl to tp tr ts tt tu ty "
    "ua ub uc ud ue uf ui ul um un up ur us ut va ve vi wa we wh wi wo wr xc xe xp xt yg yl yp ys yt yw "
    "ze "
    # and those of this domain's words (kafka, json, avro, yaml, jdbc, svc, gzip, zstd, jvm, aws, uuid ...)
    "aw az bc cp db eh ek eu fk gc gk gz hm jd js jv ka kg kh ks kw lq ml mx nr pc pk rp rq sn sv td tg "
    "uu vc vm vo vr ws xa xm ya zi zs zu".split()
)


def is_secret_name(name: str) -> bool:
    """Whether an environment variable's (or a setting's) name names a secret: a secret key
    (:func:`is_secret_key`: ``DB_PASSWORD``, ``CH_PW``, ``API_TOKEN``) or one ending in a short secret
    word after a separator (``DB_PASS``, ``APP_SECRET``, ``SIGNING_KEY``, ``GH_TOKENS``, ``X_CREDS``).

    Example:
        >>> [is_secret_name(n) for n in ("CH_PW", "DB_PWD", "SIGNING_KEY", "LOG_LEVEL", "MONKEY")]
        [True, True, True, False, False]
    """
    return is_secret_key(name) or _SECRET_NAME_END.search(name.strip()) is not None


def secret_shape(value: str, reference: str | None = None) -> str | None:
    """What kind of secret *value* holds, in words (``"a URL with a password"``), or ``None``: every
    shape :func:`redact_text` masks, and a random-looking token (:func:`random_token`). *reference*:
    a placeholder the caller put where a reference to a secret was (``${oc.env:PASSWORD}``); masking
    exactly it is no finding.

    Example:
        >>> secret_shape("postgresql://app:hunter2@db/shop"), secret_shape("INFO")
        ('a URL with a password', None)
        >>> secret_shape("http://u:REF@ch:8123", reference="REF") is None
        True
    """
    if not value:
        return None
    masked = redact_text(value)
    if reference is not None:
        masked = masked.replace(REDACTED, reference)
    if masked != value:
        return _shape_name(value)
    token = random_token(value)
    return f"a random-looking token ({len(token)} characters)" if token is not None else None


def _shape_name(value: str) -> str:
    """Which masked shape *value* holds, in words (the first that matches)."""
    if _PEM_BEGIN.search(value) or _PEM_SECRET_END.search(value):
        return "a PEM private key"
    if _JAAS.search(value):
        return "a JAAS login config with a password"
    if ("://" in value and _USERINFO.search(value)) or ("@" in value and _BARE_USERINFO.search(value)):
        return "a URL with a password"
    if _BEARER.search(value):
        return "a bearer token"
    return "the value of a key naming a secret (key=value)"


def random_token(text: str) -> str | None:
    """The first random-looking token in *text* (see the module docstring), or ``None``.

    Example:
        >>> random_token("key Zx8Qm2LpV7rT4nWc9KdB3fHs") is not None
        True
        >>> random_token("broker-1.kafka.svc.cluster.local OrdersEnrichmentFlowV2") is None
        True
    """
    for match in _TOKEN_RUN.finditer(text):
        if len(match.group()) >= 20 and _random_looking(match.group().rstrip("=")):
            return match.group()
    return None


def _random_looking(token: str) -> bool:
    if len(token) < 20 or _UUID.fullmatch(token):
        return False
    if _HEX.fullmatch(token):
        has_digit = any(c.isdigit() for c in token)
        return len(token) >= 32 and has_digit and not token.isdigit() and _entropy(token) >= 3.0
    if not (any(c.islower() for c in token) and any(c.isupper() for c in token)):
        return False
    segments = _SEGMENT.findall(token)
    pairs = [(a, b) for segment in segments for a, b in zip(segment, segment[1:], strict=False)]
    if not pairs:
        return False
    changes = sum(_char_class(a) != _char_class(b) for a, b in pairs) / len(pairs)
    letters = [(a + b).lower() for a, b in pairs if a.isalpha() and b.isalpha()]
    rare = sum(pair not in _COMMON_PAIRS for pair in letters) / max(1, len(letters))
    return changes >= 0.15 and rare >= 0.1 and changes + rare >= 0.6 and _entropy(token) >= 3.5


def _char_class(char: str) -> int:
    return 0 if char.islower() else 1 if char.isupper() else 2


def _entropy(text: str) -> float:
    """Shannon entropy of *text*'s characters, bits per character."""
    counts: dict[str, int] = {}
    for char in text:
        counts[char] = counts.get(char, 0) + 1
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())
