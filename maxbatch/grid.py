"""The batch sizes a run may try: from a minimum to a maximum, multiples of one number.

One :class:`Grid` holds the three facts, checks them once when it is made, and does every
snapping to the grid that the search, the profiler and the estimate need.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from maxbatch.errors import ConfigError


def positive_int(value: Any, name: str) -> int:
    """Return ``value`` if it is a positive integer (not a bool).

    Raises:
        ConfigError: it is not, with its name and value.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive integer")
    return value


def positive_number(value: Any, name: str) -> float:
    """Return ``value`` as a float if it is a finite number above zero (not a bool).

    Raises:
        ConfigError: it is not, with its name and value.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and value > 0)
    ):
        raise ConfigError(f"{name}={value!r} must be a positive number")
    return float(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Grid:
    """The batch sizes that may be tried: multiples of ``multiple_of`` in the bounds.

    Attributes:
        min_batch_size: the smallest size to try.
        max_batch_size: the largest size to try, or None for no limit.
        multiple_of: only multiples of this are tried.

    Raises:
        ConfigError: a value is not a positive integer, the minimum is above the maximum, or no
            multiple lies between them.
    """

    min_batch_size: int = 1
    max_batch_size: int | None = None
    multiple_of: int = 1

    def __post_init__(self) -> None:
        positive_int(self.multiple_of, "multiple_of")
        positive_int(self.min_batch_size, "min_batch_size")
        if self.max_batch_size is None:
            return
        positive_int(self.max_batch_size, "max_batch_size")
        if self.min_batch_size > self.max_batch_size:
            raise ConfigError(
                f"min_batch_size={self.min_batch_size} is larger than "
                f"max_batch_size={self.max_batch_size}"
            )
        if self.max_batch_size // self.multiple_of * self.multiple_of < self.lower:
            raise ConfigError(
                f"no batch size between min_batch_size={self.min_batch_size} and "
                f"max_batch_size={self.max_batch_size} is a multiple of {self.multiple_of}"
            )

    @classmethod
    def build(
        cls,
        *,
        min_batch_size: int | None = None,
        max_batch_size: int | None = None,
        multiple_of: int = 1,
    ) -> Grid:
        """The grid from the public keywords (``min_batch_size=None``: 1).

        Returns:
            The grid.

        Raises:
            ConfigError: as the grid itself.
        """
        return cls(
            min_batch_size=1 if min_batch_size is None else min_batch_size,
            max_batch_size=max_batch_size,
            multiple_of=multiple_of,
        )

    @property
    def lower(self) -> int:
        """The smallest size on the grid."""
        m = self.multiple_of
        return max(m, -(-self.min_batch_size // m) * m)

    @property
    def upper(self) -> int | None:
        """The largest size on the grid, or None without a maximum."""
        if self.max_batch_size is None:
            return None
        return self.max_batch_size // self.multiple_of * self.multiple_of

    def floor(self, b: float) -> int:
        """The largest multiple at or below ``b`` (0 below the first multiple)."""
        return int(b // self.multiple_of) * self.multiple_of

    def snap_down(self, b: float) -> int:
        """The largest size on the grid at or below ``b``, never below :attr:`lower`."""
        return max(self.lower, self.floor(b))

    def snap(self, b: float) -> int:
        """:meth:`snap_down`, and no larger than :attr:`upper`."""
        snapped = self.snap_down(b)
        return snapped if self.upper is None else min(snapped, self.upper)

    def start(self, sample_size: int | None) -> int:
        """Where a search starts: the user's own sample size (2 without one), at least the minimum.

        A sample shows that size works (batch norm in training rejects a batch of 1).

        Returns:
            The first size the search runs.
        """
        return max(self.min_batch_size, sample_size if sample_size is not None else 2)


#: Every batch size from 1 up: the grid without options.
ALL_SIZES = Grid()
