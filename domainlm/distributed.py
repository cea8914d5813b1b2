"""torchrun environment, process group and reductions. One process is a world of size 1."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process stands among the processes of a run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE = DistContext()


def context_from_env() -> DistContext:
    """Read torchrun's (or torch.distributed.launch's) environment; one process if absent."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    return DistContext(
        rank=int(os.environ["RANK"]),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def all_reduce_sum(values: list[float], ctx: DistContext, device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks, in float64 (exact for token counts below 2**53)."""
    if not ctx.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def setup_distributed() -> DistContext:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPU) when launched by it."""
    ctx = context_from_env()
    if ctx.enabled and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return ctx


def teardown_distributed(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def wrap_model(
    module: torch.nn.Module, ctx: DistContext, device: torch.device, strategy: str
) -> torch.nn.Module:
    """The module the training step calls: itself alone, or under DDP."""
    if not ctx.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def full_state_dicts(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext
) -> tuple[dict[str, torch.Tensor] | None, dict]:
    """Model and optimizer state as one process would hold them (None: let save_pretrained read it)."""
    return None, optimizer.state_dict()
