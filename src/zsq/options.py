"""Options given as keyword arguments or as ``KEY=VALUE`` text: what each one takes, checked
with one-line errors.

A :class:`Rule` reads one option's value (a Python value, or what ``KEY=VALUE`` text parses to:
JSON numbers and booleans, else the text) into the value its owner uses, or refuses it; the
error names the owner, the option, what it takes and an example. Sample sources, LAPQ, the
mixed-precision options and the method configs read their options through here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zsq.errors import ZsqError


@dataclass(frozen=True)
class Rule:
    """What one source option takes. ``read`` returns the value as the source uses it, or raises
    TypeError/ValueError; ``takes`` and ``example`` (None: no text form) make the error."""

    takes: str
    example: str | None
    read: Callable[[Any], Any]


def read_options(
    owner: str, rules: Mapping[str, Rule], values: Mapping[str, Any]
) -> dict[str, Any]:
    """The ``values`` that have a rule, as ``owner`` (e.g. 'gdfq source') uses them, each checked
    against its rule: a bad one is one line naming it and its form, 'gdfq source option betas
    takes two numbers'. A constructor passes ``locals()``: every argument with a rule."""
    return {
        name: _read_option(owner, name, rules[name], value)
        for name, value in values.items()
        if name in rules
    }


def _read_option(owner: str, name: str, rule: Rule, value: Any) -> Any:
    try:
        return rule.read(value)
    except (TypeError, ValueError):
        example = f"; e.g. {name}={rule.example}" if rule.example is not None else ""
        message = f"{owner} option {name} takes {rule.takes}, got {value!r}{example}"
        raise ZsqError(message) from None


def _is_number(value: Any) -> bool:
    """An int or float that is finite (JSON text may say Infinity or NaN); bools are not."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def whole_number(minimum: int, example: int) -> Rule:
    def read(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(value)
        return value

    return Rule(f"a whole number >= {minimum}", str(example), read)


def number(range_text: str, inside: Callable[[float], bool], example: float) -> Rule:
    """A finite number for which ``inside`` holds (``range_text`` says where, e.g. '> 0')."""

    def read(value: Any) -> float:
        if not _is_number(value) or not inside(value):
            raise ValueError(value)
        return float(value)

    return Rule(f"a number {range_text}", str(example), read)


def number_pair(range_text: str, inside: Callable[[float], bool], example: str) -> Rule:
    """Two numbers, as text 'a,b' or a pair, each with ``inside`` (e.g. Adam's betas)."""

    def read(value: Any) -> tuple[float, float]:
        parts = value.split(",") if isinstance(value, str) else value
        if not isinstance(parts, (list, tuple)) or len(parts) != 2:
            raise ValueError(value)
        pair = tuple(float(p) if isinstance(p, str) else p for p in parts)
        if not all(_is_number(v) and inside(v) for v in pair):
            raise ValueError(value)
        return (float(pair[0]), float(pair[1]))

    return Rule(f"two numbers {range_text}", example, read)


def flag(example: bool) -> Rule:
    def read(value: Any) -> bool:
        if not isinstance(value, bool):
            raise TypeError(value)
        return value

    return Rule("true or false", str(example).lower(), read)


def one_of(choices: Sequence[str], example: str, what: str = "one") -> Rule:
    """One of ``choices`` (``what`` names the kind, e.g. 'a layer policy')."""

    def read(value: Any) -> str:
        if value not in choices:
            raise ValueError(value)
        return value

    return Rule(f"{what} of {', '.join(choices)}", example, read)


def numbers(count: int, range_text: str, inside: Callable[[float], bool], example: str) -> Rule:
    """At least ``count`` numbers, as text 'a,b,c' or a sequence, each with ``inside``."""

    def read(value: Any) -> tuple[float, ...]:
        parts = value.split(",") if isinstance(value, str) else value
        if not isinstance(parts, (list, tuple)) or len(parts) < count:
            raise ValueError(value)
        values = tuple(float(p) if isinstance(p, str) else p for p in parts)
        if not all(_is_number(v) and inside(v) for v in values):
            raise ValueError(value)
        return tuple(float(v) for v in values)

    return Rule(range_text, example, read)


NONE_WORDS = ("none", "null", "off")


def optional(rule: Rule, unset: str) -> Rule:
    """``rule``, or None (JSON null, or the text none/off) for the default ``unset`` describes."""

    def read(value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.lower() in NONE_WORDS):
            return None
        return rule.read(value)

    return Rule(f"{rule.takes}, or null for {unset}", rule.example, read)


def python_path() -> Rule:
    """A file path, as text or a ``Path``: not a folder, and where a missing file can be
    written (so a file written after hours of work does not fail then)."""

    def read(value: Any) -> Any:
        if not isinstance(value, (str, Path)) or not str(value):
            raise TypeError(value)
        path = Path(value).expanduser()
        if path.is_dir() or (not path.exists() and not _can_create(path)):
            raise TypeError(value)
        return value

    return Rule("a file path (not a folder) in a writable folder", "images.safetensors", read)


def _can_create(path: Path) -> bool:
    """Whether ``path`` can be made: its nearest existing folder is writable (the folders in
    between are made)."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)


def python_object(kind: type, what: str) -> Rule:
    """An object only Python code can pass (None: the default); text is refused."""

    def read(value: Any) -> Any:
        if value is not None and not isinstance(value, kind):
            raise TypeError(value)
        return value

    return Rule(f"{what}, passed from Python: it has no text form", None, read)
