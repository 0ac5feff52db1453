"""maxbatch: the batch size that fits and trains fastest on your device, measured."""

# First, before torch: in the maxbatch command, Ctrl-C and SIGTERM are one line from the start.
from maxbatch import earlysignals  # noqa: F401 - installs its handlers on import (command only)
from maxbatch.advise import Advice, advice_for
from maxbatch.buckets import Bucket, BucketProfile, LengthMemoryModel, LengthResult, LengthTrial
from maxbatch.data import DataSource
from maxbatch.errors import (
    BatchSizeMismatchError,
    ConfigError,
    DeviceError,
    DistributedError,
    DoesNotFitError,
    HostMemoryError,
    LeakError,
    MaxbatchError,
    ModelFileError,
    RankFailedError,
    WorkloadError,
)
from maxbatch.estimate import Estimate, EstimateError, estimate_batch_size
from maxbatch.finder import find_batch_size
from maxbatch.isolate import probe_file
from maxbatch.lengths import find_bucket_sizes, find_max_length
from maxbatch.microbatch import MicroBatcher
from maxbatch.noise import noise_scale
from maxbatch.noisestats import NoiseScale
from maxbatch.results import BatchSizeResult, MemoryModel, Trial
from maxbatch.sampler import BucketBatchSampler
from maxbatch.schedule import SchedulePhase, batch_schedule
from maxbatch.tracker import NoiseScaleTracker
from maxbatch.virtual import VirtualDevice, virtual_device

__all__ = [
    "Advice",
    "BatchSizeMismatchError",
    "BatchSizeResult",
    "Bucket",
    "BucketBatchSampler",
    "BucketProfile",
    "ConfigError",
    "DataSource",
    "DeviceError",
    "DistributedError",
    "DoesNotFitError",
    "Estimate",
    "EstimateError",
    "HostMemoryError",
    "LeakError",
    "LengthMemoryModel",
    "LengthResult",
    "LengthTrial",
    "MaxbatchError",
    "MemoryModel",
    "MicroBatcher",
    "ModelFileError",
    "NoiseScale",
    "NoiseScaleTracker",
    "RankFailedError",
    "SchedulePhase",
    "Trial",
    "VirtualDevice",
    "WorkloadError",
    "advice_for",
    "batch_schedule",
    "estimate_batch_size",
    "find_batch_size",
    "find_bucket_sizes",
    "find_max_length",
    "noise_scale",
    "probe_file",
    "virtual_device",
]

__version__ = "0.1.0"
