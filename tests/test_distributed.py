"""Ranks of a real gloo process group on the CPU agree: one ceiling, one pick, shared failures.

Each rank is a child process (``tests/dist_worker.py``) with its own virtual device capacity;
every test has a hard timeout, so a rank that hangs fails the test instead of the suite.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maxbatch import find_batch_size
from maxbatch.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "dist_worker.py"
LIMIT = 240  # seconds: a hang fails the test, not the suite


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(scenarios: str, caps: list[str], **env: str) -> list[dict]:
    """Run one worker per capacity as the ranks of one group; return each rank's JSON lines.

    Returns, per rank, ``{scenario: its JSON}``, or ``{"exit": code, "err": stderr}`` for a rank
    that printed nothing.
    """
    port = str(free_port())
    procs = []
    for rank in range(len(caps)):
        rank_env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(len(caps)),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            **env,
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), scenarios, ",".join(caps)],
                env=rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=LIMIT)
            lines = [json.loads(line) for line in out.strip().splitlines()]
            outputs.append(
                {d["scenario"]: d for d in lines} if lines else {"exit": p.returncode, "err": err}
            )
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outputs


def single_ceiling(cap: str) -> int:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)
    )
    result = find_batch_size(model, torch.randn(8, 256), memory=cap, optimizer="sgd", profile=False)
    return result.ceiling


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    """One group of two ranks (40 and 20 MiB) runs every two-rank scenario once."""
    return launch("caps,profile,ddp,fsdp,fail", ["40MiB", "20MiB"])


def scenario(results: list[dict], name: str) -> list[dict]:
    return [r[name] for r in results]


def check_agreed(results: list[dict], caps: list[str]) -> None:
    smallest = single_ceiling(min(caps, key=lambda c: int(c.removesuffix("MiB"))))
    assert [r.get("ceiling") for r in results] == [smallest] * len(caps), results
    for r in results:
        assert r["world_size"] == len(caps)
        assert r["global_batch_size"] == r["batch_size"] * len(caps)
        assert r["unchanged"] is True
        assert r["trials"] == results[0]["trials"]  # the same sizes, the same agreed outcomes
    fits = {t["batch_size"]: t["fits"] for t in results[0]["trials"]}
    assert fits[smallest] is True and fits[smallest + 1] is False


@pytest.mark.slow
def test_two_ranks_return_the_smaller_ranks_ceiling(two_ranks: list[dict]) -> None:
    check_agreed(scenario(two_ranks, "caps"), ["40MiB", "20MiB"])


@pytest.mark.slow
def test_four_ranks_return_the_smallest_ranks_ceiling() -> None:
    caps = ["24MiB", "40MiB", "16MiB", "32MiB"]
    check_agreed(scenario(launch("caps", caps), "caps"), caps)


@pytest.mark.slow
def test_the_profile_and_the_pick_are_agreed(two_ranks: list[dict]) -> None:
    results = scenario(two_ranks, "profile")
    assert len({(r["ceiling"], r["batch_size"]) for r in results}) == 1, results
    # global_batch=64 over 2 ranks: 32 per rank, one step of the micro-batch the advice chose
    assert [r["global_batch_size"] for r in results] == [64, 64]


@pytest.mark.slow
def test_a_non_oom_error_on_one_rank_stops_every_rank_with_its_message(
    two_ranks: list[dict],
) -> None:
    results = scenario(two_ranks, "fail")
    assert results[1]["error"] == "WorkloadError"
    assert "rank 1 cannot take a batch" in results[1]["message"]
    assert results[0]["error"] == "RankFailedError"
    assert "rank 1 failed" in results[0]["message"]
    assert "rank 1 cannot take a batch" in results[0]["message"]


@pytest.mark.slow
def test_a_rank_that_dies_is_reported_not_waited_for() -> None:
    results = launch("fail", ["40MiB", "40MiB"], MAXBATCH_TEST_DIE="1")
    assert results[0]["fail"]["error"] == "DistributedError", results
    assert "lost the other ranks" in results[0]["fail"]["message"]
    assert results[1]["exit"] == 3


@pytest.mark.slow
def test_a_ddp_model_is_probed_as_passed_and_trains_on_afterwards(two_ranks: list[dict]) -> None:
    results = scenario(two_ranks, "ddp")
    assert [r.get("ceiling") for r in results] == [single_ceiling("20MiB")] * 2, results
    assert all(r["unchanged"] and r["synced"] for r in results)


@pytest.mark.slow
def test_an_fsdp_model_counts_the_shard_each_rank_holds(two_ranks: list[dict]) -> None:
    plain, sharded = scenario(two_ranks, "caps"), scenario(two_ranks, "fsdp")
    assert len({r["ceiling"] for r in sharded}) == 1, sharded
    # Parameters and momentum split evenly over two ranks: each holds half after the first trial.
    assert sharded[0]["trials"][0]["state_bytes"] == plain[0]["trials"][0]["state_bytes"] // 2
    assert any("FSDP" in n for n in sharded[0]["notes"])  # what is not restored, said


def test_distributed_true_without_a_group_is_a_config_error() -> None:
    model = torch.nn.Linear(4, 2)
    with pytest.raises(ConfigError, match="no torch.distributed process group"):
        find_batch_size(model, torch.randn(2, 4), memory="8MiB", distributed=True)


def test_without_a_group_the_result_is_one_rank() -> None:
    model = torch.nn.Linear(4, 2)
    result = find_batch_size(model, torch.randn(2, 4), memory="1MiB", profile=False)
    assert result.world_size == 1 and result.global_batch_size == result.batch_size


@pytest.mark.slow
def test_torchrun_probes_the_ddp_example_and_only_rank_0_speaks(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "-m",
            "maxbatch",
            "probe",
            str(ROOT / "examples" / "ddp.py"),
            "--memory",
            "64MiB",
            "--no-profile",
            "--json",
            "--report",
            str(tmp_path / "report"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=LIMIT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(out.stdout)  # one JSON document: rank 1 printed nothing
    assert data["world_size"] == 2 and data["global_batch_size"] == 2 * data["batch_size"]
    assert out.stderr.count("report written") == 1
    assert out.stderr.count("trial 1:") == 1
    assert json.loads((tmp_path / "report" / "report.json").read_text())["world_size"] == 2
    alone = subprocess.run(
        [sys.executable, "-m", "maxbatch", "probe", str(ROOT / "examples" / "ddp.py")]
        + ["--memory", "64MiB", "--no-profile", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=LIMIT,
    )
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert json.loads(alone.stdout)["ceiling"] == data["ceiling"]  # DDP's trials: the same step
    # The ranks' traces travel with the agreed trial: as few trials as alone (10 without them).
    assert len(data["trials"]) == 3
