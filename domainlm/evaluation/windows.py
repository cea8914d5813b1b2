"""The one perplexity function, used by `domainlm perplexity` and by validation during training.

Definition (docs/perplexity.md): over a token stream whose positions first..end-1 are predicted,
window j predicts the next S (stride) tokens not yet predicted, positions [a, b) with
a = first + j*S, from the up to L - S tokens before them as context. Positions that are context
only (`unscored`: the BOS before each document, for tokenizers that put one there) are never
scored. Every predicted token is scored exactly once; perplexity = exp(sum NLL / N), with the
NLL summed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from domainlm.data.blocks import IGNORE_INDEX
from domainlm.errors import UserError
from domainlm.model.device import autocast
from domainlm.model.distributed import SINGLE, DistContext


@dataclass(frozen=True)
class Window:
    """Input tokens [context_start, target_end - 1) predicting positions [target_start, target_end)."""

    context_start: int
    target_start: int
    target_end: int


def make_windows(stream_length: int, block_size: int, stride: int, first: int = 1) -> list[Window]:
    """The windows that predict positions first..stream_length-1, each exactly once."""
    check_window(block_size, stride)
    context = block_size - stride
    return [
        Window(max(0, a - context), a, min(a + stride, stream_length))
        for a in range(first, stream_length, stride)
    ]


def check_window(block_size: int, stride: int, stride_flag: str = "--stride") -> None:
    """Refuse a window that cannot be scored; `stride_flag` is the command's flag for the
    stride (perplexity's --stride, train's --eval-stride)."""
    if block_size < 2:
        raise UserError(f"--block-size must be at least 2, got {block_size}")
    if not 1 <= stride <= block_size - 1:
        raise UserError(
            f"{stride_flag} must be between 1 and block size - 1 = {block_size - 1}, got {stride}"
        )


@dataclass
class NLLSum:
    """Summed negative log-likelihood (nats) over `tokens` predicted tokens."""

    nll_sum: float
    tokens: int

    @property
    def nll(self) -> float:
        return self.nll_sum / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll) if self.tokens else float("nan")


def unscored_in(window: Window, unscored: np.ndarray | None) -> np.ndarray:
    """The context-only positions (BOS) among a window's targets, ascending."""
    if unscored is None or not len(unscored):
        return np.zeros(0, dtype=np.int64)
    lo, hi = np.searchsorted(unscored, [window.target_start, window.target_end])
    return np.asarray(unscored[lo:hi], dtype=np.int64)


def scored_count(window: Window, unscored: np.ndarray | None) -> int:
    """Tokens a window predicts: its target positions less the context-only ones."""
    return window.target_end - window.target_start - len(unscored_in(window, unscored))


