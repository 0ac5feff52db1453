"""maxbatch: the batch size that fits and trains fastest on your device, measured."""

from maxbatch.errors import (
    ConfigError,
    DeviceError,
    DoesNotFitError,
    MaxbatchError,
    ModelFileError,
    WorkloadError,
)
from maxbatch.finder import find_batch_size
from maxbatch.results import BatchSizeResult, MemoryModel, ProbeResult, Trial

__all__ = [
    "BatchSizeResult",
    "ConfigError",
    "DeviceError",
    "DoesNotFitError",
    "MaxbatchError",
    "MemoryModel",
    "ModelFileError",
    "ProbeResult",
    "Trial",
    "WorkloadError",
    "find_batch_size",
]

__version__ = "0.1.0"
