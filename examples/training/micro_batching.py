"""A global batch larger than the device holds: ``maxbatch.MicroBatcher`` splits it, and survives.

The probe says how many samples fit at once on a 256 KiB virtual device; the training loop wants
batches of 256. ``MicroBatcher`` steps the optimizer once per batch of 256, in micro-batches it
lowers when one runs out of memory (here: the first step, asked to try 128 at once), and the
updates are those of the whole batch.

Run it with::

    python examples/training/micro_batching.py
"""

import torch
from torch import nn

import maxbatch

GLOBAL_BATCH = 256


def main() -> dict[str, object]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(GLOBAL_BATCH, 32), torch.randn(GLOBAL_BATCH, 1)

    def loss_fn(output: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.mse_loss(output, batch[1])  # a mean over the samples

    def forward_fn(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return m(batch[0])

    step = {"optimizer": opt, "loss_fn": loss_fn, "forward_fn": forward_fn}
    result = maxbatch.find_batch_size(model, (x, y), memory="256KiB", profile=False, **step)
    print(f"{result.ceiling} samples fit at once; the loop wants {GLOBAL_BATCH}")

    changes = []
    mb = maxbatch.MicroBatcher.from_result(
        result,
        model,
        opt,
        micro_batch_size=128,
        loss_fn=loss_fn,
        forward_fn=forward_fn,
        on_change=lambda old, new, why: changes.append((old, new, why)),
    )
    with maxbatch.virtual_device("256KiB") as dev:
        dev.track(model, x, y)
        losses = [float(mb.step((x, y))) for _ in range(5)]
    print(f"micro-batch size changes: {changes}; losses {[round(v, 4) for v in losses]}")
    return {
        "ceiling": result.ceiling,
        "changes": changes,
        "losses": losses,
        "micro_batch_size": mb.micro_batch_size,
    }


if __name__ == "__main__":
    main()
