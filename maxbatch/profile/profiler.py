"""The search for the best throughput among candidate batch sizes at or below the ceiling.

Each size is timed by :mod:`maxbatch.profile.timing` (on the real step:
:func:`maxbatch.profile.realstep.profile_workload`), the search runs in
:mod:`maxbatch.profile.descent`, close calls go to interleaved rounds in
:mod:`maxbatch.profile.contest`, and :mod:`maxbatch.profile.pick` picks. The search
(:func:`profile`) does not time every candidate. It sees only ``time_step(b)`` (the seconds of each
replicate) and a clock, so tests drive it with fakes:

1. Descent: the largest multiple of 8 near the top, the size just below it, then rungs about 4x
   apart, down while a rung is within the tolerance of the best (``"within"``; ``flat_gain``
   for ``"fastest"``) or faster than the rung above it.
2. Refinement: for ``"within"``, bisect (on a log scale) below the smallest size within the
   tolerance of the best; then, for both rules, bisect beside the best toward its faster timed
   neighbour, until no untimed candidate is left there.
3. Cost: the top rung is always timed, and so is the size just below the top when the top is
   the best so far (the best is most often there, and with few candidates they are most of the
   cost of timing everything). Every other size is timed only while the time spent stays under
   the larger of ``share`` (24 %) of the predicted cost of timing every candidate and twice
   ``probe_seconds`` (the probe's own time, in :func:`maxbatch.find_batch_size`: what a user
   already waits for the ceiling). Nothing is timed past ``budget``. Costs are predicted from
   the sizes timed so far and the ``prior`` (the probe's trials).
   Costs are predicted from warm steps (a timed size's median step), never from a first,
   cold timing. The search's rule leaves room in the profiler's budget, fixed when the rule
   first applies (:data:`~maxbatch.profile.budget.CONTEST_RATIO` times the rule's limit, under
   ``budget``), for the rounds: every timing, rounds included, stays within it.
4. Contest: when more than one size can be the pick, give or take the measured spreads, all of
   them are timed again in interleaved rounds, and the pick is decided on those rounds alone
   (the noise rules are :mod:`maxbatch.profile.contest`'s); the profile says how sure the pick is.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from maxbatch.errors import ConfigError
from maxbatch.grid import Grid, positive_int
from maxbatch.profile.budget import STEPS, TimeStep
from maxbatch.profile.confidence import Confidence, confidence
from maxbatch.profile.contest import MAX_CONTENDERS, Contest, can_win, decide, run_rounds
from maxbatch.profile.descent import ALIGN, Descent
from maxbatch.profile.pick import pick, sizes_text
from maxbatch.profile.timing import NOISY
from maxbatch.resultparts import ProfileAnswer
from maxbatch.results import Skipped, Throughput
from maxbatch.settings import TOLERANCE, PickRule, check_pick

log = logging.getLogger(__name__)

FLAT_GAIN = 0.01  #: a step that gains no more than 1 % counts as flat
SHARE = 0.24  #: the cost rule: this share of the predicted cost of timing every candidate
NEAR = 0.5  #: "near the ceiling": the top half, where powers of two leave a 2x gap
MAX_NEAR = 16  #: at most this many sizes near the ceiling (coarser multiples when needed)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProfileOutcome:
    """What the profiler timed and picked.

    Attributes:
        batch_size: the pick (the largest candidate when nothing could be timed).
        pick_reason: why, as a sentence.
        points: the timed sizes, by batch size, as the search timed them (the interleaved
            rounds' measurements are in ``rounds``).
        candidates: every size the search could have timed.
        complete: False when the time budget stopped the profiler.
        stop_reason: why the search ended.
        seconds: wall time of the profiler.
        out_of_memory: sizes that ran out of memory while timed (larger ones were then skipped).
        skipped: every candidate not timed, and why.
        confidence: how sure the pick is, and why.
        rounds: the interleaved rounds' throughputs by size (empty when none ran).
        budget_seconds: the profiler's budget, every timing and round included (None when the
            search never needed one).
    """

    batch_size: int
    pick_reason: str
    points: tuple[Throughput, ...]
    candidates: tuple[int, ...]
    complete: bool
    stop_reason: str
    seconds: float
    out_of_memory: tuple[int, ...] = ()
    skipped: tuple[Skipped, ...] = ()
    confidence: Confidence = Confidence(level="high", reason="")
    rounds: tuple[dict[int, float], ...] = ()
    budget_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the profile as a JSON-ready dict."""
        return dataclasses.asdict(self)


