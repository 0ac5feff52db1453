"""``probe``'s own options as one record, and the library's keywords they become.

A field named as a keyword of :func:`~maxbatch.find_batch_size` or
:func:`~maxbatch.probe_file` passes by name: a new flag for a library keyword is its click
option and its field here. The rest are listed once: :data:`NEGATED` (``--no-profile`` turns
``profile`` off) and :data:`OWN` (the command's own, with what for).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from maxbatch.cli.progress import Progress
from maxbatch.errors import ConfigError
from maxbatch.run.finder import find_batch_size
from maxbatch.run.isolate import probe_file

#: ``probe``'s flags that turn a library keyword off: field -> keyword (given ``not`` the flag).
NEGATED: dict[str, str] = {"no_profile": "profile", "no_cache": "cache"}

#: ``probe``'s options that are the command's own, not passed by name, and what they are for.
OWN: dict[str, str] = {
    "model_file": "loaded first (a bad file is reported before anything else), passed loaded",
    "device": "resolved for this rank first (torchrun), passed resolved",
    "report_dir": "the report files the command writes",
    "as_json": "how the command prints the answer",
    "verbose": "the command's log level",
    "debug": "the command's tracebacks",
}


def library_keywords() -> frozenset[str]:
    """The keywords ``probe_file`` takes: its own and :func:`~maxbatch.find_batch_size`'s.

    Returns:
        Their names.
    """
    return frozenset(
        p.name
        for fn in (probe_file, find_batch_size)
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProbeArgs:
    """What ``probe``'s own options asked for (the options it shares with ``estimate`` apart)."""

    model_file: str
    device: str | None
    memory: str | None
    time_budget: float | None
    max_trials: int | None
    no_profile: bool
    no_cache: bool
    isolate: bool
    trial_timeout: float | None
    trust_cache: bool
    pick: str
    tolerance: float
    dataset_size: int | None
    global_batch: int | None
    base_batch: int | None
    base_lr: float | None
    noise_scale: bool
    zero_grad: str
    accumulate: int
    allow_growth: str | None
    report_dir: str | None
    as_json: bool
    verbose: int
    debug: bool

    @classmethod
    def take(cls, model_file: str, given: dict[str, Any]) -> ProbeArgs:
        """Pop ``probe``'s own options from the command's keywords (the shared ones stay).

        Returns:
            The record.
        """
        names = [f.name for f in dataclasses.fields(cls) if f.name != "model_file"]
        return cls(model_file=model_file, **{name: given.pop(name) for name in names})

    def keywords(self, progress: Progress) -> dict[str, Any]:
        """The library's keywords: the fields by name, :data:`NEGATED` turned, the progress lines.

        Returns:
            :func:`~maxbatch.probe_file`'s keywords (the device and the step's apart).
        """
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        keywords = {
            NEGATED.get(name, name): not value if name in NEGATED else value
            for name, value in given.items()
            if name not in OWN
        }
        if self.trial_timeout is None:  # not given: the library's default (None there: no limit)
            del keywords["trial_timeout"]
        if self.isolate:  # isolated trials neither read nor write the result cache
            keywords.update(cache=False, trust_cache=False)
        return {**keywords, "on_trial": progress.trial, "on_point": progress.point}

    def check_timeout(self) -> None:
        """Refuse ``--trial-timeout`` without ``--isolate``.

        Raises:
            ConfigError: ``--trial-timeout`` given without ``--isolate``.
        """
        if self.trial_timeout is not None and not self.isolate:
            raise ConfigError(
                "--trial-timeout bounds the processes of --isolate; add --isolate (without it "
                "every trial runs in this process: --time-budget bounds the search)"
            )
