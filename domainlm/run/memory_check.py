"""Before the weights load: does the run fit in the memory free for it?

The need is the memory plan of `domainlm inspect --model M` (model/memory.py) for this run's
settings: the model's config alone, built on the meta device, so a run that cannot fit is told
before it reads gigabytes of weights (and, on the CPU, before the kernel's OOM killer ends it with
no message). On a GPU the need is the plan's tensor peak against the GPU's free memory; on the CPU
it is the plan's bound on the process's resident memory, times the processes on this machine,
against MemAvailable. Too little: a warning naming the flags that fit, or with --strict an error
before anything is loaded or written. A LoRA run whose merge at the end (a float32 copy of the
base in system RAM) will not fit is warned likewise.

The check is advice and never stops a run on its own: where the plan cannot be made from the
config (a hub model not cached offline, an architecture the meta device cannot build), or does
not apply, it says nothing and the run goes on as before. Under `--strategy fsdp` the plan is
one rank's: weights, gradients and AdamW state sharded over the run's ranks (model/memory.py's
`sharded_terms`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from domainlm.errors import UserError
from domainlm.model.distributed import DistContext, all_reduce_sum
from domainlm.model.memory import (
    GIB,
    HEADROOM,
    MemoryPlan,
    fitting_flags,
    model_config_of,
    plan_for_settings,
)

SCENARIO_LABELS = {
    "full": "full fine-tuning",
    "full+ckpt": "full fine-tuning with --gradient-checkpointing",
    "lora": "LoRA",
    "lora+ckpt": "LoRA with --gradient-checkpointing",
}


def run_plan(
    config: Any, precision: str, device: str, ranks: int = 1
) -> tuple[Any, MemoryPlan] | None:
    """The model's config and the memory plan of this run's settings (one rank's of `ranks`
    under --strategy fsdp), or None where the config alone cannot give one."""
    from domainlm.model.loading import context_length

    try:
        model_config = model_config_of(config.model, config.trust_remote_code)
        block = config.block_size or min(context_length(model_config), 1024)
        plan = plan_for_settings(
            model_config, config, batch_size=config.batch_size, block_size=block,
            precision=precision, device=device, ranks=ranks,
        )  # fmt: skip
    except Exception:  # noqa: BLE001 - advice only: the model's own load reports what is wrong
        return None
    return model_config, plan


def memory_shortfalls(
    config: Any, plan: MemoryPlan, replan: Callable[[int], MemoryPlan], processes: int = 1
) -> list[str]:
    """The messages for what will not fit: the training step, then a LoRA run's merge.

    `plan.available` is the memory free for this process: the GPU's, or on the CPU the machine's
    share of each of the `processes` on it; `replan(batch)` is the plan at a smaller micro-batch
    (the search for flags that fit)."""
    messages = []
    key = ("lora" if config.lora else "full") + ("+ckpt" if config.gradient_checkpointing else "")
    need, available = plan.scenarios[key].fit_bytes, plan.available
    if available is not None and need > HEADROOM * available:
        where = "GPU memory" if plan.device == "cuda" else "system RAM"
        shared = [f"--strategy fsdp over {plan.fsdp_ranks} ranks"] if plan.fsdp_ranks > 1 else []
        shared += [f"{processes} on this machine"] if processes > 1 else []
        per = "rank" if plan.fsdp_ranks > 1 else "process"
        each = f" per {per} ({', '.join(shared)})" if shared else ""
        messages.append(
            f"memory: this run needs about {need / GIB:.1f} GiB of {where}{each} "
            f"({SCENARIO_LABELS[key]}, micro-batch {plan.batch_size} x {plan.block_size} "
            f"tokens, {plan.precision}) and {available / GIB:.1f} GiB are free for it: it may "
            f"run out of memory; fits with: {fitting_flags(plan, replan, config.grad_accum)} "
            f"(`domainlm inspect --model {config.model}` prints the plan)"
        )
    host = plan.host_available
    if config.lora and config.merge and host is not None and plan.merge_bytes > HEADROOM * host:
        messages.append(
            f"memory: merging the adapter into the base at the end needs about "
            f"{plan.merge_bytes / GIB:.1f} GiB of system RAM (a float32 copy of the base) and "
            f"{host / GIB:.1f} GiB are free: pass --no-merge and merge later with "
            "`domainlm export RUN OUT` where that is free"
        )
    return messages


def check_run_memory(
    config: Any,
    ctx: DistContext,
    device: torch.device,
    precision: str,
    warn: Callable[[str], None],
) -> list[str]:
    """Before the weights load: warn (with --strict: raise UserError) when the run's planned
    memory exceeds what is free for it. Every rank calls this; with --strict a shortfall on any
    rank stops every rank alike. Returns the messages (empty when the run fits)."""
    found = run_plan(config, precision, device.type, ctx.world_size)
    messages: list[str] = []
    if found is not None:
        model_config, plan = found
        processes = 1
        if device.type == "cuda":  # this rank's GPU (the plan read the current one)
            plan = replace(plan, available=int(torch.cuda.mem_get_info(device)[0]))
        else:  # the ranks on this machine share its RAM
            processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
            if plan.available is not None:
                plan = replace(plan, available=plan.available // processes)
        available = plan.available

        def replan(batch: int) -> MemoryPlan:  # the same config and memory free, smaller batch
            smaller = plan_for_settings(
                model_config, config, batch_size=batch, block_size=plan.block_size,
                precision=plan.precision, device=plan.device, ranks=plan.fsdp_ranks,
            )  # fmt: skip
            return replace(smaller, available=available)

        try:
            messages = memory_shortfalls(config, plan, replan, processes)
        except Exception:  # noqa: BLE001 - advice only: never the reason a run fails
            messages = []
    (short,) = all_reduce_sum([float(bool(messages))], ctx, device)
    if short and config.strict:
        raise UserError(
            (messages[0] if messages else "memory: another rank of this run has too little")
            + " (--strict: stopped before loading the model)"
        )
    for message in messages:
        warn(message)
    return messages
