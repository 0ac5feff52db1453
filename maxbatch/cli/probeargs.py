"""``probe``'s own options as one record, and the library's keywords they become."""

from __future__ import annotations

import dataclasses
from typing import Any

from maxbatch.cli.progress import Progress
from maxbatch.errors import ConfigError
from maxbatch.step.loop import ZeroGrad


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

    def options(self, progress: Progress) -> dict[str, Any]:
        """The keywords both paths take (in a process of its own or not).

        Returns:
            ``find_batch_size``'s keywords for the search, the profile and the advice.
        """
        return {
            "time_budget": self.time_budget,
            "max_trials": self.max_trials,
            "on_trial": progress.trial,
            "profile": not self.no_profile,
            "pick": self.pick,
            "tolerance": self.tolerance,
            "on_point": progress.point,
            "dataset_size": self.dataset_size,
            "global_batch": self.global_batch,
            "base_batch": self.base_batch,
            "base_lr": self.base_lr,
            "noise_scale": self.noise_scale,
        }

    def check_loop(self) -> None:
        """Refuse the loop's options with ``--isolate`` (its children do not take them yet).

        Raises:
            ConfigError: ``--isolate`` with ``--zero-grad``, ``--accumulate`` or
                ``--allow-growth``.
        """
        loop = (
            self.zero_grad != ZeroGrad.BEFORE_FORWARD or self.accumulate != 1 or self.allow_growth
        )
        if self.isolate and loop:
            raise ConfigError(
                "--zero-grad, --accumulate and --allow-growth are not passed to isolated trials "
                "yet; run without --isolate"
            )

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
