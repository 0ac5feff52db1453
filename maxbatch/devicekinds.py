"""What each device kind can do: the one table maxbatch branches on, never the kind's name.

A device's kind (``torch.device("cuda:1").type`` is ``"cuda"``) is looked up here once, with
:func:`kind_of`, and the code asks the record what the kind offers: whether a probe counts live
bytes or reads the allocator's own peak counters, whether device events time a step, whether NVML
can say what other processes hold, whether there is a cache to empty. A new kind is a new row.
The torch calls behind each capability are in :mod:`maxbatch.devices.device` (and
:func:`maxbatch.step.oom.release_memory` for the caches).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol


class _HasType(Protocol):
    @property
    def type(self) -> str: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceKind:
    """What a device kind offers maxbatch.

    Attributes:
        name: the kind as torch names it (``torch.device(...).type``).
        counted: a probe without a cap counts live tensor storages (the virtual device's meter);
            False where the allocator keeps its own peak counters (CUDA) and raises its own
            out-of-memory errors.
        indexed: there may be several (``cuda:0``, ``cuda:1``): a label carries the index, and
            under torchrun each rank takes its own.
        events: device events time a step on the device itself (no host clock, no launch jitter).
        nvml: NVML can say what other processes hold on it.
        empties_cache: its allocator keeps a cache that releasing memory empties.
        own_rng: it has a random generator of its own, saved and forked with the host's.
        float64: it computes in float64 (MPS does not).
        cache_is_free: what this process's allocator already holds counts as room for a step.
        host_memory: its memory is the host's (a container's or RLIMIT_AS's limit bounds it).
        guess_first: trials are expensive enough that a fake-tensor first guess pays for itself
            (``estimate_first`` auto).
        rounding: the allocator rounds each block up to a multiple of this many bytes.
        estimate_target: the :class:`~maxbatch.settings.Target` an estimate for it counts as.
    """

    name: str
    counted: bool = True
    indexed: bool = False
    events: bool = False
    nvml: bool = False
    empties_cache: bool = False
    own_rng: bool = False
    float64: bool = True
    cache_is_free: bool = False
    host_memory: bool = False
    guess_first: bool = False
    rounding: int = 1
    estimate_target: str = "cpu"


#: The CUDA caching allocator rounds every block up to a multiple of 512 bytes.
CUDA_ROUNDING = 512

CPU = DeviceKind(name="cpu", host_memory=True)
CUDA = DeviceKind(
    name="cuda",
    counted=False,
    indexed=True,
    events=True,
    nvml=True,
    empties_cache=True,
    own_rng=True,
    cache_is_free=True,
    guess_first=True,
    rounding=CUDA_ROUNDING,
    estimate_target="cuda",
)
MPS = DeviceKind(name="mps", empties_cache=True, float64=False)
#: Not probed (no ``--device xpu``), but its cache is emptied like the others'.
XPU = DeviceKind(name="xpu", empties_cache=True)

#: Every kind maxbatch knows, by name.
KINDS: dict[str, DeviceKind] = {k.name: k for k in (CPU, CUDA, MPS, XPU)}


def kind_of(device: str | _HasType) -> DeviceKind:
    """The kind of ``device`` (a ``torch.device``, or a kind's name such as ``"cuda"``).

    A kind maxbatch does not know (``meta``, ``xpu``) can do nothing special: it is counted.

    Returns:
        The kind's record.
    """
    name = device if isinstance(device, str) else device.type
    name = name.split(":", 1)[0]
    return KINDS.get(name) or DeviceKind(name=name)
