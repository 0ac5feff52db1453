"""The probe's uses of the fake step: a first guess of the ceiling, and a ceiling it cannot run.

The estimate wing answers; the probe (:mod:`maxbatch.run.stages`) decides what to do with the
answer: start its search from the guess, or take the estimated ceiling as its outcome.
"""

from __future__ import annotations

import logging
import time

from maxbatch.errors import EstimateError, HostMemoryError
from maxbatch.estimate.fakestep import fake_step
from maxbatch.grid import Grid
from maxbatch.settings import Target
from maxbatch.step.spec import StepSpec

log = logging.getLogger(__name__)


def first_guess(
    step: StepSpec, usable_bytes: int, *, start: int, grid: Grid, target: Target
) -> tuple[int | None, str]:
    """The ceiling the fake step predicts for ``usable_bytes``: the probe's first guess.

    Never raises.

    Args:
        step: the probe's step, with the optimizer its workload chose
            (:meth:`~maxbatch.step.spec.StepSpec.with_optimizer`).
        usable_bytes: the bytes a trial may peak at.
        start: the size the probe starts at.
        grid: the sizes the probe may try.
        target: how to count (CUDA: 512-byte rounding and the foreach optimizer).

    Returns:
        The guess and how the search over fake trials ended; or None and why there is no guess:
        nothing fits, or the step cannot run on fake tensors (a model that cannot be
        deep-copied, an operation that needs data, any other error).
    """
    started = time.perf_counter()
    try:
        with fake_step(step, target) as fake:
            guess, reason = fake.ceiling(usable_bytes, start=start, grid=grid)
    except Exception as e:  # noqa: BLE001 - a guess must never stop the probe
        log.info("no first guess from fake tensors: %s: %s", type(e).__name__, e)
        return None, e.reason if isinstance(e, EstimateError) else f"{type(e).__name__}: {e}"
    log.info(
        "first guess from fake tensors: %s (%s; %.2fs)",
        guess,
        reason,
        time.perf_counter() - started,
    )
    return guess, reason


def estimate_beyond_host(
    step: StepSpec, usable_bytes: int, why_not: str, *, start: int, grid: Grid, target: Target
) -> tuple[int, str]:
    """The ceiling from the fake-tensor estimate, for a capacity this machine cannot hold.

    Args:
        step: the probe's step, with the optimizer its workload chose.
        usable_bytes: the virtual device's usable bytes.
        why_not: :func:`~maxbatch.devices.capacity.beyond_host`'s sentence.
        start: the size the probe starts at.
        grid: the sizes the probe may try.
        target: how to count (the device's kind).

    Returns:
        The estimated ceiling, and the sentence that says how it was found.

    Raises:
        HostMemoryError: the step cannot run on fake tensors (or nothing fits): one line naming
            this machine's memory.
    """
    log.warning("%s: the ceiling is estimated on fake tensors", why_not)
    guess, why = first_guess(step, usable_bytes, start=start, grid=grid, target=target)
    if guess is None:
        raise HostMemoryError(
            f"{why_not}, and `maxbatch estimate` cannot answer for it ({why}); lower --memory "
            "to what this machine holds",
            capacity_bytes=usable_bytes,
        )
    return guess, (
        f"estimated on fake tensors, not measured ({why} there): no trial near the capacity "
        "can run on this machine"
    )
