"""The memory model over (batch, length), fitted from the traces of real trials.

At every operator of a step the live bytes are ``F + b * (s + t*L + q*L**2)``: a fixed part
(parameters, gradients, optimizer state), and per sample a constant part, a part linear in the
length (embeddings, recurrent states, feed-forward activations) and a quadratic one (attention
scores without a fused kernel). Every trial that fit gives, for each operator, one equation in its
four unknowns; with the same operators at every trial (one array of equations, one right-hand
side per operator) a least-squares solve fits all of them at once, and the ceiling at any length is
where the first operator's line reaches the usable bytes. When the operators differ between
trials (a loop over time steps), the fit falls back to the trials' peaks.

The terms are fitted as the trials allow: a term is only used once the trials span it (two batch
sizes for the fixed part, two, then three lengths for the linear and quadratic parts). Until they
do, each step between two operators is read as a monomial from its bytes' growth
(:mod:`maxbatch.search.lengthorders`): two trials that differ in batch size and length tell the
fixed, per-sample, linear and quadratic parts apart, so the quadratic term is known without a
third length. The verification trials that follow each prediction add equations, so the model
sharpens as it goes.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import numpy as np

from maxbatch.buckets import LengthMemoryModel
from maxbatch.memtrace import MemoryTrace
from maxbatch.search.lengthorders import by_order

#: The columns of the fit, in the order they are admitted: fixed, per token, per sample, per pair.
_COLUMNS = ("fixed", "token", "sample", "pair")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Point:
    """One trial, for the fit: its size, length, peak and trace (None: not counted).

    A trial that ran out of memory is a point only with its (incomplete) trace.
    """

    batch_size: int
    length: int
    peak_bytes: int
    trace: MemoryTrace | None


def _row(batch_size: int, length: int, columns: int) -> list[float]:
    b, n = float(batch_size), float(length)
    return [1.0, b * n, b, b * n * n][:columns]


def _design(points: list[Point], quadratic: bool) -> tuple[np.ndarray, list[int]] | None:
    """The equations' matrix over the columns the points determine, and their indices.

    Columns are admitted in the order of ``_COLUMNS`` while each adds to the rank (at one batch
    size the per-sample column is the fixed one again, and is left out).

    Returns:
        The matrix and the indices of its columns, or None without a point.
    """
    if not points:
        return None
    rows = np.array([_row(p.batch_size, p.length, len(_COLUMNS)) for p in points])
    chosen: list[int] = []
    for column in range(len(_COLUMNS) if quadratic else len(_COLUMNS) - 1):
        if len(chosen) == len(points):
            break
        trial = [*chosen, column]
        if np.linalg.matrix_rank(rows[:, trial]) == len(trial):
            chosen = trial
    return rows[:, chosen], chosen


def _solve(points: list[Point], rhs: np.ndarray, quadratic: bool) -> np.ndarray | None:
    """Least squares of ``rhs`` (points x columns) over the points' design (4 x columns).

    Returns:
        The coefficients (columns not admitted are zero), or None without a point.
    """
    design = _design(points, quadratic)
    if design is None:
        return None
    matrix, chosen = design
    full = np.zeros((len(_COLUMNS), rhs.shape[1]))
    full[chosen] = np.linalg.lstsq(matrix, rhs, rcond=None)[0]
    return full


def _per_operator(points: list[Point], quadratic: bool) -> np.ndarray | None:
    """Each operator's coefficients, when the traces run the same operators (else None).

    Fitted on the steps between operators (what each one allocated, less what was freed), each
    read as a monomial where the trials do not yet span every term (``by_order``); an operator's
    coefficients are the sum of the steps up to it. A trial that ran out of memory
    traced the operators up to the refused one: it adds its equations to those operators only,
    so the operators are fitted in segments.

    Returns:
        The coefficients (4 x operators), or None.
    """
    traces = [p.trace for p in points]
    if any(t is None for t in traces):
        return None
    counts = Counter(len(t.live) for t in traces if t is not None and t.complete)
    if not counts:
        return None
    # The operators most trials ran: a trial at batch size 1 can run fewer (a transpose of a
    # dimension of 1 needs no copy), and is left out of the per-operator fit.
    total = max(counts, key=lambda n: (counts[n], n))
    kept = [
        p
        for p in points
        if p.trace is not None
        and (len(p.trace.live) == total or (not p.trace.complete and 0 < len(p.trace.live) < total))
    ]
    cuts = sorted({len(p.trace.live) for p in kept if p.trace is not None} | {total})
    steps = np.zeros((len(_COLUMNS), total))
    allocated: dict[int, list[float]] = {}
    start = 0
    for cut in cuts:
        rows = [p for p in kept if p.trace is not None and len(p.trace.live) >= cut]
        rhs = np.array(
            [np.diff(p.trace.live, prepend=0)[start:cut] for p in rows if p.trace is not None],
            dtype=float,
        )
        solved = _solve(rows, rhs, quadratic)
        if solved is None:
            return None
        columns = len(_COLUMNS) if quadratic else len(_COLUMNS) - 1
        matrix = np.array([_row(p.batch_size, p.length, columns) for p in rows])
        steps[:, start:cut] = by_order(matrix, rhs, solved, allocated)
        start = cut
    return np.cumsum(steps, axis=1)


def _coefficients(points: list[Point], quadratic: bool = True) -> np.ndarray | None:
    """Per-operator coefficients (4 x operators), else those of the peaks of the trials that fit.

    Returns:
        The coefficients, or None when there is nothing to fit.
    """
    per_operator = _per_operator(points, quadratic)
    if per_operator is not None:
        return per_operator
    fitted = [p for p in points if p.trace is None or p.trace.complete]
    return _solve(fitted, np.array([[float(p.peak_bytes)] for p in fitted]), quadratic)


class LengthFit:
    """The model fitted so far over the trials that fit; it predicts ceilings and lengths.

    Args:
        usable_bytes: the bytes a trial may peak at.
        quadratic: admit the quadratic term (False: a model that assumes linear growth).
    """

    def __init__(self, usable_bytes: int, *, quadratic: bool = True):
        self.usable_bytes = usable_bytes
        self.quadratic = quadratic
        self.points: list[Point] = []
        self._coef: np.ndarray | None = None
        self._per_operator = False

    def add(self, point: Point) -> None:
        """Take one more trial into the fit."""
        self.points.append(point)
        per_operator = _per_operator(self.points, self.quadratic)
        self._per_operator = per_operator is not None
        self._coef = (
            per_operator if per_operator is not None else _coefficients(self.points, self.quadratic)
        )

    def _peaks(self, batch_size: int, length: int) -> np.ndarray | None:
        if self._coef is None:
            return None
        peaks: np.ndarray = np.array(_row(batch_size, length, len(_COLUMNS))) @ self._coef
        return peaks

    def fits(self, batch_size: int, length: int) -> bool | None:
        """Whether the model predicts the step fits (None: no model yet)."""
        peaks = self._peaks(batch_size, length)
        return None if peaks is None else bool(peaks.max() <= self.usable_bytes)

    def ceiling(self, length: int, *, limit: int) -> int | None:
        """The largest batch size predicted to fit at ``length`` (at most ``limit``).

        Returns:
            The predicted ceiling (0: not even 1 fits), or None without a model whose bytes grow
            with the batch.
        """
        line = self._line_at(length)
        if line is not None:
            fixed_bytes, per_sample = line
            return max(0, min(limit, math.floor((self.usable_bytes - fixed_bytes) / per_sample)))
        if self._coef is None:
            return None
        fixed = self._coef[0]
        grows = self._coef[1] * length + self._coef[2] + self._coef[3] * length * length
        best: int | None = None
        for f, g in zip(fixed, grows, strict=True):
            if g > 0:
                # 1e-6 absorbs the fit's rounding on an exact boundary; the trials verify it.
                c = math.floor((self.usable_bytes - f) / g + 1e-6)
                best = c if best is None else min(best, c)
        return None if best is None else max(0, min(limit, best))

    def _line_at(self, length: int) -> tuple[float, float] | None:
        """Without per-operator lines, the peaks' line at this very length.

        Through the two largest sizes that fit there: the peak is affine in the batch once one
        operator holds it.

        Returns:
            The line's fixed bytes and bytes per sample, or None.
        """
        if self._per_operator:
            return None
        here = sorted(
            (p.batch_size, p.peak_bytes)
            for p in self.points
            if p.length == length and (p.trace is None or p.trace.complete)
        )
        if len(here) < 2 or here[-1][0] == here[-2][0]:
            return None
        (b0, y0), (b1, y1) = here[-2], here[-1]
        slope = (y1 - y0) / (b1 - b0)
        return (y1 - slope * b1, slope) if slope > 0 else None

    def max_length(self, batch_size: int, *, step: int, limit: int) -> int | None:
        """The longest multiple of ``step`` (at most ``limit``) predicted to fit at ``batch_size``.

        Returns:
            The predicted length (0: not even ``step`` fits), or None without a model.
        """
        if self._coef is None or not (self._coef[1].any() or self._coef[3].any()):
            return None  # nothing grows with the length yet
        lo, hi = 0, limit // step  # in units of step: lo fits (0 trivially), hi may not
        if self.fits(batch_size, hi * step):
            return hi * step
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.fits(batch_size, mid * step):
                lo = mid
            else:
                hi = mid
        return lo * step

    def model(self) -> LengthMemoryModel | None:
        """The peak-level model over the trials that fit: what the report shows."""
        if not self.points:
            return None
        peaks = [
            dataclasses.replace(p, trace=None)
            for p in self.points
            if p.trace is None or p.trace.complete
        ]
        fitted = _coefficients(peaks, self.quadratic)
        if fitted is None:
            return None
        coef = fitted[:, 0]
        return LengthMemoryModel(
            fixed_bytes=float(coef[0]),
            bytes_per_sample=float(coef[2]),
            bytes_per_token=float(coef[1]),
            bytes_per_token_pair=float(coef[3]),
        )
