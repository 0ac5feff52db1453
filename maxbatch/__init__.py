"""maxbatch: the batch size that fits and trains fastest on your device, measured."""

from maxbatch.errors import (
    ConfigError,
    DeviceError,
    DistributedError,
    DoesNotFitError,
    MaxbatchError,
    ModelFileError,
    RankFailedError,
    WorkloadError,
)
from maxbatch.estimate import Estimate, EstimateError, estimate_batch_size
from maxbatch.finder import find_batch_size
from maxbatch.isolate import probe_file
from maxbatch.results import BatchSizeResult, MemoryModel, ProbeResult, Trial
from maxbatch.virtual import VirtualDevice, virtual_device

__all__ = [
    "BatchSizeResult",
    "ConfigError",
    "DeviceError",
    "DistributedError",
    "DoesNotFitError",
    "Estimate",
    "EstimateError",
    "MaxbatchError",
    "MemoryModel",
    "ModelFileError",
    "ProbeResult",
    "RankFailedError",
    "Trial",
    "VirtualDevice",
    "WorkloadError",
    "estimate_batch_size",
    "find_batch_size",
    "probe_file",
    "virtual_device",
]

__version__ = "0.1.0"
