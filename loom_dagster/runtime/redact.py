"""Remove secrets from text before the runtime logs it or writes it to the status record."""

from __future__ import annotations

import re

from loom_dagster.redact import REDACTED, redact_text

_SECRET_PARAM = re.compile(
    r"(?P<key>\b(?:password|passwd|pwd|secret|token|api[_-]?key|sasl\.password|access[_-]?key)"
    r"[\"']?\s*[=:]\s*[\"']?)(?P<value>[^\s&,;'\"}]+)",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """Mask ``user:password@`` in URLs (:func:`loom_dagster.redact.redact_text`) and ``password=...`` values.

    Example:
        >>> redact("http://default:s3cret@ch:8123/db?password=x")
        'http://default:***@ch:8123/db?password=***'
    """
    return _SECRET_PARAM.sub(lambda m: f"{m['key']}{REDACTED}", redact_text(text))
