"""Learning-rate schedule and the run's step count: small pure functions, easy to test."""

from __future__ import annotations

import math
from typing import Any


def learning_rate(
    step: int,
    *,
    peak: float,
    warmup_steps: int,
    total_steps: int,
    kind: str,
    min_ratio: float = 0.0,
) -> float:
    """The learning rate of optimizer step `step` (0-based).

    Linear warmup over `warmup_steps` (step 0 already gets peak/(warmup+1)), then `kind`:
    constant, linear decay or cosine decay towards `min_ratio * peak`, reached at step
    `total_steps`: after the last step (`total_steps - 1`), whose rate is one decay step above
    it, as transformers' schedules (their last update's rate is above 0, not 0).
    """
    if step < warmup_steps:
        return peak * (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return peak
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    floor = peak * min_ratio
    if kind == "linear":
        return peak - (peak - floor) * progress
    if kind == "cosine":
        return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {kind!r}")


def schedule_rate(config: Any, step: int, total_steps: int) -> float:
    """The learning rate of `step` (0-based) under a run's settings (a TrainConfig: --lr,
    --warmup-steps, --scheduler, --min-lr-ratio) over `total_steps`."""
    return learning_rate(
        step,
        peak=config.lr,
        warmup_steps=config.warmup_steps,
        total_steps=total_steps,
        kind=config.scheduler,
        min_ratio=config.min_lr_ratio,
    )


def count_steps(config: Any, world_size: int, blocks: int) -> tuple[int, int]:
    """Optimizer steps per epoch of `blocks` training blocks, and in the whole run (--max-steps,
    else --epochs), at a global batch of --batch-size x --grad-accum x `world_size` blocks (an
    epoch's last step takes what is left). `train` and `inspect` count with this one function."""
    global_batch = config.batch_size * config.grad_accum * world_size
    steps_per_epoch = math.ceil(blocks / global_batch)
    return steps_per_epoch, config.max_steps or math.ceil(config.epochs * steps_per_epoch)


def steps_from_position(config: Any, world_size: int, blocks: int, epoch: int, offset: int) -> int:
    """With --epochs (no --max-steps): optimizer steps from the data position (`epoch`, `offset`
    blocks of it consumed) to the run's end, at today's global batch. The end is where a run at
    this batch from step 0 ends (count_steps), so a resume at the batch the checkpoint was written
    with keeps the run's step count; one at another batch (other ranks, --batch-size or
    --grad-accum) ends at the same epoch's end, not at the step count of this batch from step 0,
    which steps already taken at the old batch would overshoot or fall short of."""
    global_batch = config.batch_size * config.grad_accum * world_size
    steps_per_epoch, total = count_steps(config, world_size, blocks)
    end_epoch, end_steps_into_it = divmod(total, steps_per_epoch)
    if offset >= blocks:  # an epoch's end: the next one starts at its first block
        epoch, offset = epoch + 1, 0
    end_offset = end_steps_into_it * global_batch
    if (epoch, offset) >= (end_epoch, end_offset):
        return 0
    if epoch == end_epoch:
        return math.ceil((end_offset - offset) / global_batch)
    rest_of_this_epoch = math.ceil((blocks - offset) / global_batch)
    return rest_of_this_epoch + (end_epoch - epoch - 1) * steps_per_epoch + end_steps_into_it
