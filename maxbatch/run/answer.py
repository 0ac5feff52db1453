"""The last stages of :func:`~maxbatch.find_batch_size`: the result record, and the advice over it.

``assemble`` puts what the stages on the device found (:class:`~maxbatch.run.stages.Measured`)
into the result's stage records; ``advise`` adds :func:`~maxbatch.stats.advise.advice_for` over it.
"""

from __future__ import annotations

import dataclasses
import time

from maxbatch.profile.profiler import profile_answer
from maxbatch.resultparts import CapacityAnswer, ProfileAnswer, SearchAnswer
from maxbatch.results import BatchSizeResult, MemoryPoint
from maxbatch.run.request import Request
from maxbatch.run.stages import Measured
from maxbatch.search.accumulation import gradient_bytes
from maxbatch.settings import Mode
from maxbatch.stats.advise import advice_for
from maxbatch.stats.noisestats import NoiseScale, few_samples_note
from maxbatch.step.data import DataSource
from maxbatch.step.loop import steady_state


def assemble(request: Request, measured: Measured, noise: NoiseScale | None) -> BatchSizeResult:
    """The result record, with the notes in the order the stages made them."""
    step, capacity, outcome, picked = (
        request.step,
        measured.capacity,
        measured.outcome,
        measured.picked,
    )
    sample = step.sample
    scan = sample.report(outcome.ceiling) if isinstance(sample, DataSource) else None
    notes = [
        "no optimizer given: the step used AdamW, whose state is real memory"
        if step.optimizer is None and measured.optimizer is not None
        else None,
        capacity.note,
        None if measured.lookup is None else measured.lookup.note,
        *measured.search_notes,
        picked.note,
        None if outcome.complete else outcome.stop_reason,
        None if scan is None else scan.note,
    ]
    profile = ProfileAnswer() if picked.profiled is None else profile_answer(picked.profiled)
    return BatchSizeResult(
        batch_size=picked.batch_size,
        pick_reason=picked.reason,
        device=measured.info.device,
        device_name=measured.info.name,
        mode=step.mode.value,
        precision=step.precision_name,
        optimizer=measured.optimizer,
        capacity=CapacityAnswer(
            capacity_bytes=capacity.capacity_bytes,
            headroom_bytes=capacity.headroom_bytes,
            usable_bytes=capacity.usable_bytes,
            virtual=capacity.virtual,
        ),
        search=_search_answer(request, measured),
        profile=dataclasses.replace(profile, throughput=picked.points),
        noise_scale=noise,
        data=scan,
        notes=tuple(n for n in notes if n is not None),
        seconds=time.perf_counter() - request.started,
        world_size=request.ranks.world_size,
    )


def _search_answer(request: Request, measured: Measured) -> SearchAnswer:
    """What the search found, with the memory model's accumulation term and the loop state."""
    step, outcome, accumulated = request.step, measured.outcome, measured.accumulated
    peaks = {t.batch_size: t.peak_bytes for t in outcome.trials if t.fits}
    model = outcome.memory_model
    extra = (
        accumulated.extra_bytes
        if accumulated is not None
        else float(gradient_bytes(step.model.parameters()))
    )
    if model is not None and step.mode is not Mode.INFERENCE and step.loop.accumulate == 1:
        model = dataclasses.replace(model, accumulation_bytes=extra)
    return SearchAnswer(
        ceiling=outcome.ceiling,
        ceiling_source="measured" if measured.capacity.beyond_host is None else "estimated",
        trials=outcome.trials,
        memory_model=model,
        complete=outcome.complete,
        stop_reason=outcome.stop_reason,
        memory=tuple(MemoryPoint(batch_size=b, peak_bytes=p) for b, p in sorted(peaks.items())),
        steady_state=steady_state(
            step.loop,
            measured.alive_at_start,
            own_step=step.train_step is not None,
            inference=step.mode is Mode.INFERENCE,
        ),
        accumulation_ceiling=(
            accumulated.ceiling
            if accumulated is not None
            else outcome.ceiling
            if step.loop.accumulate > 1
            else None
        ),
        accumulation_trials=() if accumulated is None else accumulated.trials,
    )


def advise(request: Request, result: BatchSizeResult) -> BatchSizeResult:
    """The result with the advice over it (whose plan gives the samples per optimizer step)."""
    wanted, noise = request.advice, result.noise_scale
    few = None if noise is None else noise.data_rows
    critical = None if noise is None or few is not None else noise.critical_batch
    advice = (
        advice_for(result, critical_batch=critical, **wanted.keywords()) if wanted.wanted else None
    )
    if advice is not None and few is not None:  # a critical batch of a few samples is no advice
        advice = dataclasses.replace(advice, notes=(few_samples_note(few), *advice.notes))
    return dataclasses.replace(result, advice=advice)
