"""torchrun environment, process group and reductions. One process is a world of size 1."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from domainlm.errors import TrainingAborted
from domainlm.model.device import AUTOCAST_DTYPES, check_local_ranks, distributed_backend

if TYPE_CHECKING:
    from torch.distributed.fsdp import MixedPrecisionPolicy

# How long a rank waits for the others (joining, each collective) before the run stops.
DEFAULT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class DistContext:
    """Where this process stands among the processes of a run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group_of_one: bool = False  # torchrun with one process, joined anyway (FSDP on one rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """A process group is (to be) joined: collectives, barriers and wrappers apply."""
        return self.world_size > 1 or self.group_of_one


SINGLE = DistContext()


def context_from_env(group_of_one: bool = False) -> DistContext:
    """Read torchrun's (or torch.distributed.launch's) environment; one process if absent.

    torchrun with one process is a single process too, unless `group_of_one` (`--strategy fsdp`:
    FSDP's sharded path then runs on one rank, as it will on many)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and group_of_one and "RANK" in os.environ:
        return DistContext(local_rank=int(os.environ.get("LOCAL_RANK", "0")), group_of_one=True)
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


def from_rank_0(value: Any, ctx: DistContext) -> Any:
    """Rank 0's `value` (anything picklable) on every rank: what only rank 0 reads (its files
    may be on its machine alone) but every rank must decide alike by."""
    if not ctx.enabled:
        return value
    box = [value if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def from_every_rank(value: Any, ctx: DistContext) -> list[Any]:
    """Every rank's `value` (anything picklable), in rank order, on every rank."""
    if not ctx.enabled:
        return [value]
    values: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(values, value)
    return values


def setup_distributed(
    timeout_s: float = DEFAULT_TIMEOUT_S, device: str | None = None, strategy: str = "auto"
) -> DistContext:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPU) when launched by it.

    `device` is --device (None: $DOMAINLM_DEVICE or auto): `cpu` joins over gloo even where
    PyTorch sees a GPU. With GPUs, more processes on this machine than GPUs is a UserError,
    raised before joining, so that every rank stops with the same line instead of waiting.

    `timeout_s` bounds every wait on other ranks (joining, collectives, barriers): a rank that
    died or hangs ends the run with an error after at most that long instead of a silent hang.
    """
    ctx = context_from_env(group_of_one=strategy == "fsdp")
    if ctx.enabled and not dist.is_initialized():
        backend = distributed_backend(device)
        if backend == "nccl":
            check_local_ranks(ctx.local_rank)
        try:
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as exc:
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise TrainingAborted(
                f"rank {ctx.rank} of {ctx.world_size} could not join the other ranks at {where} "
                f"within {timeout_s:.0f} s: {first_line(exc)}"
            ) from exc
    return ctx


def rank_lost(exc: BaseException, ctx: DistContext) -> TrainingAborted | None:
    """The error to stop with when `exc` is a failed wait on other ranks, else None.

    A collective fails when another rank died (its connection closes) or did not answer within
    the timeout; this rank then stops too, and torchrun stops the remaining ones.
    """
    if not ctx.enabled or not isinstance(exc, (RuntimeError, dist.DistError)):
        return None
    text = str(exc)
    markers = ("Connection closed", "Connection reset", "Timed out", "timed out", "Broken pipe")
    if not isinstance(exc, dist.DistError) and not any(m in text for m in markers):
        return None
    return TrainingAborted(
        f"rank {ctx.rank} of {ctx.world_size} lost contact with the other ranks (one died, or did "
        f"not answer in time): {first_line(exc)}"
    )


def first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def teardown_distributed(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def wrap_model(
    module: torch.nn.Module,
    ctx: DistContext,
    device: torch.device,
    strategy: str,
    precision: str = "fp32",
) -> torch.nn.Module:
    """The module the training step calls: itself alone, under DDP, or sharded by FSDP.

    `auto` and `ddp` replicate the model on every rank; `fsdp` shards parameters, gradients and
    optimizer state over the ranks (each transformer block is a unit, then the rest at the root),
    for models that do not fit on one device. FSDP changes `module` in place: its parameters
    become DTensors, so build the optimizer after this call. Each unit is moved to `device` as
    it is sharded (a module still on the CPU is never whole on the GPU). Under bf16/fp16 with
    float32 weights the blocks are gathered in the half dtype (`block_mixed_precision`).
    """
    if not ctx.enabled:
        return module
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # The run's device, named: FSDP's default mesh is the machine's accelerator, which
        # would move a --device cpu run's shards to a GPU the run does not use.
        mesh = init_device_mesh(device.type, (ctx.world_size,))
        for block in transformer_blocks(module):
            policy = block_mixed_precision(block, precision)
            if policy is None:
                fully_shard(block, mesh=mesh)
                continue
            for vectors in vector_modules(block):  # its norms: units of their own, float32
                fully_shard(vectors, mesh=mesh)
            fully_shard(block, mesh=mesh, mp_policy=policy)
        # The root reshards after forward too (FSDP's default keeps it whole): after a no-grad
        # validation pass its whole parameters would otherwise stay registered in place of the
        # shards the optimizer holds, and the state dicts could not name them.
        fully_shard(module, mesh=mesh, reshard_after_forward=True)
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def block_mixed_precision(block: torch.nn.Module, precision: str) -> MixedPrecisionPolicy | None:
    """FSDP's MixedPrecisionPolicy for a transformer block of a bf16/fp16 run whose weights are
    float32 (mixed precision: float32 master weights and AdamW state, half-precision compute):
    the block's float32 matrix shards are cast to the half dtype before they are gathered, and
    their gradients are reduce-scattered and kept in float32. Without it autocast makes a half
    copy of each gathered float32 matrix, and the backward keeps every one of them whatever FSDP
    frees (13 GiB on every rank for an 8B Llama); the gathers also move twice the bytes.

    The numerics are autocast's: a matrix rounded once to the half dtype is what autocast would
    have multiplied by, and the modules holding only vectors (the norms: `vector_modules`) are
    units of their own, gathered in float32, as autocast leaves them (the CPU's layer_norm refuses
    half weights on a float32 input anyway). The block's inputs are not cast: the residual stream
    stays in float32, as under autocast. None where nothing is to be cast: a float32 run, or a
    block already in the half dtype (pure bf16)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    half = AUTOCAST_DTYPES.get(precision)
    floats = [p for p in block.parameters() if p.is_floating_point()]
    if half is None or not floats or any(p.dtype != torch.float32 for p in floats):
        return None
    return MixedPrecisionPolicy(
        param_dtype=half, reduce_dtype=torch.float32, cast_forward_inputs=False
    )


