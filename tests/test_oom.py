from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from maxbatch.step.oom import OOM_MESSAGES, OOM_WHOLE_MESSAGES, is_oom, release_memory

REPO_ROOT = Path(__file__).resolve().parents[1]

# Full messages in the shape the real allocators and checks produce them.
REAL_MESSAGES = [
    # CUDA caching allocator, torch < 2.1 layout.
    (
        "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total capacity; "
        "76.20 GiB already allocated; 1.06 GiB free; 77.01 GiB reserved in total by PyTorch) "
        "If reserved memory is >> allocated memory try setting max_split_size_mb to avoid "
        "fragmentation.  See documentation for Memory Management and PYTORCH_CUDA_ALLOC_CONF",
        True,
    ),
    # CUDA caching allocator, current layout.
    (
        "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of "
        "79.19 GiB of which 3.56 MiB is free. Including non-PyTorch memory, this process has "
        "79.17 GiB memory in use. Of the allocated memory 78.50 GiB is allocated by PyTorch, "
        "and 157.95 MiB is reserved by PyTorch but unallocated. If reserved but unallocated "
        "memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to "
        "avoid fragmentation.  See documentation for Memory Management",
        True,
    ),
    (
        "HIP out of memory. Tried to allocate 978.00 MiB. GPU 0 has a total capacity of "
        "15.98 GiB of which 630.00 MiB is free. Of the allocated memory 0 bytes is allocated "
        "by PyTorch, and 0 bytes is reserved by PyTorch but unallocated. If reserved but "
        "unallocated memory is large try setting PYTORCH_HIP_ALLOC_CONF=expandable_segments:True",
        True,
    ),
    (
        "XPU out of memory. Tried to allocate 192.00 MiB. GPU 3 has a total capacity of "
        "31.89 GiB of which 13.22 GiB is free. Of the allocated memory 17.80 GiB is allocated "
        "by PyTorch, and 110.57 MiB is reserved by PyTorch but unallocated.",
        True,
    ),
    (
        "MPS backend out of memory (MPS allocated: 17.21 GiB, other allocations: 2.80 GiB, "
        "max allowed: 20.13 GiB). Tried to allocate 512.00 MiB on private pool. Use "
        "PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper limit for memory allocations "
        "(may cause system failure).",
        True,
    ),
    (
        "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at "
        "some other API call, so the stacktrace below might be incorrect.\nFor debugging "
        "consider passing CUDA_LAUNCH_BLOCKING=1",
        True,
    ),
    (
        "HIP error: out of memory\nCompile with `TORCH_USE_HIP_DSA` to enable device-side "
        "assertions.",
        True,
    ),
    ("CUDA driver error: out of memory", True),
    ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", True),
    ("cuDNN error: CUDNN_STATUS_ALLOC_FAILED", True),
    ("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED", True),
    ("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED", True),
    (
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
        "memory: you tried to allocate 100000000000 bytes. Error code 12 (Cannot allocate memory)",
        True,
    ),
    (
        "[enforce fail at C:\\actions-runner\\_work\\pytorch\\pytorch\\c10\\core\\impl\\"
        "alloc_cpu.cpp:72] data. DefaultCPUAllocator: not enough memory: you tried to allocate "
        "42467328000 bytes.",
        True,
    ),
    # cuFFT, CUFFT_CHECK in aten/src/ATen/native/cuda/CuFFTUtils.h.
    ("cuFFT error: CUFFT_ALLOC_FAILED", True),
    # cuSOLVER, TORCH_CUSOLVER_CHECK in aten/src/ATen/cuda/Exceptions.h.
    (
        "cusolver error: CUSOLVER_STATUS_ALLOC_FAILED, when calling "
        "`cusolverDnCreate(&handle)`. If you keep seeing this error, you may use "
        "`torch.backends.cuda.preferred_linalg_library()` to try linear algebra operators "
        "with other supported backends.",
        True,
    ),
    # oneDNN primitive creation (dnnl.hpp), whole message only: seen under RLIMIT_AS.
    ("could not create a primitive", True),
    # Failures that are not a lack of memory, some of which mention memory.
    # oneDNN refusing a configuration: the descriptor message starts with the OOM one.
    ("could not create a primitive descriptor for a convolution forward propagation", False),
    ("could not create a primitive descriptor iterator", False),
    # cuDNN refusing a configuration: not an allocation failure (see maxbatch/step/oom.py).
    (
        "CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be "
        "asynchronously reported at some other API call, so the stacktrace below might be "
        "incorrect.",
        False,
    ),
    ("mat1 and mat2 shapes cannot be multiplied (64x512 and 256x10)", False),
    (
        "The size of tensor a (32) must match the size of tensor b (16) at non-singleton "
        "dimension 1",
        False,
    ),
    ("Expected all tensors to be on the same device, but found at least two devices", False),
    (
        "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a "
        "non-contiguous input.",
        False,
    ),
    (
        "CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, opa, opb)`",
        False,
    ),
    ("CUDA error: device-side assert triggered", False),
    ("Trying to backward through the graph a second time", False),
    ("out of memory", False),
    ("memory format option is only supported by strided tensors", False),
]


