"""Byte sizes: parsing ``"300MiB"`` / ``"24GiB"`` / ``"1.5GB"`` and printing them."""

from __future__ import annotations

import math
import re
from fractions import Fraction

from maxbatch.errors import ConfigError

#: The largest size taken (1 EiB): no device comes near it, and every size below it stays exact
#: in the arithmetic of the searches (a float holds it, an int of it never overflows).
MAX_BYTES = 1024**6

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}

_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: str | int | float, *, name: str = "size") -> int:
    """Parse a byte size such as ``300MiB``, ``24GiB``, ``1.5GB`` or ``1000000``.

    Args:
        value: a string with an optional unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB; any case) or
            a number of bytes.
        name: what the value is, for the error message.

    Returns:
        The size in bytes. A fraction of a byte rounds to the nearest byte, halves up
        (``"1.08 KiB"`` is 1105.92 B, so 1106); the arithmetic is exact, so ``"0.1 KB"`` is
        100.

    Raises:
        ConfigError: the value is not a non-negative size, not finite (``inf``, ``nan``), or
            larger than :data:`MAX_BYTES`.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} is not a size; use e.g. 300MiB or 24GiB")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(f"{name}={value!r} is negative; give a size such as 300MiB")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name}={value!r} is not a size (not finite); give e.g. 300MiB")
        return _at_most_max(int(value), value, name)
    match = _SIZE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(
            f"{name}={value!r} is not a size; use a number and unit such as 300MiB, 24GiB or 1.5GB"
        )
    # Exact arithmetic: a float of 400 digits is inf, and int(inf) an OverflowError. A fraction
    # of a byte rounds to the nearest byte, halves up (int() would truncate 1105.92 to 1105).
    exact = Fraction(match.group(1)) * _UNITS[unit]
    return _at_most_max(math.floor(exact + Fraction(1, 2)), value, name)


def _at_most_max(size: int, value: str | int | float, name: str) -> int:
    if size > MAX_BYTES:
        shown = value if len(str(value)) <= 24 else f"{str(value)[:12]}...({len(str(value))} chars)"
        raise ConfigError(
            f"{name}={shown!r} is not a size any device has (more than 1 EiB); give one such "
            "as 24GiB"
        )
    return size


def format_bytes(n: float) -> str:
    """Render a byte count with a binary unit, e.g. ``1.50 GiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{int(size)} B" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} TiB"
