"""Three real gloo ranks iterate BucketBatchSampler with an all-reduce per batch, as DDP does.

An uneven count of batches would leave a rank waiting in the all-reduce (here: the group's
timeout ends it with an error instead of a hang). Each rank takes ``num_replicas`` and ``rank``
from the process group.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RANK = """
import datetime, json, random
import torch, torch.distributed as dist
import maxbatch
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
rng = random.Random(0)
lengths = [min(512, int(8 * rng.paretovariate(1.1))) for _ in range(997)]
profile = maxbatch.BucketProfile(buckets=tuple(
    maxbatch.Bucket(max_length=u, ceiling=c) for u, c in ((32, 40), (128, 9), (512, 2))))
for drop_last in (False, True):
    sampler = maxbatch.BucketBatchSampler(lengths, profile, seed=7, drop_last=drop_last)
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = []
        for batch in sampler:
            t = torch.tensor([float(len(batch))])
            dist.all_reduce(t)  # what DDP's backward does once per batch
            batches.append(batch)
        epochs.append(batches)
    print(json.dumps({"rank": dist.get_rank(), "len": len(sampler), "drop_last": drop_last,
                      "ranks": sampler.num_replicas, "epochs": epochs}))
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(world: int) -> list[list[dict]]:
    """Run the ranks; per rank, its JSON rows (drop_last False, then True)."""
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK],
            env={
                **os.environ,
                "RANK": str(rank),
                "WORLD_SIZE": str(world),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "PYTHONPATH": str(ROOT),
                "OMP_NUM_THREADS": "1",
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err[-2000:]
            outputs.append([json.loads(line) for line in out.strip().splitlines()])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outputs


@pytest.mark.slow
def test_three_ranks_get_the_same_number_of_batches_and_every_item() -> None:
    world = 3
    outputs = launch(world)
    # outputs[rank][k]: configuration k (drop_last False, then True) on that rank.
    for rows, drop_last in zip(zip(*outputs, strict=True), (False, True), strict=True):
        check(list(rows), world, drop_last)


def check(rows: list[dict], world: int, drop_last: bool) -> None:
    assert [r["drop_last"] for r in rows] == [drop_last] * world
    assert [r["ranks"] for r in rows] == [world] * world
    assert len({r["len"] for r in rows}) == 1
    for epoch in range(2):
        per_rank = [r["epochs"][epoch] for r in rows]
        assert {len(b) for b in per_rank} == {rows[0]["len"]}
        items = [i for batches in per_rank for b in batches for i in b]
        if drop_last:
            assert len(items) == len(set(items))
        else:
            assert set(items) == set(range(997))
    assert rows[0]["epochs"][0] != rows[0]["epochs"][1]
