"""The integrations judged by the frameworks' own loops: answer, brute force and the size above.

For each model of the judge tests (an MLP, a CNN with batch norm, a model whose forward returns
an output object; GPT-2 for the Trainer), with and without ``global_batch``, it probes with the
integration (``MaxBatch`` / ``tune``, ``profile=False``), then finds the framework's own largest
batch size that trains five optimizer steps inside ``virtual_device(cap)`` by bisection
(``trainer.fit`` / ``Trainer.train`` at each size, independent of the answer), and trains the
answer + 1 and the plan set. With ``global_batch`` the loop accumulates the micro-batches the probe
ran (``steady_state["micro_batches"]``, at least 2).

    python benchmarks/integrations.py [--framework lightning|transformers] [--no-brute-force]

One markdown row per case on stdout. Minutes on a laptop CPU (each judged size is a real fit).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the judge tests' models and loops
sys.path.insert(0, str(ROOT))  # this checkout's maxbatch, also under an editable install elsewhere
os.environ["HF_HUB_OFFLINE"] = "1"

Judge = Callable[[int, int], bool]  # (batch size, accumulation steps) -> trains


def largest(trains: Judge, accumulate: int, near: int) -> int:
    """The largest size the loop trains, by bisection between ``near // 2`` and ``2 * near``."""
    lo, hi = max(1, near // 2), 2 * near
    while not trains(lo, accumulate):
        lo, hi = max(1, lo // 2), lo
    while trains(hi, accumulate):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if trains(mid, accumulate) else (lo, mid)
    return lo


def lightning_probe(case: Any, global_batch: int | None) -> tuple[Any, int, int]:
    from judge_lightning import module, trainer

    from maxbatch.integrations.lightning import MaxBatch

    tuner = MaxBatch(memory=case.cap, profile=False, global_batch=global_batch)
    trainer(tuner, steps=1).fit(module(case, 4))
    assert tuner.plan is not None
    return tuner.result, tuner.plan.batch_size, tuner.plan.accumulation_steps


def transformers_probe(case: Any, global_batch: int | None) -> tuple[Any, int, int]:
    from judge_transformers import trainer

    from maxbatch.integrations.transformers import tune

    t = trainer(case)
    result = tune(t, global_batch=global_batch, memory=case.cap, profile=False)
    return result, t.args.per_device_train_batch_size, t.args.gradient_accumulation_steps


def frameworks(name: str) -> tuple[list[Any], Any, Judge]:
    if name == "lightning":
        from judge_lightning import trains
        from judged import CASES

        return CASES, lightning_probe, trains
    from judge_transformers import HF_CASES, trains

    return HF_CASES, transformers_probe, trains


def row(name: str, case: Any, global_batch: int | None, brute: bool) -> str:
    _, probe, trains = frameworks(name)
    with contextlib.redirect_stdout(io.StringIO()):
        result, micro, steps = probe(case, global_batch)
    state = result.steady_state or {}
    accumulate = 1 if global_batch is None else max(2, int(state.get("micro_batches") or 0))

    def judge(b: int, k: int) -> bool:
        with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints its metrics
            return bool(trains(case, b, k))

    ceiling = result.ceiling
    own = largest(judge, accumulate, ceiling) if brute else None
    fits = "trains" if judge(ceiling, accumulate) else "OOM"
    above = "trains" if judge(ceiling + 1, accumulate) else "OOM"
    plan = "trains" if judge(micro, steps) else "OOM"
    return (
        f"| {name} | {case.name} | {case.cap >> 20} MiB | {global_batch or '-'} | {accumulate} "
        f"| {ceiling} ({fits}) | {micro} x {steps} ({plan}) | {own if own else '-'} | {above} |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=["lightning", "transformers"], action="append")
    parser.add_argument("--no-brute-force", dest="brute", action="store_false")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    print(
        "| framework | model | cap | global_batch | micro-batches judged | answer: ceiling "
        "| plan set | framework's own largest | ceiling + 1 |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.framework or ["lightning", "transformers"]:
        cases, _, _ = frameworks(name)
        for case in cases:
            for global_batch in (None, case.global_batch):
                print(row(name, case, global_batch, args.brute), flush=True)


if __name__ == "__main__":
    main()
