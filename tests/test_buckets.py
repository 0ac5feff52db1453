"""The bucket profile records: lookups by length, lhotse's form, JSON round trip, validation."""

from __future__ import annotations

import json

import pytest

from maxbatch import Bucket, BucketProfile, ConfigError, LengthMemoryModel, LengthTrial


def _profile() -> BucketProfile:
    return BucketProfile(
        buckets=(
            Bucket(max_length=64, ceiling=40, min_length=1, items=70, share=0.7),
            Bucket(max_length=128, ceiling=18, min_length=65, pick=16, items=20, share=0.2),
            Bucket(max_length=512, ceiling=3, min_length=129, items=10, share=0.1),
        ),
        memory_model=LengthMemoryModel(
            fixed_bytes=1000.0, bytes_per_sample=10.0, bytes_per_token=4.0, bytes_per_token_pair=0.5
        ),
        trials=(LengthTrial(batch_size=3, length=512, fits=True, peak_bytes=900, seconds=0.1),),
        seconds=1.5,
        device="cpu",
        usable_bytes=10_000,
        histogram=((1, 64, 70), (65, 128, 20), (129, 512, 10)),
    )


@pytest.mark.parametrize(
    ("length", "expected"),
    [(0, 40), (1, 40), (64, 40), (65, 16), (128, 16), (129, 3), (512, 3)],
)
def test_batch_size_for_uses_the_shortest_bucket_holding_the_length(
    length: int, expected: int
) -> None:
    assert _profile().batch_size_for(length) == expected


@pytest.mark.parametrize("length", [-1, 513])
def test_batch_size_for_outside_the_profile_is_a_config_error(length: int) -> None:
    with pytest.raises(ConfigError, match=str(length)) as info:
        _profile().batch_size_for(length)
    assert isinstance(info.value, ValueError)


def test_to_lhotse_gives_one_bin_and_one_batch_size_per_bucket() -> None:
    assert _profile().to_lhotse() == {
        "bucket_duration_bins": [64, 128, 512],
        "bucket_batch_size": [40, 16, 3],
    }


def test_to_dict_is_json_and_round_trips() -> None:
    profile = _profile()
    data = json.loads(json.dumps(profile.to_dict()))
    assert data["buckets"][1]["batch_size"] == 16
    assert data["buckets"][1]["tokens_per_batch"] == 16 * 128
    assert data["real_trials"] == 1
    assert BucketProfile.from_dict(data) == profile


def test_memory_model_predicts_linear_and_quadratic_growth() -> None:
    model = _profile().memory_model
    assert model is not None
    assert model.peak(2, 10) == 1000 + 2 * (10 + 40 + 50)
    assert model.max_batch_size(10, 1000 + 5 * 100 + 99) == 5


@pytest.mark.parametrize(
    ("buckets", "match"),
    [
        ((), "at least one"),
        (
            (Bucket(max_length=128, ceiling=4), Bucket(max_length=64, ceiling=8)),
            "increase strictly",
        ),
    ],
)
def test_profile_validates_its_buckets(buckets: tuple[Bucket, ...], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        BucketProfile(buckets=buckets)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_length": 0, "ceiling": 1}, "max_length"),
        ({"max_length": 8, "ceiling": 0}, "ceiling 0"),
        ({"max_length": 8, "ceiling": 4, "pick": 5}, "pick 5"),
        ({"max_length": 8, "ceiling": 4, "min_length": 9}, "min_length"),
    ],
)
def test_bucket_validates_its_fields(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Bucket(**kwargs)
