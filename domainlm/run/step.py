"""One optimizer step: the learning rate, the next global batch, forward and backward over its
micro-batches, the bad-step guard, the update.

Gradients are scaled so that one optimizer step minimises the mean NLL over all target tokens of
the global batch (every micro-batch on every rank), never a mean of means. A new kind of step (a
GPU-specific one, an adapter's) changes this module, not the loop in train.py.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from domainlm.data.blocks import BlockDataset, micro_batch_indices
from domainlm.model.device import autocast
from domainlm.model.distributed import DistContext
from domainlm.model.faults import maybe_inject_oom_after_backward
from domainlm.run import guard
from domainlm.run.schedule import schedule_rate
from domainlm.run.state import Run


@dataclass
class StepOutcome:
    """What one optimizer step did, for the parts that act at step boundaries."""

    done: int  # steps done, 1-based (as in metrics.jsonl)
    final: bool  # the run's last step
    lr: float
    nll: torch.Tensor  # this rank's NLL sum over the step's targets (float64, on the device)
    targets: int  # target tokens of the whole global batch (all ranks)
    good: bool  # False: a NaN/Inf step, skipped (no update; its data is consumed)
    epoch: float


class TrainStep:
    """The optimizer step of a run, with the state that lives across steps: the micro-batch split
    (halved for good after an out-of-memory error), the bad-step count, the data cursor."""

    def __init__(self, run: Run, last_saved: Callable[[], Path | None]) -> None:
        """`last_saved` names the newest checkpoint, for the bad-step guard's message."""
        config = run.config
        self.config, self.cursor, self.total_steps = config, run.cursor, run.total_steps
        self.console, self.last_saved = run.console, last_saved
        self.model, self.train_module = run.net.model, run.net.train_module
        self.optimizer, self.scaler = run.net.optimizer, run.net.scaler
        self.dataset = run.data.dataset
        self.ctx, self.device, self.precision = run.ctx, run.device, run.precision
        self.global_batch = config.batch_size * config.grad_accum * run.ctx.world_size
        self.split = guard.MicroBatching(config.batch_size, config.grad_accum)  # halved on OOM
        self.bad_steps = guard.BadStepGuard(config.max_bad_steps)
        self.nan_steps = guard.injected_nan_steps()

    def __call__(self, step: int) -> StepOutcome:
        """Optimizer step `step` (0-based): set the learning rate, run the global batch, update."""
        config, done = self.config, step + 1
        lr = schedule_rate(config, step, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        blocks = self.cursor.next_global_batch(self.dataset, self.global_batch, config.seed)
        nll, targets = self.gradients(blocks, step)
        nll = guard.inject_nan(self.model, nll, done, self.nan_steps)
        good = self.update(done, nll)
        epoch = self.cursor.epoch_float(self.dataset)
        return StepOutcome(done, done == self.total_steps, lr, nll, targets, good, epoch)

    def gradients(self, blocks: np.ndarray, step: int) -> tuple[torch.Tensor, int]:
        """accumulate_gradients under the out-of-memory back-off (which keeps the smaller split)."""
        (nll, targets), self.split = guard.with_oom_backoff(
            lambda s: accumulate_gradients(
                self.train_module,
                self.dataset,
                blocks,
                s.batch_size,
                s.grad_accum,
                self.ctx,
                self.device,
                self.precision,
                self.scaler,
                seed=self.config.seed,
                step=step,
                fixed_rows=self.config.compile,
                sharded=self.config.strategy == "fsdp",
            ),
            self.split,
            reset=lambda: self.optimizer.zero_grad(set_to_none=True),
            report=self.console.warn,
        )
        return nll, targets

    def update(self, done: int, nll: torch.Tensor) -> bool:
        """Clip, check, step: True if the update was made, False for a skipped NaN/Inf step."""
        scaler, optimizer = self.scaler, self.optimizer
        scaler.unscale_(optimizer)  # a no-op without fp16
        if self.config.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), self.config.max_grad_norm
            )
        else:
            norm = guard.grad_norm(list(self.model.parameters()))
        # fp16's scaler skips inf gradients by itself (that is how it finds its scale).
        checked_norm = 0.0 if scaler.is_enabled() else float(norm)
        good = self.bad_steps.check(done, float(nll), checked_norm, self.last_saved())
        if good:
            scaler.step(optimizer)
        else:  # skipped: no update; the data of this step is consumed
            self.console.warn(
                f"step {done}: NaN/Inf loss or gradient norm, step skipped "
                f"({self.bad_steps.consecutive} in a row, {self.bad_steps.total} in all)"
            )
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return good


