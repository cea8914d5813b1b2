"""Learning-rate schedule: a small pure function, easy to test."""

from __future__ import annotations

import math


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
    constant, linear decay or cosine decay to `min_ratio * peak` at the last step.
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
