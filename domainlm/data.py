"""Text files -> documents -> one token stream (cached on disk) -> blocks for training.

The token stream of a corpus is `[EOS] d1 EOS d2 EOS ... dn EOS`: every document is followed by
the end-of-sequence token and one EOS stands in front as the first context, so each of the
`N = sum(len(d) + 1)` tokens after it is predicted exactly once, in training as in evaluation.
Training block k reads inputs `stream[kB : kB+B]` and targets `stream[kB+1 : kB+B+1]`; no token is
dropped, and the padding of the last, partial block is masked out of the loss.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from domainlm.errors import UserError

IGNORE_INDEX = -100
TEXT_SUFFIXES = (".txt", ".jsonl", ".text")
CACHE_FORMAT_VERSION = "2"  # 2: special-token text is encoded as text
TOKENIZE_CHUNK_DOCS = 1000


# ----------------------------------------------------------------------------- reading text


def text_files(path: str | os.PathLike) -> list[Path]:
    """The files behind a --train-file/--validation-file argument: the file, or a folder's texts."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: no such file or folder")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        if not files:
            raise UserError(f"{path}: the folder holds no .txt or .jsonl files")
        return files
    return [p]


def read_documents(
    path: str | os.PathLike, doc_sep: str = "line", encoding_errors: str = "strict"
) -> list[str]:
    """Documents of a file or folder: non-blank lines (or blank-line separated paragraphs).

    CRLF line ends and a UTF-8 byte-order mark are handled; `.jsonl` files give their `text` field.
    The rules live in `corpus.py`, which reads large files in bounded chunks; this is its
    all-in-memory form for small inputs.
    """
    from domainlm.corpus import iter_documents

    docs = [doc for _, chunk in iter_documents(path, doc_sep, encoding_errors) for doc in chunk]
    if not docs:
        raise UserError(f"{path}: no text in it (the file is empty or holds only blank lines)")
    return docs


# ----------------------------------------------------------------------------- token stream


@dataclass
class TokenStream:
    """A corpus as one flat token array.

    `tokens[0]` is EOS; document i occupies `tokens[doc_starts[i] : doc_starts[i + 1]]`, its own
    tokens followed by one EOS (`doc_starts` has one entry more than there are documents).
    """

    tokens: np.ndarray
    doc_starts: np.ndarray

    @property
    def num_documents(self) -> int:
        return len(self.doc_starts) - 1

    @property
    def num_predicted(self) -> int:
        """N: every token after the leading EOS is predicted once."""
        return len(self.tokens) - 1

    def select(self, documents: np.ndarray) -> TokenStream:
        """A new stream made of the given documents, in that order."""
        documents = np.asarray(documents, dtype=np.int64)
        starts, ends = self.doc_starts[documents], self.doc_starts[documents + 1]
        parts = [self.tokens[:1]] + [self.tokens[s:e] for s, e in zip(starts, ends, strict=True)]
        lengths = (ends - starts).astype(np.int64)
        new_starts = np.concatenate([[1], 1 + np.cumsum(lengths)]).astype(np.int64)
        return TokenStream(np.concatenate(parts), new_starts)


def tokenize_documents(docs: Sequence[str], tokenizer: Any, eos_id: int, dtype: Any) -> TokenStream:
    """`[EOS] d1 EOS d2 EOS ...`, each document encoded by `corpus.encode_batch` (as text).

    The in-memory form of `load_token_stream`'s streamed path: the same encoder, the same ids.
    """
    from domainlm.corpus import encode_batch

    pieces: list[np.ndarray] = [np.array([eos_id], dtype=dtype)]
    lengths: list[int] = []
    for start in range(0, len(docs), TOKENIZE_CHUNK_DOCS):
        batch = list(docs[start : start + TOKENIZE_CHUNK_DOCS])
        for doc_ids in encode_batch(tokenizer, batch):
            pieces.append(np.asarray([*doc_ids, eos_id], dtype=dtype))
            lengths.append(len(doc_ids) + 1)
    starts = np.concatenate([[1], 1 + np.cumsum(np.asarray(lengths, dtype=np.int64))])
    return TokenStream(np.concatenate(pieces), starts.astype(np.int64))


def default_cache_dir() -> Path:
    return Path(os.environ.get("DOMAINLM_CACHE", Path.home() / ".cache" / "domainlm"))


@dataclass
class CachedStream:
    stream: TokenStream
    cache_hit: bool
    key: str


def load_token_stream(
    path: str | os.PathLike,
    tokenizer: Any,
    eos_id: int,
    tokenizer_id: str,
    cache_dir: str | os.PathLike | None = None,
    doc_sep: str = "line",
    encoding_errors: str = "strict",
) -> CachedStream:
    """Tokenize a corpus once; later calls with the same content and tokenizer read the cache."""
    from domainlm.corpus import corpus_fingerprint, tokenize_to_files
    from domainlm.models import token_dtype

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    key_text = "|".join(
        [
            CACHE_FORMAT_VERSION,
            corpus_fingerprint(path),
            tokenizer_id,
            str(eos_id),
            doc_sep,
            encoding_errors,
        ]
    )
    key = hashlib.sha256(key_text.encode()).hexdigest()[:24]
    tokens_file, starts_file = cache / f"{key}.tokens.npy", cache / f"{key}.docs.npy"
    if tokens_file.is_file() and starts_file.is_file():
        tokens = np.load(tokens_file, mmap_mode="r")
        return CachedStream(TokenStream(tokens, np.load(starts_file)), True, key)
    # Streamed in bounded memory, on all cores (domainlm/corpus.py), straight into the cache.
    dtype = token_dtype(len(tokenizer))
    tokenize_to_files(
        path, tokenizer, eos_id, dtype, tokens_file, starts_file, doc_sep, encoding_errors
    )
    stream = TokenStream(np.load(tokens_file, mmap_mode="r"), np.load(starts_file))
    return CachedStream(stream, False, key)


def split_documents(num_documents: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random (not contiguous) train / held-out document indices, each sorted."""
    if num_documents < 2:
        raise UserError(
            "the training file has a single document, too few to hold some out for validation; "
            "pass --validation-file"
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
        self.num_blocks = -(-self.num_predicted // block_size)

    def __len__(self) -> int:
        return self.num_blocks

    def targets_in(self, index: int) -> int:
        """Number of predicted tokens in block `index` (block_size except in the last)."""
        return min(self.block_size, self.num_predicted - index * self.block_size)

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
            n = self.targets_in(index)
            inputs[row, :n] = tokens[start : start + n]
            targets[row, :n] = tokens[start + 1 : start + 1 + n]
        batch = Batch(torch.from_numpy(inputs), torch.from_numpy(targets))
        if self.packing == "docs":
            from domainlm.packing import document_positions

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
