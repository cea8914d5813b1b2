"""Blocks for training: the held-out split, fixed-length blocks of a token stream, their order.

Training block k reads inputs `stream[kB : kB+B]` and targets `stream[kB+1 : kB+B+1]`; no token is
dropped, and the padding of the last, partial block and the BOS positions of tokenizers that put
one before every document (context only, never a target) are masked out of the loss (IGNORE_INDEX).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from domainlm.data.corpus import bare_carriage_returns
from domainlm.data.tokens import TokenStream
from domainlm.errors import UserError

IGNORE_INDEX = -100


def split_documents(
    num_documents: int, share: float, seed: int, source: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random (not contiguous) train / held-out document indices, each sorted.

    `source`: the training input, read for the refusal of a single document only: where it
    holds old-Mac line ends (CR alone), which do not end a line, the message says so."""
    if num_documents < 2:
        hint = ""
        if source is not None and bare_carriage_returns(source):
            file = source if Path(source).is_file() else "FILE"
            hint = (
                " (it holds carriage return(s) with no line feed, old Mac line ends, which do not "
                f"end a line: convert them, e.g. tr '\\r' '\\n' < {file} > {file}.lf.txt)"
            )
        raise UserError(
            f"the training file has a single document{hint}, too few to hold some out for "
            "validation; pass --validation-file"
        )
    held = min(max(1, round(num_documents * share)), num_documents - 1)
    order = np.random.default_rng(seed).permutation(num_documents)
    return np.sort(order[held:]), np.sort(order[:held])


# ----------------------------------------------------------------------------- blocks


@dataclass
class Batch:
    """One micro-batch. `targets` uses IGNORE_INDEX where nothing is predicted (padding)."""

    input_ids: torch.Tensor  # (b, T)
    targets: torch.Tensor  # (b, T)
    # (b, T), document-aware packing only; attention reads document boundaries from it (no mask)
    position_ids: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        non_blocking = device.type == "cuda"

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Batch(move(self.input_ids), move(self.targets), move(self.position_ids))


class BlockDataset:
    """Fixed-size training blocks over a token stream, read by index (no per-step text work)."""

    def __init__(self, stream: TokenStream, block_size: int, packing: str = "concat") -> None:
        self.stream = stream
        self.block_size = block_size
        self.packing = packing
        self.num_predicted = stream.num_predicted
        # Blocks cover the target positions 1..len-1; the BOS positions among them are masked.
        self.num_positions = len(stream.tokens) - 1
        self.num_blocks = -(-self.num_positions // block_size)
        self.unscored = stream.unscored_positions()

    def __len__(self) -> int:
        return self.num_blocks

    def _inputs_in(self, index: int) -> int:
        return min(self.block_size, self.num_positions - index * self.block_size)

    def _unscored_in(self, index: int) -> np.ndarray:
        """Positions of block `index`'s targets that are context only (BOS), relative to them."""
        first = index * self.block_size + 1
        lo, hi = np.searchsorted(self.unscored, [first, first + self._inputs_in(index)])
        return self.unscored[lo:hi] - first

    def targets_in(self, index: int) -> int:
        """Number of predicted tokens in block `index` (block_size, less its BOS positions and
        the padding of the last block)."""
        return self._inputs_in(index) - len(self._unscored_in(index))

    def batch(self, indices: Sequence[int]) -> Batch:
        """Blocks `indices` as one batch; an index of -1 is an empty block (all masked)."""
        size = self.block_size
        inputs = np.zeros((len(indices), size), dtype=np.int64)
        targets = np.full((len(indices), size), IGNORE_INDEX, dtype=np.int64)
        tokens = self.stream.tokens
        for row, index in enumerate(indices):
            if index < 0:
                continue
            start = index * size
            n = self._inputs_in(index)
            inputs[row, :n] = tokens[start : start + n]
            targets[row, :n] = tokens[start + 1 : start + 1 + n]
            targets[row, self._unscored_in(index)] = IGNORE_INDEX
        batch = Batch(torch.from_numpy(inputs), torch.from_numpy(targets))
        if self.packing == "docs":
            from domainlm.data.packing import document_positions

            batch.position_ids = document_positions(batch.input_ids, self.stream, indices, size)
        return batch


def epoch_order(num_blocks: int, epoch: int, seed: int) -> np.ndarray:
    """The shuffled block order of one epoch: the same on every rank, and on resume."""
    return np.random.default_rng([seed, epoch]).permutation(num_blocks)


def micro_batch_indices(
    global_blocks: np.ndarray, micro: int, rank: int, world_size: int, batch_size: int
) -> list[int]:
    """Blocks of one micro-batch of one rank within a global batch (-1 pads an empty slot).

    The global batch (batch x accum x world) is cut in order: micro-batch m of rank r takes slot
    m * world + r. So 2 ranks with accum 1 and 1 rank with accum 2 see the same blocks per step.
    """
    slot = micro * world_size + rank
    chosen = global_blocks[slot * batch_size : (slot + 1) * batch_size].tolist()
    return chosen if chosen else [-1]