def candidates(ceiling: int, *, min_batch_size: int = 1, multiple_of: int = 1) -> list[int]:
    """The sizes worth timing: a doubling ladder, multiples of 8 near the ceiling, the ceiling.

    The ladder is ``multiple_of * 2**k`` (the powers of two for ``multiple_of=1``). In the top
    half below the ceiling, where the ladder leaves a 2x gap, come the multiples of
    ``lcm(8, multiple_of)``, thinned to coarser multiples where there would be more than 16.
    Every size is a multiple of ``multiple_of`` from ``min_batch_size`` to ``ceiling``; the
    smallest such size and the largest (the ceiling when it is a multiple) are always included.

    Returns:
        The sizes, ascending.

    Raises:
        ConfigError: an argument is not a positive integer, or no such size exists.
    """
    positive_int(ceiling, "ceiling")
    grid = Grid(min_batch_size=min_batch_size, multiple_of=multiple_of)
    low, top = grid.lower, grid.floor(ceiling)
    if low > top:
        raise ConfigError(f"no multiple of {multiple_of} lies in [{min_batch_size}, {ceiling}]")
    sizes = {low, top} | {multiple_of << k for k in range(top.bit_length())}
    spacing = math.lcm(ALIGN, multiple_of)
    start = math.ceil(top * (1 - NEAR))
    while (top - start) // spacing + 1 > MAX_NEAR:
        spacing *= 2
    sizes.update(range(-(-start // spacing) * spacing, top + 1, spacing))
    return sorted(b for b in sizes if low <= b <= top)


def profile(
    time_step: TimeStep,
    sizes: Iterable[int],
    *,
    rule: PickRule | str = PickRule.WITHIN,
    tolerance: float = TOLERANCE,
    budget: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
    flat_gain: float = FLAT_GAIN,
    share: float = SHARE,
    probe_seconds: float = 0.0,
    noisy: float = NOISY,
    on_point: Callable[[Throughput], None] | None = None,
    prior: Mapping[int, float] | None = None,
    steps: int = STEPS,
) -> ProfileOutcome:
    """Search the throughput curve over candidate ``sizes`` and pick one (see the module doc).

    Args:
        time_step: ``time_step(b)`` returns the seconds of each timed step at batch size ``b``,
            or an empty list when ``b`` ran out of memory.
        sizes: the candidates, e.g. from :func:`candidates`.
        rule: the pick rule, ``"within"`` or ``"fastest"`` (see :func:`pick`).
        tolerance: the tolerance of the ``"within"`` rule.
        budget: seconds the search may take; a size is timed only if its predicted cost fits.
        clock: seconds as a float, read around every ``time_step`` call.
        flat_gain: a relative gain no larger than this counts as flat.
        share: beyond the top and the size below it, sizes are timed while the time spent stays
            under this share of the predicted cost of timing every candidate ...
        probe_seconds: ... or under twice this (the probe's own time), when more.
        noisy: IQR / median above which a size is flagged noisy.
        on_point: called with each :class:`Throughput` as it is measured.
        prior: rough seconds of timing some sizes (e.g. from the probe's trials), so that
            the cost rule and ``budget`` hold from the first size. Without them and with a
            ``budget``, the smallest size is timed first to learn what a step costs.
        steps: steps per ``time_step`` call (warm-up and replicates), for warm cost predictions.

    Returns:
        The timed points, the pick and why, why the search stopped, what it skipped and why,
        and how sure the pick is.

    Raises:
        ConfigError: the rule or the tolerance is invalid, or there are no candidates.
    """
    chosen = check_pick(rule, tolerance)
    ordered = sorted(set(sizes))
    if not ordered:
        raise ConfigError("there are no candidate batch sizes to time")
    descent = Descent(
        time_step,
        ordered,
        budget=budget,
        clock=clock,
        share=share,
        probe_seconds=probe_seconds,
        noisy=noisy,
        on_point=on_point,
        prior=dict(prior or {}),
        steps=steps,
    )
    if budget is not None and not prior and descent.blocked(ordered[0], shared=False) is None:
        descent.measure(ordered[0])
    keep = 1 - (tolerance if chosen is PickRule.WITHIN else flat_gain)
    stop = descent.descend(keep) + descent.below_top()
    if descent.points:
        stop += f"; {descent.refine(chosen, tolerance)}"
    if descent.oom:
        stop += f"; batch size {min(descent.oom)} ran out of memory while being timed"
    contest = _contest(descent, chosen, tolerance, noisy)
    if contest is not None:
        stop += f"; {_rounds_text(contest)}"
    points = tuple(descent.points[b] for b in sorted(descent.points))
    if contest is not None and contest.rounds:
        batch_size, reason, sure = decide(contest, chosen, tolerance)
        if all(p.noisy for p in [*points, *contest.points.values()]):
            sure = confidence(batch_size, descent.points, chosen, tolerance)
    elif points:
        batch_size, reason = pick(points, rule=chosen, tolerance=tolerance)
        sure = confidence(batch_size, descent.points, chosen, tolerance, contest=contest)
    else:
        batch_size, reason = ordered[-1], f"the ceiling: no size could be timed ({stop})"
        sure = Confidence(level="low", reason="no size could be timed")
    if descent.budget_hit and points:
        reason += "; the time budget stopped the search before every size it wanted"
    skipped = tuple(Skipped(batch_size=b, reason=descent.why_untimed(b)) for b in descent.untimed())
    log.info("profiler stopped: %s", stop)
    for s in skipped:
        log.info("profiler skipped batch size %s: %s", s.batch_size, s.reason)
    log.info("pick confidence %s: %s", sure.level, sure.reason)
    return ProfileOutcome(
        batch_size=batch_size,
        pick_reason=reason,
        points=points,
        candidates=tuple(ordered),
        complete=not descent.budget_hit,
        stop_reason=stop,
        seconds=clock() - descent.start,
        out_of_memory=tuple(sorted(descent.oom)),
        skipped=skipped,
        confidence=sure,
        rounds=tuple(contest.rounds) if contest is not None else (),
        budget_seconds=descent.allowance,
    )


def _contest(descent: Descent, rule: PickRule, tolerance: float, noisy: float) -> Contest | None:
    """Interleaved rounds of every size that can be the pick; None when only one can."""
    if not descent.points:
        return None
    chosen, _ = pick(list(descent.points.values()), rule=rule, tolerance=tolerance)
    sizes = can_win(descent.points, chosen, rule, tolerance)
    if len(sizes) < 2:
        return None
    doubt, left = sizes[:MAX_CONTENDERS], sizes[MAX_CONTENDERS:]
    return run_rounds(doubt, descent.time_again, noisy, left, room=descent.round_blocked)


def _rounds_text(contest: Contest) -> str:
    """The stop reason's clause on the interleaved rounds."""
    names = sizes_text(sorted(contest.contenders))
    text = (
        f"then {len(contest.rounds)} interleaved round{'s' if len(contest.rounds) != 1 else ''}"
        f" of {names}, the sizes that could each be the pick given their timing spread"
    )
    if contest.blocked:
        text += f" ({contest.blocked})"
    if contest.left_out:
        text += (
            f"; {sizes_text(sorted(contest.left_out))} could too but did not fit in the rounds "
            "(left out of the comparison)"
        )
    return text


def profile_answer(outcome: ProfileOutcome) -> ProfileAnswer:
    """The profile's account for :class:`~maxbatch.results.BatchSizeResult`.

    The timed sizes, why the profiler stopped, what it skipped and why, how sure the pick is.

    Returns:
        The result's :class:`~maxbatch.resultparts.ProfileAnswer`.
    """
    return ProfileAnswer(
        throughput=outcome.points,
        stop_reason=outcome.stop_reason,
        skipped=outcome.skipped,
        confidence=outcome.confidence.level,
        confidence_reason=outcome.confidence.reason,
        seconds=outcome.seconds,
        budget_seconds=outcome.budget_seconds,
    )
