"""Tell a real out-of-memory error from every other failure, and give memory back after one.

:func:`is_oom` is the single predicate maxbatch uses to decide whether a failed trial means
"this batch does not fit" (try a smaller one) or "the workload is broken" (re-raise). A false
positive would hide a user's bug behind a smaller batch size, so the message table holds only
fragments that real allocators emit, never a bare "out of memory" or "memory".
"""

from __future__ import annotations

import gc

import torch

from maxbatch.devicekinds import CUDA, MPS, XPU, kind_of

__all__ = [
    "OOM_MESSAGES",
    "OOM_WHOLE_MESSAGES",
    "STEP_FAILURES",
    "failure_text",
    "is_oom",
    "release_memory",
]

# torch.OutOfMemoryError exists from torch 2.5 on and is the same class as
# torch.cuda.OutOfMemoryError, which older supported versions (>= 2.3) already have.
_OOM_TYPE: type[RuntimeError] = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

OOM_MESSAGES: tuple[str, ...] = (
    # CUDA caching allocator, c10/cuda/CUDACachingAllocator.cpp (raised as OutOfMemoryError
    # since torch 1.13; older versions and wrappers that re-raise keep only the text).
    "CUDA out of memory.",
    # ROCm: the same allocator hipified into c10/hip/HIPCachingAllocator.cpp.
    "HIP out of memory.",
    # Intel GPUs: c10/xpu/XPUCachingAllocator.cpp.
    "XPU out of memory.",
    # Apple GPUs: aten/src/ATen/mps/MPSAllocator.mm (a plain RuntimeError in older versions).
    "MPS backend out of memory",
    # cudaErrorMemoryAllocation seen by C10_CUDA_CHECK (c10/cuda/CUDAException.cpp):
    # "CUDA error: " + cudaGetErrorString(err), e.g. from cudaMalloc outside the allocator.
    "CUDA error: out of memory",
    # The same check hipified for ROCm (hipGetErrorString(hipErrorOutOfMemory)).
    "HIP error: out of memory",
    # CUDA driver API calls, AT_CUDA_DRIVER_CHECK in aten/src/ATen/cuda/Exceptions.h
    # ("CUDA driver error: " + cuGetErrorString(CUDA_ERROR_OUT_OF_MEMORY)).
    "CUDA driver error: out of memory",
    # cuBLAS workspace or handle allocation, TORCH_CUDABLAS_CHECK in
    # aten/src/ATen/cuda/Exceptions.h with _cublasGetErrorEnum (aten/src/ATen/cuda/CUDABlas.cpp).
    "CUBLAS_STATUS_ALLOC_FAILED",
    # cuDNN <= 8 status name, AT_CUDNN_CHECK in aten/src/ATen/cuda/Exceptions.h
    # ("cuDNN error: " + cudnnGetErrorString(status)).
    "CUDNN_STATUS_ALLOC_FAILED",
    # cuDNN 9 split ALLOC_FAILED into these two (cudnn_graph.h, cudnnStatus_t 4003 and 4004).
    "CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED",
    "CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED",
    # cuFFT plan or work area allocation (torch.fft on CUDA), CUFFT_CHECK in
    # aten/src/ATen/native/cuda/CuFFTUtils.h: "cuFFT error: " + _cudaGetErrorEnum(cufftResult).
    "CUFFT_ALLOC_FAILED",
    # cuSOLVER workspace or handle allocation (torch.linalg on CUDA), TORCH_CUSOLVER_CHECK in
    # aten/src/ATen/cuda/Exceptions.h: "cusolver error: " + cusolverGetErrorMessage(status).
    "CUSOLVER_STATUS_ALLOC_FAILED",
    # Not listed, on purpose: cuDNN's "CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you
    # passed in a non-contiguous input." Lightning's tuner (utilities/memory.py, is_cudnn_snafu)
    # treats it as out of memory because very large batches can trigger it, but it is cuDNN
    # refusing a configuration (a non-contiguous input, a tensor past cuDNN's 2**31-element
    # limit), not a failed allocation: taken for OOM it would turn a layout bug into a smaller
    # ceiling. It fails the probe with the message; `max_batch_size` bounds the search instead.
    # CPU allocator on Linux and macOS (posix_memalign failed), c10/core/impl/alloc_cpu.cpp.
    "DefaultCPUAllocator: can't allocate memory",
    # CPU allocator on Windows and Android (_aligned_malloc / memalign failed), same file.
    "DefaultCPUAllocator: not enough memory",
)


