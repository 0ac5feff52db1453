"""Byte sizes: parsing ``"300MiB"`` / ``"24GiB"`` / ``"1.5GB"`` and printing them."""

from __future__ import annotations

import re
from decimal import ROUND_HALF_UP, Decimal

from maxbatch.errors import ConfigError

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
        (``"1.08 KiB"`` is 1105.92 B, so 1106); the arithmetic is decimal, so ``"0.1 KB"`` is
        exactly 100.

    Raises:
        ConfigError: the value is not a non-negative size.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} is not a size; use e.g. 300MiB or 24GiB")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(f"{name}={value!r} is negative; give a size such as 300MiB")
        return int(value)
    match = _SIZE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(
            f"{name}={value!r} is not a size; use a number and unit such as 300MiB, 24GiB or 1.5GB"
        )
    exact = Decimal(match.group(1)) * _UNITS[unit]
    return int(exact.to_integral_value(rounding=ROUND_HALF_UP))


def format_bytes(n: float) -> str:
    """Render a byte count with a binary unit, e.g. ``1.50 GiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{int(size)} B" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} TiB"
