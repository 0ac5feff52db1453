"""The gradient noise scale: up to which batch size more samples per step still pay.

A classifier on a fixed synthetic data set of 4096 samples. ``make_batch`` draws random samples
from it (the noise scale needs random batches), and ``loss`` is a mean over the batch (it must
be). As a model file::

    maxbatch probe examples/noise_scale.py --memory 200MiB --noise-scale --max-batch 1024

As a script, it measures the noise scale, trains with gradient accumulation while a
``NoiseScaleTracker`` follows it (it grows as the loss falls), and turns a step-decay learning
rate into a batch-size ramp::

    python examples/noise_scale.py
"""

import torch
import torch.nn.functional as F
from torch import nn

import maxbatch

torch.manual_seed(0)

SAMPLES, FEATURES, CLASSES = 4096, 32, 10
_x = torch.randn(SAMPLES, FEATURES)
_y = (_x[:, :CLASSES] + 0.5 * torch.randn(SAMPLES, CLASSES)).argmax(1)

model = nn.Sequential(nn.Linear(FEATURES, 128), nn.ReLU(), nn.Linear(128, CLASSES))


def make_batch(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.randint(SAMPLES, (batch_size,))
    return _x[index], _y[index]


def forward(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return model(batch[0])


def loss(output: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(output, batch[1])  # a mean over the batch


def main(steps: int = 200, micro: int = 32, accumulation: int = 4) -> None:
    ns = maxbatch.noise_scale(model, make_batch, loss_fn=loss, forward_fn=forward, batches=20)
    print(f"at initialisation: B_simple = {ns.b_simple:.0f} ± {ns.std_error:.0f}")

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with maxbatch.NoiseScaleTracker(model) as tracker:
        for step in range(1, steps + 1):
            for _ in range(accumulation):
                batch = make_batch(micro)
                (loss(forward(model, batch), batch) / accumulation).backward()
                tracker.micro_batch(micro, 1 / accumulation)
            tracker.step()  # after the last backward, before the optimizer and zero_grad
            optimizer.step()
            optimizer.zero_grad()
            if step % 50 == 0:
                now = tracker.estimate()
                assert now is not None
                print(f"step {step}: tracked B_simple = {now.b_simple:.0f}")

    ns = maxbatch.noise_scale(model, make_batch, loss_fn=loss, forward_fn=forward, batches=20)
    print(f"after {steps} steps: B_simple = {ns.b_simple:.0f} ± {ns.std_error:.0f}")

    # A step decay tuned at batch 128, as a batch ramp on a device that fits 512 per step.
    lr_schedule = [(0, 0.1), (30, 0.01), (60, 0.001)]
    for phase in maxbatch.batch_schedule(lr_schedule, base_batch=128, ceiling=512):
        print(
            f"epoch {phase.at}: {phase.accumulation} x {phase.micro_batch} = "
            f"{phase.global_batch} samples per step, lr {phase.lr:g}"
        )


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
