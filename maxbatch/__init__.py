"""maxbatch: the batch size that fits and trains fastest on your device, measured."""

from maxbatch.data import DataSource
from maxbatch.errors import (
    ConfigError,
    DeviceError,
    DoesNotFitError,
    MaxbatchError,
    ModelFileError,
    WorkloadError,
)
from maxbatch.estimate import Estimate, EstimateError, estimate_batch_size
from maxbatch.finder import find_batch_size
from maxbatch.microbatch import MicroBatcher
from maxbatch.results import BatchSizeResult, MemoryModel, ProbeResult, Trial
from maxbatch.virtual import VirtualDevice, virtual_device

__all__ = [
    "BatchSizeResult",
    "ConfigError",
    "DataSource",
    "DeviceError",
    "DoesNotFitError",
    "Estimate",
    "EstimateError",
    "MaxbatchError",
    "MemoryModel",
    "MicroBatcher",
    "ModelFileError",
    "ProbeResult",
    "Trial",
    "VirtualDevice",
    "WorkloadError",
    "estimate_batch_size",
    "find_batch_size",
    "virtual_device",
]

__version__ = "0.1.0"
