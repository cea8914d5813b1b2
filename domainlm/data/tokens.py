"""Text files -> documents -> one token stream (cached on disk); blocks.py cuts it into blocks.

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

from domainlm.errors import UserError

CACHE_FORMAT_VERSION = "2"  # 2: special-token text is encoded as text
TOKENIZE_CHUNK_DOCS = 1000


# ----------------------------------------------------------------------------- reading text


def read_documents(
    path: str | os.PathLike,
    doc_sep: str = "line",
    encoding_errors: str = "strict",
    text_column: str = "text",
) -> list[str]:
    """Documents of a file or folder: non-blank lines (or blank-line separated paragraphs).

    CRLF line ends and a UTF-8 byte-order mark are handled; `.jsonl` files give their `text` field,
    tables (.parquet, .csv, a save_to_disk folder) their `text_column`, one document per row.
    The rules live in `corpus.py`, which reads large files in bounded chunks; this is its
    all-in-memory form for small inputs.
    """
    from domainlm.data.corpus import iter_documents

    chunks = iter_documents(path, doc_sep, encoding_errors, text_column)
    docs = [doc for _, chunk in chunks for doc in chunk]
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
    from domainlm.data.corpus import encode_batch

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
    text_column: str = "text",
) -> CachedStream:
    """Tokenize a corpus once; later calls with the same content and tokenizer read the cache.

    The key: the files' fingerprint (names, sizes, content), the tokenizer, EOS, the reading
    options and the text column (.jsonl field or table column).
    """
    from domainlm.data.corpus import corpus_fingerprint, tokenize_to_files

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    key_text = "|".join(
        [
            CACHE_FORMAT_VERSION,
            corpus_fingerprint(path),
            tokenizer_id,
            str(eos_id),
            doc_sep,
            encoding_errors,
            text_column,
        ]
    )
    key = hashlib.sha256(key_text.encode()).hexdigest()[:24]
    tokens_file, starts_file = cache / f"{key}.tokens.npy", cache / f"{key}.docs.npy"
    if tokens_file.is_file() and starts_file.is_file():
        tokens = np.load(tokens_file, mmap_mode="r")
        return CachedStream(TokenStream(tokens, np.load(starts_file)), True, key)
    # Streamed in bounded memory, on all cores (domainlm/data/corpus.py), straight into the cache.
    dtype = token_dtype(len(tokenizer))
    tokenize_to_files(
        path, tokenizer, eos_id, dtype, tokens_file, starts_file, doc_sep, encoding_errors,
        text_column=text_column,
    )  # fmt: skip
    stream = TokenStream(np.load(tokens_file, mmap_mode="r"), np.load(starts_file))
    return CachedStream(stream, False, key)


def token_dtype(vocab_size: int) -> Any:
    """The smallest unsigned integer type that holds every token id of a vocabulary."""
    return np.uint16 if vocab_size <= 65535 else np.uint32
