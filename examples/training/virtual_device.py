"""What happens on a smaller card? Train inside ``maxbatch.virtual_device`` and find out on the CPU.

The block below plays a device of 512 KiB: every tensor made inside it is counted, and an allocation
past the capacity raises a real ``torch.OutOfMemoryError``, as a GPU would. The probe run inside it
answers for that device, the training loop at its answer never runs out of memory, and the loop
at twice the answer does.

Run it with::

    python examples/training/virtual_device.py
"""

import torch
from torch import nn

import maxbatch

CAPACITY = "512KiB"


def train(model: nn.Module, opt: torch.optim.Optimizer, batch_size: int, steps: int = 3) -> None:
    for _ in range(steps):
        x = torch.randn(batch_size, 64)
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()


def main() -> dict[str, int]:
    torch.manual_seed(0)
    with maxbatch.virtual_device(CAPACITY) as dev:
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))  # counted
        opt = torch.optim.AdamW(model.parameters())
        result = maxbatch.find_batch_size(model, torch.randn(8, 64), optimizer=opt, profile=False)
        print(f"on a {CAPACITY} device the ceiling is {result.ceiling}")
        dev.reset_peak()
        train(model, opt, result.ceiling)
        print(f"training at {result.ceiling}: peak {dev.peak_bytes} of {dev.capacity_bytes} bytes")
        ok_peak = dev.peak_bytes
        try:
            train(model, opt, 2 * result.ceiling)
            doubled = "fit"
        except torch.OutOfMemoryError as e:
            doubled = "ran out of memory"
            print(f"training at {2 * result.ceiling}: {str(e).splitlines()[0][:80]}...")
    print(f"after the block: {dev.live_bytes} bytes were live, peak {dev.peak_bytes}")
    return {
        "ceiling": result.ceiling,
        "peak": ok_peak,
        "capacity": dev.capacity_bytes,
        "doubled_fits": doubled == "fit",
    }


if __name__ == "__main__":
    main()