def vector_modules(block: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost submodules of `block` whose parameters are all vectors (LayerNorm, RMSNorm
    and their kind): autocast computes with them in float32. A linear map's bias belongs to the
    map, whose matrix autocast casts (and the bias with it)."""
    found: list[tuple[str, torch.nn.Module]] = []
    for name, sub in block.named_modules():
        params = list(sub.parameters())
        if sub is block or not params or any(p.dim() > 1 for p in params):
            continue
        if not any(name.startswith(outer + ".") for outer, _ in found):
            found.append((name, sub))
    return [sub for _, sub in found]


def weights_from_rank_0(ctx: DistContext) -> bool:
    """Whether rank 0 alone reads the weights: with several ranks, under FSDP and DDP, full or
    LoRA. The other ranks build the model on the meta device and receive it from rank 0 (FSDP:
    `fill_shards_from_rank_0`; DDP: its own broadcast of every parameter and buffer, frozen or
    not, when it wraps the model), so the whole model is in system RAM once, not once per rank."""
    return ctx.world_size > 1


def take_rank_0_dtypes(model: torch.nn.Module, ctx: DistContext) -> None:
    """Before `wrap_model`: each parameter and buffer of a rank's meta model in the dtype rank 0
    read it in (from_pretrained keeps some in float32: a rotary embedding's frequencies, an
    architecture's `_keep_in_fp32_modules`), so that every rank's shards and buffers match."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    dtypes = [{name: t.dtype for name, t in tensors} if ctx.is_main else None]
    dist.broadcast_object_list(dtypes, src=0)
    if not ctx.is_main:
        with torch.no_grad():
            for name, tensor in tensors:
                if tensor.dtype != dtypes[0][name]:
                    tensor.data = tensor.data.to(dtypes[0][name])


def empty_on(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A meta model given (uninitialised) memory on `device` for rank 0's weights to land in;
    parameters shared between modules (a head tied to the embedding) stay shared, which
    `to_empty` alone would split in two."""
    shared: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(param), []).append(name)
    model.to_empty(device=device)
    for first, *others in shared.values():
        param = model.get_parameter(first)
        for name in others:
            owner, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(owner), attribute, param)
    return model


def fill_shards_from_rank_0(
    model: torch.nn.Module, whole: dict[str, torch.Tensor], ctx: DistContext, device: torch.device
) -> None:
    """After `wrap_model` under FSDP: every rank's shards from rank 0's whole state dict
    (`whole`; empty on the other ranks, whose parameters are on the meta device until now,
    given memory on `device` here), and every buffer from rank 0's, the non-persistent ones
    too (a rotary embedding's frequencies), which no state dict carries."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not ctx.is_main:
        model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, whole, options=options)
    with torch.no_grad():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def transformer_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face model (its `_no_split_modules` classes), in order.

    Fallback for other models: the members of the largest ModuleList.
    """
    names: set[str] = set()
    for sub in module.modules():
        names.update(getattr(sub, "_no_split_modules", None) or [])
    blocks = [sub for sub in module.modules() if type(sub).__name__ in names]
    if blocks:
        return blocks
    lists = [sub for sub in module.modules() if isinstance(sub, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def is_sharded(model: torch.nn.Module) -> bool:
    """True when the parameters are FSDP shards (DTensors) rather than whole tensors."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_model_state_dict(
    model: torch.nn.Module, ctx: DistContext
) -> dict[str, torch.Tensor] | None:
    """The whole model's state on rank 0 (gathered from the shards; every rank must call this).

    None when the model is not sharded: then `save_pretrained` reads the module itself.
    """
    if not ctx.enabled or not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    # One name per tensor, as save_pretrained writes it itself: a tied output layer (GPT-2's
    # lm_head = wte) is saved once, under the name named_parameters() gives it first.
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in state.items() if k in names}


def full_state_dicts(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext
) -> tuple[dict[str, torch.Tensor] | None, dict]:
    """Model and optimizer state as one process would hold them (None: let save_pretrained read it).

    The optimizer state is keyed by parameter name (not position) and unsharded, on the CPU, so
    a checkpoint loads into any world size and strategy (`load_optimizer_state`). Every rank must
    call this; the non-main ranks get empty dicts.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    return full_model_state_dict(model, ctx), optim_state


def load_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict
) -> None:
    """Load a checkpoint's optimizer state, whichever world size and strategy wrote it.

    Every rank passes the whole state; FSDP keeps the shard of each tensor it owns. Call before
    the first backward pass (the optimizer's state is initialised from zero gradients).
    """
    groups = state.get("param_groups", [])
    if not any(isinstance(p, str) for g in groups for p in g.get("params", [])):
        optimizer.load_state_dict(state)  # a checkpoint keyed by parameter position
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
    )
