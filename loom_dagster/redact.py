"""Remove secrets (passwords in URLs, secret-looking keys) from anything we show or log."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]*)@")
_SECRET_KEYS = ("password", "secret", "token", "sasl.password", "api_key", "apikey", "credential")
REDACTED = "***"


def redact_url(url: str) -> str:
    """Replace the password of a URL (``scheme://user:pass@host``) with ``***``.

    Example:
        >>> redact_url("postgresql://app:s3cret@db:5432/shop")
        'postgresql://app:***@db:5432/shop'
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_text(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username or ''}:{REDACTED}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def redact_text(text: str) -> str:
    """Redact every ``scheme://user:password@`` found anywhere in free text."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)


def is_secret_key(key: str) -> bool:
    """Whether a config key names a secret (password, token, ...)."""
    lowered = key.lower()
    return any(marker in lowered for marker in _SECRET_KEYS)


def redact_mapping(value: Any) -> Any:
    """Deep-copy a config value, masking secret keys and URL passwords."""
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
