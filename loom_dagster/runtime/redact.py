"""Remove secrets from text before it is logged or written to the status record (stdlib only)."""

from __future__ import annotations

import re

_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s'\"]*):[^@/\s'\"]*@")
_SECRET_PARAM = re.compile(
    r"(?P<key>\b(?:password|passwd|pwd|secret|token|api[_-]?key|sasl\.password|access[_-]?key)"
    r"[\"']?\s*[=:]\s*[\"']?)(?P<value>[^\s&,;'\"}]+)",
    re.IGNORECASE,
)
MASK = "***"


def redact(text: str) -> str:
    """Mask ``user:password@`` in URLs and ``password=...``-style values.

    Example:
        >>> redact("http://default:s3cret@ch:8123/db?password=x")
        'http://default:***@ch:8123/db?password=***'
    """
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    return _SECRET_PARAM.sub(lambda m: f"{m['key']}{MASK}", text)
