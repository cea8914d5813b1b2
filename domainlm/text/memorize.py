"""Memorization check: the longest token span of a sample copied verbatim from the training data.

The index is over the training token stream (the same cache training reads): for every position
p, a hash of the n tokens starting there (n = NGRAM), packed with p into one uint64
(`hash32 << 32 | p`) and sorted. A sample's n-grams are looked up by binary search; each hit is
extended token by token against the stream, so hash collisions cannot produce a false match.
Built with numpy in a few passes and one sort, saved beside the token cache, memory-mapped after.

A span is reported when it is at least NGRAM tokens long; shorter overlaps are everyday phrases.
Limit: an n-gram seen more than MAX_CANDIDATES times is narrowed by the sample's next n-gram; if
that pair is still that common, only its first occurrences are extended, and a copy starting
there can be reported a few tokens short (it is found from a rarer n-gram onwards).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from domainlm.data.formats import is_json_lines, is_table
from domainlm.data.tokens import TokenStream

NGRAM = 8
MAX_CANDIDATES = 1000
INDEX_VERSION = "1"
_PRIME = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier (golden ratio), mixes the high bits
_CHUNK = 1 << 22  # positions hashed per pass, bounds the temporary memory


@dataclass(frozen=True)
class CopiedSpan:
    """`length` sample tokens from `sample_start` equal the stream from `train_start` (document `document`)."""

    length: int
    sample_start: int
    train_start: int
    document: int


def ngram_keys(tokens: np.ndarray, n: int = NGRAM) -> np.ndarray:
    """uint32 hash of tokens[i : i + n] for every i with a full n-gram (len(tokens) - n + 1 values)."""
    count = len(tokens) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    keys = np.empty(count, dtype=np.uint64)
    for start in range(0, count, _CHUNK):
        stop = min(count, start + _CHUNK)
        h = np.zeros(stop - start, dtype=np.uint64)
        with np.errstate(over="ignore"):  # wrap-around arithmetic modulo 2**64 is the hash
            for t in range(n):
                h = h * _PRIME + np.asarray(tokens[start + t : stop + t], dtype=np.uint64) + 1
            keys[start:stop] = (h * _PRIME) >> np.uint64(32)
    return keys


class NgramIndex:
    """Sorted `hash << 32 | position` of every n-gram of a token stream."""

    def __init__(self, stream: TokenStream, packed: np.ndarray, n: int = NGRAM) -> None:
        self.stream = stream
        self.packed = packed
        self.n = n

    @classmethod
    def build(cls, stream: TokenStream, n: int = NGRAM) -> NgramIndex:
        if len(stream.tokens) >= 1 << 32:
            raise ValueError("the memorization index holds at most 2**32 tokens")
        keys = ngram_keys(stream.tokens, n)
        keys <<= np.uint64(32)
        keys |= np.arange(len(keys), dtype=np.uint64)
        keys.sort()
        return cls(stream, keys, n)

    @classmethod
    def load_or_build(
        cls, stream: TokenStream, cache_dir: Path, key: str, n: int = NGRAM
    ) -> tuple[NgramIndex, bool, float]:
        """The cached index of the token cache `key`, built and saved on first use.

        Returns (index, cache_hit, seconds spent building or loading).
        """
        started = time.perf_counter()
        path = Path(cache_dir) / f"{key}.ngram{n}.v{INDEX_VERSION}.npy"
        if path.is_file():
            packed = np.load(path, mmap_mode="r")
            return cls(stream, packed, n), True, time.perf_counter() - started
        index = cls.build(stream, n)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            np.save(handle, index.packed)
        os.replace(tmp, path)
        return index, False, time.perf_counter() - started

    def positions(self, key: int) -> np.ndarray:
        """All stream positions whose n-gram has hash `key`, ascending."""
        low = np.uint64(int(key) << 32)
        high = np.uint64((int(key) << 32) | 0xFFFFFFFF)
        lo = int(np.searchsorted(self.packed, low, side="left"))
        hi = int(np.searchsorted(self.packed, high, side="right"))
        return (np.asarray(self.packed[lo:hi]) & np.uint64(0xFFFFFFFF)).astype(np.int64)

    def candidates(self, keys: list[int], j: int) -> np.ndarray:
        """Positions where sample n-gram j may start a copy (at most MAX_CANDIDATES).

        A very common n-gram is narrowed to the positions also followed by the sample's next
        n-gram, so boilerplate repeated thousands of times does not hide the true source.
        """
        found = self.positions(keys[j])
        if len(found) > MAX_CANDIDATES and j + self.n < len(keys):
            following = self.positions(keys[j + self.n]) - self.n
            found = np.intersect1d(found, following, assume_unique=True)
        return found[:MAX_CANDIDATES]

    def longest_copy(self, sample: Sequence[int]) -> CopiedSpan | None:
        """The longest span (>= n tokens) of `sample` that occurs verbatim in the stream, or None."""
        tokens = self.stream.tokens
        query = np.asarray(sample, dtype=np.int64)
        best: CopiedSpan | None = None
        keys = ngram_keys(query, self.n).tolist()
        for j in range(len(keys)):
            rest = query[j:]
            if best is not None and len(rest) <= best.length:
                break  # no span starting here or later can be longer
            found = self.candidates(keys, j)
            if len(found) == 0:
                continue
            offsets = found[:, None] + np.arange(len(rest))[None, :]  # (c, m)
            inside = offsets < len(tokens)
            window = np.asarray(tokens[np.minimum(offsets, len(tokens) - 1)], dtype=np.int64)
            equal = (window == rest[None, :]) & inside
            lengths = np.where(equal.all(axis=1), len(rest), equal.argmin(axis=1))
            top = int(lengths.argmax())
            length = int(lengths[top])
            if length >= self.n and (best is None or length > best.length):
                start = int(found[top])
                best = CopiedSpan(length, j, start, self.document_of(start))
        return best

    def document_of(self, position: int) -> int:
        """0-based index of the document holding stream position `position`."""
        return int(np.searchsorted(self.stream.doc_starts, position, side="right")) - 1

    def document_tokens(self, document: int) -> np.ndarray:
        """The tokens of document `document`, without its BOS prefix and its closing EOS."""
        starts = self.stream.doc_starts
        first = starts[document] + self.stream.prefix_length
        return np.asarray(self.stream.tokens[first : starts[document + 1] - 1])


def source_line(path: str | os.PathLike, document: int, doc_sep: str = "line") -> int | None:
    """1-based line number of document `document` in a single .txt training file (else None)."""
    p = Path(path)
    if not p.is_file() or is_json_lines(p) or is_table(p):
        return None
    seen = -1
    previous_blank = True
    with open(p, encoding="utf-8-sig", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            blank = not line.strip()
            if doc_sep == "line" and not blank:
                seen += 1
            elif doc_sep == "blank" and not blank and previous_blank:
                seen += 1  # a paragraph starts
            previous_blank = blank
            if seen == document:
                return number
    return None
