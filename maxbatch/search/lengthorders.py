"""The growth order of each step of a trace, read from its bytes at two (batch, length) points.

A step between two operators allocates a tensor whose bytes are fixed, or ``b``, ``b*L`` or
``b*L**2`` times a constant (a monomial), and may free tensors allocated before. Two trials that
differ in batch size and length grow each monomial by its own ratio, so a step's term is read from
its two sizes, and a quadratic term is known from two lengths, before a third length is tried.
"""

from __future__ import annotations

import itertools
import math

import numpy as np


def second_size(first: int, ratio: float, limit: int) -> int:
    """The batch size of the second fitting trial, at ``ratio`` times the first one's length.

    Not ``first``: the trials differ in size and length so that the four monomials of a step's
    bytes (fixed, ``b``, ``b*L``, ``b*L**2``) grow by four ratios at least 20% apart, and each
    step's term is read from its two sizes (:func:`by_order`).

    Returns:
        The smallest such size up to ``4 * first`` (``first`` when the limit allows none).
    """
    for size in range(first + 1, min(limit, 4 * first) + 1):
        growths = sorted(size / first * ratio**k for k in range(3)) + [1.0]
        logs = sorted(math.log(g) for g in growths)
        if min(b - a for a, b in itertools.pairwise(logs)) >= math.log(1.2):
            return size
    return first


def by_order(
    matrix: np.ndarray, rhs: np.ndarray, solved: np.ndarray, allocated: dict[int, list[float]]
) -> np.ndarray:
    """The steps' coefficients, each read as a monomial where the trials do not span every term.

    Only one monomial gives a step's bytes exactly at every trial: that is its term. A step that
    also frees a tensor is two monomials; it is read as such when its freed part is one or two of
    the allocations read before (``allocated``, by column, extended here). Any other step keeps
    its least-squares coefficients (``solved``), as do all when the trials span every term.

    Args:
        matrix: the trials' rows (trials x columns: fixed, ``b*L``, ``b``, ``b*L**2``).
        rhs: the steps' bytes (trials x steps).
        solved: the least-squares coefficients (4 x steps).
        allocated: the positive coefficients read so far, by column.

    Returns:
        The coefficients (4 x steps).
    """
    columns = matrix.shape[1]
    if np.linalg.matrix_rank(matrix) == columns:
        return solved  # the trials span every term: the least squares are exact
    out = solved.copy()
    for j, y in enumerate(rhs.T):
        if not y.any():
            continue
        found: list[tuple[tuple[int, ...], np.ndarray]] = []
        for size in (1, 2):
            for terms in itertools.combinations(range(columns), size):
                coef = _exact(matrix[:, terms], y)
                if coef is not None and (size == 1 or _frees_known(terms, coef, allocated)):
                    found.append((terms, coef))
            if found:
                break
        if len(found) == 1:
            terms, coef = found[0]
            out[:, j] = 0.0
            out[list(terms), j] = coef
            for term, value in zip(terms, coef, strict=True):
                if value > 0:
                    allocated.setdefault(term, []).append(float(value))
    return out


def _exact(matrix: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    """The coefficients that give ``y`` exactly over ``matrix``'s independent columns, or None."""
    if np.linalg.matrix_rank(matrix) < matrix.shape[1]:
        return None
    coef = np.linalg.lstsq(matrix, y, rcond=None)[0]
    return coef if np.allclose(matrix @ coef, y, rtol=1e-9, atol=0.5) else None


def _frees_known(
    terms: tuple[int, ...], coef: np.ndarray, allocated: dict[int, list[float]]
) -> bool:
    """Whether one of two terms frees one or two tensors an earlier step of its column allocated."""
    for term, value in zip(terms, coef, strict=True):
        earlier = allocated.get(term, [])
        sizes = {round(a, 3) for a in earlier}
        if value < 0 and any(
            math.isclose(-value, a, rel_tol=1e-9) or round(-value - a, 3) in sizes for a in earlier
        ):
            return True
    return False