def accumulate_gradients(
    train_module: torch.nn.Module,
    dataset: BlockDataset,
    blocks: np.ndarray,
    batch_size: int,
    grad_accum: int,
    ctx: DistContext,
    device: torch.device,
    precision: str,
    scaler: Any,
    *,
    seed: int = 0,
    step: int = 0,
    fixed_rows: bool = False,
    sharded: bool = False,
) -> tuple[torch.Tensor, int]:
    """Forward and backward over this rank's micro-batches of one global batch (each padded to
    `batch_size` rows with empty blocks when `fixed_rows`).

    The gradient left in the parameters is that of (summed NLL / target tokens of the whole global
    batch), whatever the split into ranks and micro-batches. Dropout masks too: each micro-batch
    draws them from a seed of (seed, step, its slot in the global batch), so the same blocks get
    the same masks whichever rank or accumulation round computes them (2 ranks x 1 == 1 rank x
    2 accumulation), and a retried step (guard.with_oom_backoff) redraws them from the start.
    Returns this rank's NLL sum (a device tensor: no host sync) and the global batch's
    target-token count.

    Out of memory under torchrun: after each micro-batch's attempt the ranks agree
    (`guard.agree_on_oom`), so all raise OutOfMemoryError and back off together. The backward pass
    that all-reduces gradients (DDP's last micro-batch) therefore runs after that agreement; an
    OOM inside it stops the run with one line (`sharded`: FSDP, whose passes hold collectives).
    """
    step_targets = sum(dataset.targets_in(int(b)) for b in blocks)
    step_nll = torch.zeros((), dtype=torch.float64, device=device)

    def backward(nll: torch.Tensor, rows: int) -> None:
        # DDP/FSDP average gradients over ranks; scale so the result is sum / tokens.
        scaler.scale(nll * (ctx.world_size / step_targets)).backward()
        maybe_inject_oom_after_backward(rows)

    for micro in range(grad_accum):
        indices = micro_batch_indices(blocks, micro, ctx.rank, ctx.world_size, batch_size)
        if fixed_rows:  # a compiled model: one shape, no recompilation at an epoch's short end
            indices += [-1] * (batch_size - len(indices))
        batch = dataset.batch(indices).to(device)
        rows = batch.input_ids.shape[0]
        # the slot micro_batch_indices deals these blocks from
        torch.manual_seed(micro_batch_seed(seed, step, micro * ctx.world_size + ctx.rank))
        last = micro == grad_accum - 1
        sync = (
            nullcontext()
            if last or not hasattr(train_module, "no_sync")
            else train_module.no_sync()
        )
        deferred = last and ctx.enabled and not sharded  # DDP's gradient all-reduce: after agreeing
        failed: torch.OutOfMemoryError | None = None
        with sync:
            try:
                with autocast(device, precision):
                    row_nll = train_module(batch.input_ids, batch.targets, batch.position_ids)
                nll = row_nll.sum()
                if not deferred:
                    backward(nll, rows)
            except torch.OutOfMemoryError as exc:
                failed = exc
            guard.agree_on_oom(failed, ctx, device, sharded)
            if deferred:
                try:
                    backward(nll, rows)
                except torch.OutOfMemoryError as exc:
                    raise guard.oom_in_gradient_sync(exc, ctx) from exc
        step_nll += nll.detach().double()
    return step_nll, step_targets


def micro_batch_seed(seed: int, step: int, slot: int) -> int:
    """The RNG seed of micro-batch `slot` (its place in the global batch) of optimizer step `step`:
    a function of these three numbers only (not of the rank); a hash, so that different triples
    give unrelated seeds (no arithmetic overlap between steps and slots)."""
    state = np.random.SeedSequence([seed % 2**64, step, slot]).generate_state(2, np.uint32)
    return (int(state[0]) << 32 | int(state[1])) >> 1  # 63 bits: within torch.manual_seed's range
