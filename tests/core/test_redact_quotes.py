"""A secret value holding a quote (or starting with ``&``) is masked whole (Hypothesis found ``password: 0"Mk8...`` leaking the part
after the quote once the text had been escaped onto one line); a quote that only closes the value stays."""

from __future__ import annotations

import pytest

from loom_dagster.core.redact import redact_text


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ('password=ab"cd', "password=***"),
        ('\\npassword: 0"Mk8586777q\\n', "\\npassword: ***"),
        ('\npassword: 0"Mk8586777q\n', "\npassword: ***\n"),
        ("sasl.password=ab'cd tail", "sasl.password=*** tail"),
        ('Authorization: Bearer abc"def', "Authorization: Bearer ***"),
        ('x "password=abc" y', 'x "password=***" y'),
        ("token=abc&x=1", "token=***&x=1"),
        ("RuntimeError: password: &Mka099847q", "RuntimeError: password: ***"),
        ("\npassword: &Mka099847q\n", "\npassword: ***\n"),
        ("https://h/?password=&user=x", "https://h/?password=&user=x"),
    ],
)
def test_a_quote_inside_a_secret_value_is_masked_with_it(text: str, masked: str) -> None:
    assert redact_text(text) == masked
