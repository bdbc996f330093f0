"""Durations and fractions as users write them (``90s``, ``1m30s``, ``500ms``, ``1%``), parsed in one place.

Every verb that takes a time budget, a window or a rate (``tune --budget``, ``rollout --window``,
``alerts --max-error-rate``, ``--max-drop``) parses it here, so the same text means the same
thing everywhere.
"""

from __future__ import annotations

import re

from modelpress.errors import ConfigError

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d*\.?\d+)\s*(ms|h|m|s)")
_NUMBER = re.compile(r"\d*\.?\d+")


def parse_duration(text: str | float, what: str = "duration") -> float:
    """Seconds in ``60s``, ``200ms``, ``5m``, ``1h``, ``1m30s`` or a plain number of seconds; above 0."""
    t = str(text).strip().lower().replace(" ", "")
    if _NUMBER.fullmatch(t):
        value = float(t)
    else:
        parts = _PART.findall(t)
        if not parts or "".join(a + b for a, b in parts) != t:
            raise ConfigError(
                f"{what} '{text}' is not a duration.", hint="Examples: 60s, 200ms, 5m, 1h, 1m30s, or seconds as a number (0.5)."
            )
        value = sum(float(a) * _UNITS[b] for a, b in parts)
    if value <= 0:
        raise ConfigError(f"The {what} '{text}' must be longer than 0.", hint="Example: 60s")
    return value


def parse_fraction(text: str | float, what: str = "rate", *, allow_one: bool = True) -> float:
    """A fraction from ``1%``, ``0.5 %`` or ``0.01``: between 0 and 1 (1 itself only with ``allow_one``)."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise ConfigError(f"{what} '{text}' is not a fraction or a percentage.", hint="Examples: 1% or 0.01") from None
    if not (0 <= value <= 1 if allow_one else 0 <= value < 1):
        upper = "100%" if allow_one else "100% (excluded)"
        raise ConfigError(f"{what} '{text}' is out of range: it must be between 0 and {upper}.", hint="Examples: 1% or 0.01")
    return value


def parse_percentages(text: str) -> list[float]:
    """Percentages from ``5,25,50,100`` (a trailing ``%`` is allowed on each)."""
    try:
        return [float(s.strip().rstrip("%")) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"'{text}' is not a list of percentages.", hint="Example: --steps 5,25,50,100") from None


__all__ = ["parse_duration", "parse_fraction", "parse_percentages"]
