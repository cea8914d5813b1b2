"""--load-best-model-at-end: the model folder is the best checkpoint's, not the last step's.

The best checkpoint is the one with the lowest validation perplexity (the one rotation keeps:
checkpoint.best_checkpoint). At the end of the run, after the last step's own evaluation is
logged, rank 0 reads that checkpoint's trained weights (the whole model, or a LoRA run's
adapters) into the model, every other rank receives them by broadcast (a checkpoint on rank 0's
disk alone is enough, as on several machines without a shared file system), and the whole
validation set is scored on them: that is the run's result. Sharded checkpoints are read by
every rank, each its own part, as a resume reads them; under FSDP a full checkpoint read by
rank 0 is scattered to the ranks' shards.
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
    checkpoints = list_checkpoints(run.output_dir) if run.ctx.is_main else []
    best = best_checkpoint(checkpoints, run.metrics.validation) if run.ctx.is_main else None
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
        scored = run.ctx.is_main and best_checkpoint(list_checkpoints(run.output_dir))
        why = (
            "was scored on this validation data (the run's were scored on other data)"
            if scored
            else "has a validation perplexity (removed by hand?)"
        )
        run.console.warn(
            f"--load-best-model-at-end: no checkpoint in {run.output_dir} {why}: the model "
            "saved is the last step's"
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
    """The checkpoint's trained parameters into the model. A sharded checkpoint: every rank
    reads its own part (DCP reshards, as on resume). A full one: rank 0 reads it and the other
    ranks receive it (under FSDP each rank keeps its shard of the broadcast). Full fine-tuning:
    every weight; LoRA: the adapters (the frozen base is the same everywhere)."""
    from domainlm.model.distributed import is_sharded
    from domainlm.run.sharded import is_sharded_checkpoint, load_sharded_model

    model = run.net.model
    if is_sharded_checkpoint(checkpoint):
        load_sharded_model(checkpoint, model)
    elif is_sharded(model):  # FSDP, full checkpoints: rank 0's whole state, scattered
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )

        whole = read_model_folder(run, checkpoint, model).state_dict() if run.ctx.is_main else {}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, whole, options=options)
    else:
        if run.ctx.is_main:
            if run.config.lora:
                from domainlm.model.lora import load_adapter_weights

                load_adapter_weights(model, checkpoint)
            else:
                model.load_state_dict(read_model_folder(run, checkpoint, model).state_dict())
        if run.ctx.enabled:
            with torch.no_grad():
                for parameter in model.parameters():
                    if parameter.requires_grad:
                        torch.distributed.broadcast(parameter.data, src=0)


def read_model_folder(run: Run, folder: Path, like: torch.nn.Module) -> torch.nn.Module:
    """A full checkpoint's model, read as `from_pretrained` reads it, in `like`'s dtype."""
    from domainlm.model.loading import load_model

    return load_model(
        str(folder),
        eos_token=run.config.eos_token,
        trust_remote_code=run.config.trust_remote_code,
        dtype=next(like.parameters()).dtype,
    ).model
