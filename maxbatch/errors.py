"""The exception types maxbatch raises; every one is a :class:`MaxbatchError`."""

from __future__ import annotations

import os


class MaxbatchError(Exception):
    """Base class of every error maxbatch raises on purpose."""


class ConfigError(MaxbatchError, ValueError):
    """An option has a value maxbatch cannot use (the message names the value and the choices)."""


class BatchSizeMismatchError(ConfigError):
    """``make_batch(b)`` returned a batch whose rows are not ``b``.

    Attributes:
        asked: the batch size asked for.
        returned: the rows of the batch returned (of the first tensor that disagrees).
    """

    def __init__(self, message: str, *, asked: int, returned: int):
        super().__init__(message)
        self.asked = asked
        self.returned = returned


class DeviceError(MaxbatchError):
    """The requested device does not exist or cannot be used."""


class DoesNotFitError(MaxbatchError):
    """Even the smallest batch size does not fit in the usable memory.

    Attributes:
        batch_size: the smallest size tried.
        needed_bytes: bytes the step needed (a lower bound when it ran out of memory).
        available_bytes: usable bytes (capacity minus headroom).
    """

    def __init__(self, message: str, *, batch_size: int, needed_bytes: int, available_bytes: int):
        super().__init__(message)
        self.batch_size = batch_size
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes


class HostMemoryError(MaxbatchError):
    """This machine cannot hold what a virtual device's capacity asks for.

    Attributes:
        capacity_bytes: the virtual device's capacity.
        host_bytes: what this process could hold for the probe, when known.
        batch_size: the batch size at which the host ran out, when it did.
    """

    def __init__(
        self,
        message: str,
        *,
        capacity_bytes: int,
        host_bytes: int | None = None,
        batch_size: int | None = None,
    ):
        super().__init__(message)
        self.capacity_bytes = capacity_bytes
        self.host_bytes = host_bytes
        self.batch_size = batch_size


class WorkloadError(MaxbatchError):
    """The model, sample, loss or optimizer failed for a reason that is not lack of memory.

    The original exception is chained as ``__cause__``.
    """

    def __init__(self, message: str, *, batch_size: int | None = None):
        super().__init__(message)
        self.batch_size = batch_size


class LeakError(MaxbatchError):
    """Steps at one batch size kept growing the live bytes: the step keeps something per call.

    A ceiling measured over a leak would shrink with every trial, so the probe stops instead.

    Attributes:
        batch_size: the size at which the growth was seen.
        bytes_per_step: the live bytes each step kept (the smallest of the steps' growths).
        graph_tensors: tensors alive between steps that still hold an autograd graph.
    """

    def __init__(
        self, message: str, *, batch_size: int, bytes_per_step: int, graph_tensors: int = 0
    ):
        super().__init__(message)
        self.batch_size = batch_size
        self.bytes_per_step = bytes_per_step
        self.graph_tensors = graph_tensors


class EstimateError(WorkloadError):
    """The step cannot run on fake tensors.

    Attributes:
        operation: the operator that needed data, or None when the model could not be copied.
        reason: why, in words, without the advice the message ends with.
    """

    def __init__(self, message: str, *, operation: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.operation = operation
        self.reason = message if reason is None else reason


class DistributedError(MaxbatchError):
    """The ranks of a ``torch.distributed`` probe lost each other or fell out of step.

    Raised when a rank died or stalled past the process group's timeout, or when ranks were
    called with different arguments.
    """


class RankFailedError(DistributedError):
    """Another rank's probe failed; this rank stopped with that rank's message.

    Attributes:
        rank: the rank that failed first.
    """

    def __init__(self, message: str, *, rank: int):
        super().__init__(message)
        self.rank = rank


class ModelFileError(MaxbatchError):
    """A ``model.py`` file is missing, broken or does not follow the conventions."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path


class ReportWriteError(MaxbatchError):
    """The report files could not be written (the answer was found and printed before).

    Attributes:
        folder: the ``--report`` folder.
        reason: the system's reason (``No space left on device``).
    """

    def __init__(self, folder: os.PathLike[str], error: OSError):
        """Say where the report was to go and why it could not be written."""
        self.folder = folder
        self.reason = error.strerror or str(error)
        super().__init__(
            f"the report could not be written to {os.fspath(folder)} ({self.reason}); "
            "nothing of it is left there, the answer above stands"
        )
