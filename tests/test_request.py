"""The request is the one list of options: the result cache's key is derived from its fields."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from maxbatch.grid import Grid
from maxbatch.run.distributed import join
from maxbatch.run.request import KEYED_APART, NOT_KEYED, Request, cache_settings, fields
from maxbatch.settings import AdviceSettings, MemorySettings, ProfileSettings, SearchSettings
from maxbatch.step.spec import StepSpec

DEVICE = ["cpu", "cpu", 1 << 30]


def request(**records: object) -> Request:
    model = torch.nn.Linear(4, 2)
    base = {
        "started": time.perf_counter(),
        "search": SearchSettings(grid=Grid.build(min_batch_size=2, max_batch_size=64)),
        "memory": MemorySettings.build(memory="1MiB", headroom=None),
        "profile": ProfileSettings(),
        "advice": AdviceSettings(global_batch=64),
        "step": StepSpec.build(model, torch.randn(3, 4), loss_fn=lambda out, batch: out.sum()),
        "device": torch.device("cpu"),
        "ranks": join(False),
    }
    return Request(**{**base, **records})  # type: ignore[arg-type]


def test_every_field_is_keyed_or_listed_as_not_changing_the_answer() -> None:
    functions, settings = cache_settings(request(), DEVICE)
    paths = {path for path, _ in fields(request())}
    keyed = set(settings) | {p for p in paths if p.rsplit(".", 1)[-1] in functions}
    assert paths <= keyed | set(NOT_KEYED) | set(KEYED_APART)
    assert set(NOT_KEYED) | set(KEYED_APART) <= paths, "a listed field is gone"
    assert settings["search.grid.max_batch_size"] == 64
    assert settings["profile.rule"] == "within"
    assert settings["step.loop.zero_grad"] == "before_forward"
    assert settings["advice.global_batch"] == 64
    assert settings["memory.memory_bytes"] == 1 << 20
    assert "loss_fn" in functions


def test_a_new_field_is_keyed_by_default() -> None:
    wider = dataclasses.make_dataclass(
        "Wider",
        [("patience", "int | None", dataclasses.field(default=None))],
        bases=(SearchSettings,),
        frozen=True,
        kw_only=True,
    )
    _, settings = cache_settings(request(search=wider(patience=5)), DEVICE)
    assert settings["search.patience"] == 5
    _, settings = cache_settings(request(search=SearchSettings(max_trials=3)), DEVICE)
    assert settings["search.max_trials"] == 3  # the real one, added the same way


def test_a_field_the_key_cannot_say_fails_until_listed() -> None:
    odd = dataclasses.make_dataclass(
        "Odd",
        [("hook", "object", dataclasses.field(default=None))],
        bases=(AdviceSettings,),
        frozen=True,
        kw_only=True,
    )
    with pytest.raises(TypeError, match="advice.hook"):
        cache_settings(request(advice=odd(hook=object())), DEVICE)


def test_settings_that_change_the_answer_change_the_key() -> None:
    _, one = cache_settings(request(), DEVICE)
    _, two = cache_settings(request(profile=ProfileSettings(tolerance=0.05)), DEVICE)
    _, same = cache_settings(
        request(
            search=SearchSettings(
                time_budget=5.0, grid=Grid.build(min_batch_size=2, max_batch_size=64)
            )
        ),
        DEVICE,
    )
    assert one != two
    assert one == same  # the time budget is listed as not changing the answer


def test_the_isolated_child_takes_every_plain_option_the_parent_does_not_keep() -> None:
    import inspect

    from maxbatch import find_batch_size
    from maxbatch.run.childoptions import PARENT_OWN, _child_options

    taken = _child_options()
    keywords = {
        p.name
        for p in inspect.signature(find_batch_size).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    assert set(PARENT_OWN) <= keywords, "a parent-own keyword is gone"
    assert taken.isdisjoint(PARENT_OWN)
    assert {"memory", "pick", "zero_grad", "accumulate", "allow_growth", "optimizer"} <= taken
    assert not taken & {"on_trial", "on_point", "loss_fn", "extra_state", "train_step"}
