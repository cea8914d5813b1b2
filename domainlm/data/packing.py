"""Document-aware packing (`--packing docs`): documents sharing a block do not see each other.

In the token stream `[EOS] d1 EOS d2 EOS ...` the input that predicts the first token of a
document is the EOS before it, so in input coordinates document i is the segment
`[doc_starts[i] - 1, doc_starts[i + 1] - 1)`: its leading EOS, then its own tokens. With a BOS
prefix (`BOS d1 EOS BOS d2 EOS ...`) a document's segment starts at its BOS:
`[doc_starts[i], doc_starts[i + 1])`, whose last input (the EOS) predicts the next BOS, which is
never a target. Under `docs` the position ids restart at 0 at every segment start (and at the
start of each block, where a document cut by the previous block goes on), so each segment is
scored exactly as the document would be scored alone: `[EOS] d` (or `BOS d`) predicting `d EOS`.

How the block-diagonal mask reaches attention: transformers 5 (`masking_utils.
find_packed_sequence_indices`) reads packed sequences from position ids that restart, when no
attention mask is given and no cache is used, and builds the block-diagonal causal mask for the
model's attention implementation itself (sdpa, eager, flex; flash-attention uses variable-length
kernels from the same position ids). A hand-made 4D boolean mask would be right for sdpa only:
eager attention *adds* the mask to its scores, so a boolean mask silently changes the result.
So no attention mask is made here, and `check_packing_support` proves once per run that
the loaded model really isolates documents (a model with its own masking code may not).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from domainlm.errors import UserError

PACKING_TOLERANCE = 1e-4


def segment_positions(
    doc_starts: np.ndarray, start: int, length: int, prefix_length: int = 0
) -> np.ndarray:
    """Position ids of stream inputs [start, start+length): 0 at each document's leading EOS
    (at its first prefix token, its BOS, when documents have a prefix)."""
    positions = np.arange(length, dtype=np.int64)
    # Input index where each document's segment starts, relative to the block.
    lead = 0 if prefix_length else 1
    boundaries = np.asarray(doc_starts, dtype=np.int64)[:-1] - lead - start
    boundaries = boundaries[(boundaries > 0) & (boundaries < length)]
    segment_start = np.zeros(length, dtype=np.int64)
    segment_start[boundaries] = boundaries
    np.maximum.accumulate(segment_start, out=segment_start)
    return positions - segment_start


def document_positions(
    input_ids: torch.Tensor, stream: Any, indices: Sequence[int], block_size: int
) -> torch.Tensor:
    """Position ids (b, T) for blocks `indices` of `stream` under `docs` packing.

    No attention mask on purpose: restarting position ids are how transformers 5 builds the
    block-diagonal causal mask for every attention implementation (see the module docstring).
    An index of -1 (an empty, fully masked block) gets plain positions.
    """
    b, t = input_ids.shape
    positions = np.tile(np.arange(t, dtype=np.int64), (b, 1))
    for row, index in enumerate(indices):
        if index >= 0:
            positions[row] = segment_positions(
                stream.doc_starts, int(index) * block_size, t, stream.prefix_length
            )
    return torch.from_numpy(positions)


def check_packing_support(model: torch.nn.Module, device: torch.device | None = None) -> None:
    """Refuse `--packing docs` for a model whose attention ignores restarting position ids.

    Scores two short made-up documents packed in one row and each alone; their logits must agree.
    """
    device = device or next(model.parameters()).device
    vocab = int(model.get_input_embeddings().weight.shape[0])
    first = torch.tensor([[1, 2, 3, 4]], device=device) % vocab
    second = torch.tensor([[5, 6, 7]], device=device) % vocab
    packed = torch.cat([first, second], dim=1)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2]], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = model(input_ids=second, use_cache=False).logits.float()
            together = model(input_ids=packed, position_ids=positions, use_cache=False).logits
    finally:
        model.train(was_training)
    gap = float((together[:, 4:].float() - alone).abs().max())
    if not gap <= PACKING_TOLERANCE * max(1.0, float(alone.abs().max())):
        raise UserError(
            f"--packing docs: this model's attention does not separate packed documents "
            f"(logits differ by {gap:.3g}); use --packing concat"
        )