@pytest.mark.parametrize(("message", "expected"), REAL_MESSAGES)
def test_runtime_error_message_table(message: str, expected: bool) -> None:
    assert is_oom(RuntimeError(message)) is expected


@pytest.mark.parametrize(("message", "expected"), REAL_MESSAGES)
def test_messages_count_only_on_runtime_errors(message: str, expected: bool) -> None:
    assert is_oom(ValueError(message)) is False
    assert is_oom(Exception(message)) is False


def test_every_table_entry_is_exercised_by_a_real_message() -> None:
    true_messages = [message for message, expected in REAL_MESSAGES if expected]
    for fragment in OOM_MESSAGES:
        assert any(fragment in message for message in true_messages), fragment
    for whole in OOM_WHOLE_MESSAGES:
        assert whole in true_messages, whole


@pytest.mark.parametrize(
    "exc",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        torch.cuda.OutOfMemoryError("any text at all"),
        MemoryError(),
        MemoryError("Unable to allocate 74.5 GiB for an array with shape (10000000000,)"),
    ],
)
def test_out_of_memory_types(exc: BaseException) -> None:
    assert is_oom(exc) is True


def test_real_out_of_memory_error_instance() -> None:
    try:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB.")
    except torch.OutOfMemoryError as caught:
        result = is_oom(caught)
    assert result is True


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("bad value"),
        KeyboardInterrupt(),
        SystemExit(1),
        TypeError("forward() missing 1 required positional argument: 'x'"),
        RuntimeError(),
        OSError(12, "Cannot allocate memory"),
    ],
)
def test_other_exceptions_are_not_oom(exc: BaseException) -> None:
    assert is_oom(exc) is False


def test_runtime_error_subclass_matches_by_message() -> None:
    class WrappedError(RuntimeError):
        pass

    assert is_oom(WrappedError("CUDA out of memory. Tried to allocate 1.00 GiB")) is True
    assert is_oom(NotImplementedError("CUDA out of memory.")) is True  # a RuntimeError too


_CHILD = textwrap.dedent(
    """
    import json, resource
    import torch
    from maxbatch.step.oom import is_oom

    def vm_size():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmSize")

    limit = vm_size() + 2**30
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    try:
        torch.empty(10**11, dtype=torch.uint8)
    except BaseException as e:
        print(json.dumps({"oom": is_oom(e), "type": type(e).__name__, "message": str(e)}))
    else:
        print(json.dumps({"oom": None, "type": None, "message": "allocation succeeded"}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux")
def test_real_cpu_out_of_memory_in_a_child_process() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["type"] == "RuntimeError", report
    assert "DefaultCPUAllocator: can't allocate memory" in report["message"], report
    assert report["oom"] is True, report


def test_release_memory_runs_on_cpu() -> None:
    release_memory()
    release_memory(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_cuda_out_of_memory() -> None:
    try:
        torch.empty(2**50, dtype=torch.uint8, device="cuda")
    except RuntimeError as caught:
        result, name = is_oom(caught), type(caught).__name__
    else:
        pytest.fail("a 1 PiB allocation succeeded")
    release_memory(torch.device("cuda"))
    assert result is True, name
