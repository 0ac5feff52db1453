"""maxbatch: the batch size that fits and trains fastest on your device, measured."""

# First, before torch: in the maxbatch command, Ctrl-C and SIGTERM are one line from the start.
from maxbatch import earlysignals  # noqa: F401 - installs its handlers on import (command only)
from maxbatch._version import __version__ as __version__
from maxbatch.buckets import Bucket, BucketProfile, LengthMemoryModel, LengthResult, LengthTrial
from maxbatch.devices.virtual import VirtualDevice, virtual_device
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
from maxbatch.estimate.estimate import Estimate, EstimateError, estimate_batch_size
from maxbatch.results import BatchSizeResult, MemoryModel, Throughput, Trial
from maxbatch.run.bucketsizes import find_bucket_sizes
from maxbatch.run.finder import find_batch_size
from maxbatch.run.isolate import probe_file
from maxbatch.run.lengths import find_max_length
from maxbatch.settings import Mode, PickRule, Precision, Target
from maxbatch.stats.advise import Advice, advice_for
from maxbatch.stats.noise import noise_scale
from maxbatch.stats.noisestats import NoiseScale
from maxbatch.stats.schedule import SchedulePhase, batch_schedule
from maxbatch.step.data import DataSource
from maxbatch.train.microbatch import MicroBatcher, MicroStep
from maxbatch.train.sampler import BucketBatchSampler
from maxbatch.train.tracker import NoiseScaleTracker

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
    "MicroStep",
    "Mode",
    "ModelFileError",
    "NoiseScale",
    "NoiseScaleTracker",
    "PickRule",
    "Precision",
    "RankFailedError",
    "SchedulePhase",
    "Target",
    "Throughput",
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
