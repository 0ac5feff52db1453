"""One rank of a gloo process group on the CPU, for tests/test_distributed.py.

Run as ``python tests/dist_worker.py SCENARIOS CAPS`` with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set: SCENARIOS (comma-separated) run one after the other in the same group, so that
the tests pay for starting the ranks once. Prints one JSON line per scenario: the result's keys
the tests check, or the error.
"""

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist

from maxbatch import MaxbatchError, find_batch_size
from maxbatch.devices.device import local_shard

torch.set_num_threads(1)


class Failing(torch.nn.Module):
    """A model whose forward fails (not for lack of memory) on one rank from a batch size on."""

    def __init__(self, inner: torch.nn.Module, rank: int, at: int):
        super().__init__()
        self.inner, self.rank, self.at = inner, rank, at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if dist.get_rank() == self.rank and x.shape[0] >= self.at:
            if os.environ.get("MAXBATCH_TEST_DIE"):
                os._exit(3)  # the rank dies without a word
            raise ValueError(f"rank {self.rank} cannot take a batch of {x.shape[0]}")
        return self.inner(x)


def main() -> None:
    caps = sys.argv[2].split(",")
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    for scenario in sys.argv[1].split(","):
        print(json.dumps({"scenario": scenario, **run(scenario, caps)}), flush=True)
    dist.destroy_process_group()


def run(scenario: str, caps: list[str]) -> dict[str, object]:
    rank = dist.get_rank()
    torch.manual_seed(0)
    model: torch.nn.Module = torch.nn.Sequential(
        torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)
    )
    if scenario == "fail":
        model = Failing(model, rank=1, at=40)
    if scenario == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    if scenario == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    before = [local_shard(p.detach()).clone() for p in model.parameters()]
    try:
        result = find_batch_size(
            model,
            torch.randn(8, 256),
            # FSDP gathers parameters inside the step: its ranks must run out of memory alike.
            memory=min(caps, key=lambda c: int(c.removesuffix("MiB")))
            if scenario == "fsdp"
            else caps[rank],
            optimizer="sgd",
            profile=scenario == "profile",
            global_batch=64 if scenario == "profile" else None,
            max_batch_size=256 if scenario == "profile" else None,
        )
    except MaxbatchError as e:
        return {"rank": rank, "error": type(e).__name__, "message": str(e)}
    after = [local_shard(p.detach()) for p in model.parameters()]
    same = all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    synced = None
    if scenario == "ddp":  # training goes on with DDP's gradient all-reduce as before
        model(torch.randn(4, 256) * (rank + 1)).sum().backward()
        grad = next(model.parameters()).grad
        assert grad is not None
        grads = [torch.empty_like(grad) for _ in range(dist.get_world_size())]
        dist.all_gather(grads, grad)
        synced = all(torch.equal(g, grads[0]) for g in grads)
    keys = ("ceiling", "batch_size", "world_size", "global_batch_size", "usable_bytes", "trials")
    keys += ("notes",)
    data = {k: result.to_dict()[k] for k in keys}
    return {"rank": rank, "unchanged": same, "synced": synced, **data}


if __name__ == "__main__":
    main()
