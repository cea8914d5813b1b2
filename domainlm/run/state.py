"""A run once set up: what the step loop and the parts at its step boundaries share.

`train.set_up` fills these in order: the checked inputs and data (RunData), the model with its
optimizer (RunModel), then the run's state and outputs (Run). Nothing here does any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from domainlm.config import TrainConfig
from domainlm.data.blocks import BlockDataset, epoch_order
from domainlm.data.tokens import TokenStream
from domainlm.model.distributed import DistContext
from domainlm.model.loading import LoadedModel
from domainlm.model.loss import CausalLMLoss
from domainlm.run.metrics import Console, MetricsLog


@dataclass
class DataCursor:
    """Position in the data: epoch and the number of blocks of its order already consumed."""

    epoch: int = 0
    offset: int = 0

    def next_global_batch(self, dataset: BlockDataset, size: int, seed: int) -> np.ndarray:
        if self.offset >= len(dataset):
            self.epoch, self.offset = self.epoch + 1, 0
        order = epoch_order(len(dataset), self.epoch, seed)
        blocks = order[self.offset : self.offset + size]
        self.offset += len(blocks)
        return blocks

    def epoch_float(self, dataset: BlockDataset) -> float:
        """Epochs done, with the current one's fraction (as metrics.jsonl logs it)."""
        return self.epoch + self.offset / len(dataset)


@dataclass
class RunData:
    """The checked inputs: the model (its config's on the meta device until `load_weights` reads
    the weights), the run's identity, the token streams, the blocks."""

    loaded: LoadedModel
    identity: dict[str, Any]  # what a resumed run must share (resume.RESUME_KEYS)
    block_size: int
    eval_stride: int
    train_stream: TokenStream
    valid_stream: TokenStream
    dataset: BlockDataset
    resume_from: Path | None  # the checkpoint to continue from
    lint_warnings: list[str] = field(default_factory=list)  # shown again in report.html


@dataclass
class RunModel:
    """The model on its device, the loss around it, its (possibly DDP/FSDP) wrapper, optimizer."""

    model: torch.nn.Module
    loss_module: CausalLMLoss
    train_module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler


@dataclass
class Run:
    """Everything the step loop needs; `start_step` and `cursor` are where a resumed run goes on."""

    config: TrainConfig
    ctx: DistContext
    device: torch.device
    precision: str
    console: Console
    output_dir: Path
    data: RunData
    net: RunModel
    cursor: DataCursor
    start_step: int
    total_steps: int
    resumed_window: dict[str, float]  # the loss window open at the checkpoint ({} if none)
    metrics: MetricsLog
    loggers: Any  # trackers.Trackers (--report-to)
    sampler: Any  # text.generate.TrainingSampler, or None
    # training tokens and seconds of the steps up to the checkpoint ({} if none): a resumed run's
    # train_tokens and train_runtime count the whole run, not only this process's part
    resumed_totals: dict[str, float] = field(default_factory=dict)
