"""Device and numeric precision: where the model runs and in which dtype it computes."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from domainlm.config import DEVICES
from domainlm.errors import UserError

# The default of --device when it is not given (the test suite sets it to cpu: tests/conftest.py).
DEVICE_ENV = "DOMAINLM_DEVICE"


def device_choice(requested: str | None = None) -> str:
    """`requested` (--device), else $DOMAINLM_DEVICE, else `auto`; one of DEVICES."""
    if requested is not None:
        choice, source = requested, "--device"
    else:
        choice, source = os.environ.get(DEVICE_ENV) or "auto", DEVICE_ENV
    if choice not in DEVICES:
        raise UserError(f"{source} must be one of {', '.join(DEVICES)}, got {choice!r}")
    return choice


def uses_cuda(requested: str | None = None) -> bool:
    """Whether the run computes on GPUs: `cuda`, or `auto` where PyTorch sees a GPU.

    `cuda` without a GPU is a UserError (a one-line message, not a CUDA traceback later).
    """
    choice = device_choice(requested)
    if choice == "cpu":
        return False
    if not torch.cuda.is_available():
        if choice == "cuda":
            raise UserError(
                "--device cuda, but PyTorch sees no GPU (torch.cuda.is_available() is False: "
                "no GPU, no driver, or a CPU-only torch build); use --device cpu"
            )
        return False
    return True


def distributed_backend(requested: str | None = None) -> str:
    """The process-group backend for a run on `requested`: NCCL on GPUs, gloo on the CPU."""
    return "nccl" if uses_cuda(requested) else "gloo"


def check_ranks_fit_gpus(local_rank: int, local_world_size: int, gpus: int) -> None:
    """Each torchrun process on a machine takes one GPU of its own: refuse more than there are.

    Without this check rank N asks for cuda:N, which does not exist, and dies with a traceback.
    """
    processes = max(local_world_size, local_rank + 1)
    if processes > gpus:
        raise UserError(
            f"torchrun started {processes} processes on this machine but it has {gpus} "
            f"GPU{'' if gpus == 1 else 's'}: use --nproc_per_node={gpus}, or --device cpu"
        )


def check_local_ranks(local_rank: int) -> None:
    """check_ranks_fit_gpus for this torchrun process (LOCAL_WORLD_SIZE: processes per machine)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
    check_ranks_fit_gpus(local_rank, local_world, torch.cuda.device_count())


def pick_device(local_rank: int | None = None, requested: str | None = None) -> torch.device:
    """The device of this process for `requested` (--device; None: $DOMAINLM_DEVICE or auto).

    auto: this rank's GPU when PyTorch sees one, else the CPU; cpu: the CPU, even on a GPU
    machine; cuda: this rank's GPU, a UserError without one. `local_rank` is given under torchrun
    (each local rank takes the GPU of its number; more local ranks than GPUs is a UserError).
    """
    if not uses_cuda(requested):
        return torch.device("cpu")
    if local_rank is None:
        index = torch.cuda.current_device()
    else:
        check_local_ranks(local_rank)
        index = local_rank
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 where the hardware has it (recent GPUs, CPUs with AVX512-BF16/AMX), else fp16 on
    older GPUs, else fp32. An explicit request the device cannot honour is an error."""
    if device.type == "cuda":
        bf16_ok = gpu_has_native_bf16(device)
        if precision == "auto":
            return "bf16" if bf16_ok else "fp16"
        if precision == "bf16" and not bf16_ok:
            major, minor = torch.cuda.get_device_capability(device)
            raise UserError(
                f"--precision bf16: this GPU (compute capability {major}.{minor}) has no native "
                "bf16 (PyTorch would emulate it, slowly); use --precision fp16 or fp32"
            )
        return precision
    if precision == "fp16":
        raise UserError("fp16 needs a GPU; on the CPU use --precision bf16 or fp32")
    if precision == "auto":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return precision


def gpu_has_native_bf16(device: torch.device) -> bool:
    """bf16 in hardware: NVIDIA compute capability 8.0 (Ampere) or newer, or a ROCm GPU.

    Not `torch.cuda.is_bf16_supported()`: by default it also counts bf16 emulated on older GPUs
    (a T4, a V100), which trains far slower than their native fp16."""
    if torch.version.hip:
        return True  # as torch.cuda.is_bf16_supported says for every ROCm GPU
    return torch.cuda.get_device_capability(device) >= (8, 0)


def cpu_has_fast_bf16() -> bool:
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX512", "AMX"):
        return False
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def peak_gpu_memory_gib(device: torch.device) -> float | None:
    """The peak of live tensor memory on this GPU so far (`max_memory_allocated`, what the memory
    plan estimates), in GiB; None off a GPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Mixed precision for the forward pass; weights and optimizer state stay fp32."""
    if precision in AUTOCAST_DTYPES:
        with torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision]):
            yield
    else:
        yield


def prefer_expandable_cuda_segments() -> None:
    """Let PyTorch's CUDA allocator grow segments instead of caching many fixed-size blocks
    (`expandable_segments:True`), unless PYTORCH_CUDA_ALLOC_CONF is already set: the loss's
    chunk-sized temporaries then do not fragment GPU memory. Must run before the first CUDA
    allocation; a no-op on the CPU."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
