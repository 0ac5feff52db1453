"""The profiler's search over candidate sizes: the descent from the top, then the bisection.

Pure: it sees only ``time_step(b)`` (the seconds of each replicate, empty on out-of-memory) and
a clock, through :class:`~maxbatch.profile.budget.Timings`, which also holds the budgets.
:mod:`maxbatch.profile.profiler` runs it; see its module doc for the rules.
"""

from __future__ import annotations

import math

from maxbatch.profile.budget import Timings
from maxbatch.settings import PickRule

ALIGN_SLACK = 1 / 32  #: the descent starts at the largest multiple of ALIGN this close to the top
ALIGN = 8  #: sizes near the ceiling are multiples of this (tensor-core friendly)


def _middle(gap: list[int], low: int, high: int) -> int:
    """The size in ``gap`` nearest the geometric middle of ``low`` and ``high``."""
    centre = (math.log(low) + math.log(high)) / 2
    return min(gap, key=lambda b: (abs(math.log(b) - centre), b))


class Descent(Timings):
    """One throughput search: the descent from the top, the size just below it, then the bisection.

    Args: as :class:`~maxbatch.profile.budget.Timings`.
    """

    def first_rung(self) -> int:
        """The top of the descent: the largest multiple of ``ALIGN`` near the largest size."""
        top = self.sizes[-1]
        aligned = [b for b in self.sizes if b % ALIGN == 0 and b >= (1 - ALIGN_SLACK) * top]
        return aligned[-1] if aligned else top

    def descend(self, keep: float) -> str:
        """Time the top rung, then rungs about 4x apart going down.

        The top rung is timed whatever it costs (only the budget can stop it): the best is most
        often there, and with few candidates it is most of what timing every size costs. Lower
        rungs are timed while they may hold the best or the tolerance edge; the descent stops at
        a rung below ``keep`` of the best and no faster than the rung above it: from there down
        the curve only falls away. After a size runs out of memory, the next one is the
        candidate just below it.

        Returns:
            Why the descent stopped, in words.
        """
        b: int | None = self.first_rung()
        above: int | None = None
        stop = skipped = ""
        top = True  # until a rung fits, the cost rule does not apply: the top is always timed
        while b is not None:
            fits = b in self.points
            if not fits:
                if (why := self.blocked(b, shared=not top)) is not None:
                    if self.points and not self.budget_hit:
                        stop = f"batch size {b} was not timed: {why}"
                        break
                    skipped = skipped or f"batch size {b} was not timed: {why}; "
                else:
                    fits = self.measure(b)
            if fits and above is not None and self.rate(b) < keep * self.rate(self.best()):
                if self.rate(b) <= self.rate(above):
                    self.fell_at = b
                    stop = f"{skipped}the descent fell away at batch size {b}"
                    break
            timed = b in self.cost
            above, top = (b, False) if fits else (above, top)
            lower = [c for c in self.sizes if c < b and (timed and not fits or c <= b / 4)]
            b = lower[-1] if lower else None
        else:
            stop = f"{skipped}the descent reached the smallest size" if self.points else ""
            stop = stop or skipped.removesuffix("; ")
        return stop

    def below_top(self) -> str:
        """Time the size just below the top timed size when the top is the best so far.

        Then the best lies near the top (a rising or flat curve, the common case on GPUs), so
        the region just below it is timed whatever it costs (only the budget can stop it):
        the ``"within"`` pick may be there, and it tells whether the curve still rises at the
        top. Returns a clause for the stop reason, or "".

        Returns:
            A clause for the stop reason, or "".
        """
        if not self.points:
            return ""
        top = max(self.points)
        below = [c for c in self.untimed() if c < top]
        if not below or self.best() != top:
            if below and self.best() != top:
                self.skipped.setdefault(
                    below[-1],
                    f"the top timed size ({top}) was slower than batch size {self.best()}, "
                    "so the best is not just below the top",
                )
            return ""
        fixed = self.allowance is not None
        if (why := self.blocked(below[-1], shared=False, rounds=fixed)) is not None:
            return f"; batch size {below[-1]}, just below the top, was not timed: {why}"
        if not self.measure(below[-1]):
            return f"; batch size {below[-1]}, just below the top, ran out of memory"
        self.near_top = below[-1]
        return f"; batch size {below[-1]}, just below the top, was timed (the top was the best)"

    def next_probe(self, rule: PickRule, tolerance: float) -> int | None:
        """The next size to time: below the tolerance edge ("within") first, then by the best."""
        timed, untimed = sorted(self.points), self.untimed()
        best = self.best()
        if rule is PickRule.WITHIN:
            edge = min(b for b in timed if self.rate(b) >= (1 - tolerance) * self.rate(best))
            lo = max((b for b in timed if b < edge), default=None)
            gap = [b for b in untimed if b < edge and (lo is None or b > lo)]
            if gap:
                return _middle(gap, lo if lo is not None else gap[0], edge)
        # The size just below the top says how the curve leaves the top; it does not close the
        # gap below the best that the bisection searches.
        lo = max((b for b in timed if b < best and b != self.near_top), default=None)
        hi = min((b for b in timed if b > best), default=None)
        left = [b for b in untimed if b < best and (lo is None or b > lo)]
        if self.near_top is not None and best == max(timed):
            left = [b for b in left if b < self.near_top]
        right = [b for b in untimed if b > best and (hi is None or b < hi)]
        if left and right and hi is not None and lo is not None:
            left_first = self.rate(lo) >= self.rate(hi)
        else:
            left_first = bool(left)
        if left_first:
            return _middle(left, lo if lo is not None else left[0], best)
        if right:
            return _middle(right, best, hi if hi is not None else right[-1])
        return None

    def refine(self, rule: PickRule, tolerance: float) -> str:
        """Bisect below the tolerance edge and beside the best while the cost rule allows."""
        while self.points and (b := self.next_probe(rule, tolerance)) is not None:
            if (why := self.blocked(b, shared=True)) is not None:
                return f"batch size {b} was not timed: {why}"
            self.measure(b)
        return "no untimed size was left beside the best" + (
            " or below the tolerance edge" if rule is PickRule.WITHIN else ""
        )

    def why_untimed(self, b: int) -> str:
        """Why candidate ``b`` was not timed, in words."""
        if b in self.skipped:
            return self.skipped[b]
        if self.oom and b > min(self.oom):
            return f"larger than batch size {min(self.oom)}, which ran out of memory when timed"
        timed = sorted(self.points)
        if not timed:
            return "nothing could be timed"
        lo = max((t for t in timed if t < b), default=None)
        hi = min((t for t in timed if t > b), default=None)
        if lo is None and self.fell_at is not None and b < self.fell_at:
            return f"below batch size {self.fell_at}, where the throughput had fallen away"
        if lo is None:
            return f"below the smallest size timed ({hi}), not reached before the search stopped"
        if hi is None:
            return f"within {ALIGN_SLACK:.0%} above batch size {lo}, the aligned top rung"
        return f"between timed sizes {lo} and {hi}, away from the best and the tolerance edge"