# Messages that count only when they are the whole message (spaces around ignored): their text
# is also the start of a message that is not about memory.
OOM_WHOLE_MESSAGES: tuple[str, ...] = (
    # oneDNN (the CPU convolution and matmul kernels): dnnl::primitive's constructor in
    # include/oneapi/dnnl/dnnl.hpp wraps dnnl_primitive_create() with this text, and ideep's
    # error keeps only the text, dropping the status. A primitive's descriptor was already
    # created, so the configuration is supported; what fails is allocating the primitive (its
    # JIT code, its scratchpad): dnnl_out_of_memory. An unsupported configuration fails earlier
    # with "could not create a primitive descriptor for ...", which must stay a real error.
    # Seen under RLIMIT_AS with examples/cnn.py (tests/test_cpu_oom.py).
    "could not create a primitive",
)


def is_oom(exc: BaseException) -> bool:
    """Return True only when ``exc`` says that an allocation failed for lack of memory.

    The type decides first: ``torch.OutOfMemoryError`` (the same class as
    ``torch.cuda.OutOfMemoryError``) and Python's own ``MemoryError`` (a host allocation that
    failed). Then, for ``RuntimeError`` and its subclasses only, the message decides: it must
    contain one of the fragments in :data:`OOM_MESSAGES`, or be one of
    :data:`OOM_WHOLE_MESSAGES`, compared case-sensitively. Anything
    else, including errors that merely mention memory (such as an illegal memory access), is
    not an out-of-memory error.

    Args:
        exc: the exception raised by a trial.

    Returns:
        Whether the exception is an out-of-memory error.
    """
    if isinstance(exc, (_OOM_TYPE, MemoryError)):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    message = str(exc)
    if message.strip() in OOM_WHOLE_MESSAGES:
        return True
    return any(fragment in message for fragment in OOM_MESSAGES)


#: What a trial catches from the step: every error, and ``SystemExit`` (a ``sys.exit()`` in the
#: step must fail the probe with a message, not end the program as if it had succeeded).
#: ``KeyboardInterrupt`` passes through: the probe restores the model and stops.
STEP_FAILURES: tuple[type[BaseException], ...] = (Exception, SystemExit)


def failure_text(exc: BaseException) -> str:
    """The failure of a step in words: the exception's type and message, and what to do."""
    if isinstance(exc, SystemExit):
        return (
            f"SystemExit({exc.code!r}): the step called sys.exit() (or raised SystemExit); "
            "a step must return, not exit"
        )
    return f"{type(exc).__name__}: {exc}"


def release_memory(device: torch.device | None = None, *, full: bool = False) -> None:
    """Collect garbage and hand cached device memory back after a failed trial.

    Call it outside the ``except`` block that caught the error, once the exception object is
    gone: its traceback keeps the failed batch's tensors alive until then.

    Args:
        device: the device the trial ran on. ``None`` cleans every accelerator that this
            process has already started; a CPU device only collects garbage.
        full: collect every generation. A trial's garbage is young, and a full collection
            costs a third of a second once torch is imported, so between trials only the two
            young generations are collected.
    """
    gc.collect() if full else gc.collect(1)
    kind = None if device is None else kind_of(torch.device(device))
    if kind is not None and not kind.empties_cache:
        return  # the CPU's allocator keeps no cache
    # torch.cuda.is_initialized() keeps a CPU-only run, or a run on another device, from
    # creating a CUDA context just to empty a cache that cannot hold anything.
    # (It has no annotations in some torch versions.)
    cuda_started = kind is None and torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
    if kind is CUDA or cuda_started:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    if kind is MPS or (kind is None and torch.backends.mps.is_available()):
        torch.mps.synchronize()
        torch.mps.empty_cache()
    # torch.xpu is missing from the oldest supported torch versions.
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and (kind is XPU or (kind is None and xpu.is_initialized())):
        xpu.synchronize(device)
        xpu.empty_cache()