def window_batches(
    tokens: np.ndarray,
    windows: list[Window],
    batch_size: int,
    unscored: np.ndarray | None = None,
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(window indices, input_ids, targets) per batch, right-padded, context targets masked
    (and the `unscored` positions: sorted stream positions that are context only).

    A window feeds all its tokens `[context_start, target_end)`, as `model(ids, labels=ids)` does
    (the last one predicts nothing). Feeding one token less gives the same numbers in exact
    arithmetic, but a float32 forward pass rounds differently at another sequence length
    (~1e-6 relative), and the plain convention is to reproduce that call.
    """
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        width = max(w.target_end - w.context_start for w in chunk)
        inputs = np.zeros((len(chunk), width), dtype=np.int64)
        targets = np.full((len(chunk), width), IGNORE_INDEX, dtype=np.int64)
        for row, w in enumerate(chunk):
            n = w.target_end - 1 - w.context_start  # input positions that predict a token
            inputs[row, : n + 1] = tokens[w.context_start : w.target_end]
            scored = w.target_end - w.target_start
            targets[row, n - scored : n] = tokens[w.target_start : w.target_end]
            targets[row, n - scored + (unscored_in(w, unscored) - w.target_start)] = IGNORE_INDEX
        yield (
            list(range(start, start + len(chunk))),
            torch.from_numpy(inputs),
            torch.from_numpy(targets),
        )


@torch.no_grad()
def score_windows(
    loss_module: torch.nn.Module,
    tokens: np.ndarray,
    windows: list[Window],
    *,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    ctx: DistContext = SINGLE,
    progress: bool = False,
    unscored: np.ndarray | None = None,
) -> np.ndarray:
    """NLL sum (float64) of each window this rank scores; batches are dealt round-robin to ranks.

    The windows are cut into batches of `batch_size` in order, as one process cuts them, and rank
    r scores batches r, r + world_size, ...: every window is computed in the same batch (same
    rows, same padded width) whatever the number of processes, so its float32 result, and with
    `all_window_sums` every figure built from them, is the single process's to the bit (a
    window's logits move by float32 rounding with the batch around it: dealing single windows
    moved a perplexity by 6e-10). Every rank runs the same number of batches (a one-window
    batch pads the short ones), so sharded models (FSDP) stay in step. Entries of windows other
    ranks score stay 0.
    """
    sums = np.zeros(len(windows), dtype=np.float64)
    starts = list(range(0, len(windows), batch_size))
    mine = starts[ctx.rank :: ctx.world_size]
    per_rank = -(-len(starts) // ctx.world_size)
    batches = [list(range(a, min(a + batch_size, len(windows)))) for a in mine]
    batches += [[]] * (per_rank - len(batches))  # scored, and thrown away
    was_training = loss_module.training
    loss_module.eval()
    bar = _progress(progress, sum(map(len, batches)), "scoring")
    try:
        # One autocast region for the whole evaluation: the weights do not change, so each is
        # cast to the compute dtype once (autocast's cache), not once per batch.
        with autocast(device, precision):
            for batch in batches:
                chunk = [windows[i] for i in batch] or [Window(0, 1, 1)]
                ((_, inputs, targets),) = window_batches(tokens, chunk, batch_size, unscored)
                values = loss_module(inputs.to(device), targets.to(device)).double().cpu().numpy()
                sums[batch] = values[: len(batch)]
                if bar is not None:
                    bar.update(len(batch))
    finally:
        loss_module.train(was_training)
        if bar is not None:
            bar.close()
    return sums


def all_window_sums(sums: np.ndarray, ctx: DistContext, device: torch.device) -> np.ndarray:
    """Every window's NLL sum on every rank, from `score_windows`' per-rank arrays.

    Each rank filled in only its own windows (the rest are 0), so a float64 sum over ranks is
    exact: per-window results (per-line scores) do not depend on the number of processes.
    Summed afterwards in one order (`stream_nll`), neither does their total.
    """
    if not ctx.enabled:
        return sums
    import torch.distributed as dist

    tensor = torch.from_numpy(np.ascontiguousarray(sums, dtype=np.float64)).to(device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().numpy()


def _progress(enabled: bool, total: int, desc: str):  # type: ignore[no-untyped-def]
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="win", dynamic_ncols=True, leave=False)


def stream_nll(
    loss_module: torch.nn.Module,
    tokens: np.ndarray,
    *,
    block_size: int,
    stride: int,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    first: int = 1,
    ctx: DistContext = SINGLE,
    progress: bool = False,
    max_tokens: int | None = None,
    unscored: np.ndarray | None = None,
) -> NLLSum:
    """Summed NLL of a token stream under the window definition, reduced over ranks exactly.

    `unscored`: sorted positions that are context only (`TokenStream.unscored_positions()`).
    """
    windows = make_windows(len(tokens), block_size, stride, first)
    if max_tokens is not None:
        windows = _limit(windows, max_tokens, unscored)
    sums = score_windows(
        loss_module,
        tokens,
        windows,
        batch_size=batch_size,
        device=device,
        precision=precision,
        ctx=ctx,
        progress=progress,
        unscored=unscored,
    )
    predicted = sum(scored_count(w, unscored) for w in windows)
    # every window's sum on every rank, then added in one order: the single process's total
    return NLLSum(float(all_window_sums(sums, ctx, device).sum()), predicted)


def _limit(
    windows: list[Window], max_tokens: int, unscored: np.ndarray | None = None
) -> list[Window]:
    kept, count = [], 0
    for w in windows:
        if count >= max_tokens:
            break
        kept.append(w)
        count += scored_count(w, unscored)
    return kept
