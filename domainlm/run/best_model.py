"""--load-best-model-at-end: the model folder is the best checkpoint's, not the last step's.

The best checkpoint is the one with the lowest validation perplexity (the one rotation keeps:
checkpoint.best_checkpoint). At the end of the run, after the last step's own evaluation is
logged, rank 0 reads that checkpoint's trained weights (the whole model, or a LoRA run's
adapters) into the model, every other rank receives them by broadcast (a checkpoint on rank 0's
disk alone is enough, as on several machines without a shared file system), and the whole
validation set is scored on them: that is the run's result. Sharded checkpoints (FSDP) are not
read back this way; the flag is refused with them (config.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from domainlm.evaluation.windows import NLLSum
from domainlm.model.distributed import all_reduce_sum
from domainlm.run.checkpoint import CHECKPOINT_PREFIX, best_checkpoint, list_checkpoints
from domainlm.run.state import Run


@dataclass(frozen=True)
class BestModel:
    """The checkpoint whose weights the model folder holds, and its whole-set evaluation."""

    step: int
    path: Path
    result: NLLSum


def best_step(run: Run) -> int | None:
    """The step of the run's best checkpoint, decided by rank 0 for every rank (None: no
    checkpoint has a validation perplexity)."""
    best = best_checkpoint(list_checkpoints(run.output_dir)) if run.ctx.is_main else None
    mine = float(best.step) if best is not None else -1.0
    (step,) = all_reduce_sum([mine if run.ctx.is_main else 0.0], run.ctx, run.device)
    return int(step) if step >= 0 else None


def restore_best_model(
    run: Run, done: int, last: NLLSum, evaluate: Callable[[int | None], NLLSum]
) -> BestModel | None:
    """Put the best checkpoint's weights in the model and score them on the whole validation
    set (`evaluate(None)`); None when the last step is the best (its result `last` stands) or no
    checkpoint was evaluated (said in a warning)."""
    step = best_step(run)
    if step is None:
        run.console.warn(
            "--load-best-model-at-end: no checkpoint has a validation perplexity (--eval-steps "
            "and --save-steps never met): the model saved is the last step's"
        )
        return None
    if step == done:
        return None
    path = run.output_dir / f"{CHECKPOINT_PREFIX}{step}"
    load_trained_weights(run, path)
    result = evaluate(None)
    run.console.info(
        f"--load-best-model-at-end: the model saved is {path.name}'s (validation perplexity "
        f"{result.perplexity:.3f}; the last step's was {last.perplexity:.3f})"
    )
    return BestModel(step, path, result)


def load_trained_weights(run: Run, checkpoint: Path) -> None:
    """The checkpoint's trained parameters into the model: read by rank 0, broadcast to the
    others. Full fine-tuning: every weight of the checkpoint's model folder; LoRA: the
    adapters (the frozen base is the same on every rank and in every checkpoint)."""
    model = run.net.model
    if run.ctx.is_main:
        if run.config.lora:
            from domainlm.model.lora import load_adapter_weights

            load_adapter_weights(model, checkpoint)
        else:
            from domainlm.model.loading import load_model

            saved = load_model(
                str(checkpoint),
                eos_token=run.config.eos_token,
                trust_remote_code=run.config.trust_remote_code,
                dtype=next(model.parameters()).dtype,
            ).model
            model.load_state_dict(saved.state_dict())
    if run.ctx.enabled:
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    torch.distributed.broadcast(parameter.data, src=0)
