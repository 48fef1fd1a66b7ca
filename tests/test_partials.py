"""The loss partials' two tables are stated once: csrc/partials.h's enums list the same
names, in the same order, as vipo_kernels/partials.py, and the value-check messages agree."""

from __future__ import annotations

import re
from pathlib import Path

from vipo_kernels import partials
from vipo_kernels.validation import MESSAGES

HEADER = (Path(__file__).resolve().parents[1] / "csrc" / "partials.h").read_text()


def _enum(namespace: str) -> tuple:
    """The enumerators of ``namespace``'s enum, kCamelCase -> snake_case, without kCount."""
    body = re.search(rf"namespace {namespace} {{.*?enum \w+ : int {{(.*?)}};", HEADER, re.S)
    names = re.findall(r"^\s*k(\w+)", body.group(1), re.M)
    snake = [re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", n).lower()
             for n in names]
    assert snake[-1] == "count"
    return tuple(snake[:-1])


def test_partial_columns_match_the_header():
    assert _enum("partial") == partials.COLUMNS


def test_statistics_match_the_header():
    assert _enum("stat") == partials.STATS


def test_messages_match_the_header():
    for name, message in MESSAGES.items():
        assert f'"{message}"' in HEADER, name
