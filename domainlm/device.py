"""Device and numeric precision: where the model runs and in which dtype it computes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from domainlm.errors import UserError


def pick_device(local_rank: int | None = None) -> torch.device:
    """CUDA (this rank's GPU under torchrun) when present, else the CPU."""
    if torch.cuda.is_available():
        index = local_rank if local_rank is not None else torch.cuda.current_device()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


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


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Mixed precision for the forward pass; weights and optimizer state stay fp32."""
    if precision in AUTOCAST_DTYPES:
        with torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision]):
            yield
    else:
        yield
