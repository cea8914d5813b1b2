"""Text files -> documents -> one token stream (cached on disk); blocks.py cuts it into blocks.

Every document follows its tokenizer's convention (`model.loading.document_prefix`):

- GPT-2-style tokenizers (no prefix): `[EOS] d1 EOS d2 EOS ... dn EOS`. Every document is
  followed by the end-of-sequence token and one EOS stands in front as the first context.
- Tokenizers that put a BOS (or `[CLS]`) before a text: `BOS d1 EOS BOS d2 EOS ... BOS dn EOS`.
  The BOS is context only: the position after each EOS holds a BOS that is never a target.

Either way the `N = sum(len(d) + 1)` tokens of the documents and their EOS are predicted, each
exactly once, in training as in evaluation. Training block k reads inputs `stream[kB : kB+B]` and
targets `stream[kB+1 : kB+B+1]`, with the BOS positions masked; no token is dropped, and the
padding of the last, partial block is masked out of the loss.
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

CACHE_FORMAT_VERSION = "2"  # 2: special-token text is encoded as text (a prefix joins the key)
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

    Document i occupies `tokens[doc_starts[i] : doc_starts[i + 1]]`: its prefix (the
    `prefix_length` BOS tokens, none for GPT-2-style tokenizers), its own tokens, one EOS
    (`doc_starts` has one entry more than there are documents). Without a prefix, `tokens[0]` is
    a leading EOS before the first document (`doc_starts[0] == 1`); with one, nothing leads.
    Positions before the first document and the prefix positions are context, never targets.
    """

    tokens: np.ndarray
    doc_starts: np.ndarray
    prefix_length: int = 0

    @property
    def num_documents(self) -> int:
        return len(self.doc_starts) - 1

    @property
    def lead(self) -> int:
        """Tokens before the first document: 1 (the leading EOS) without a prefix, else 0."""
        return int(self.doc_starts[0])

    @property
    def num_predicted(self) -> int:
        """N: every token but the leading EOS and the BOS prefixes is predicted once."""
        return len(self.tokens) - self.lead - self.prefix_length * self.num_documents

    def document_lengths(self) -> np.ndarray:
        """Tokens of each document plus its EOS (the prefix not counted)."""
        return np.diff(np.asarray(self.doc_starts, dtype=np.int64)) - self.prefix_length

    def unscored_positions(self) -> np.ndarray:
        """Sorted positions after the first that are context only (the prefixes); none without."""
        starts = np.asarray(self.doc_starts[:-1], dtype=np.int64)
        at = (starts[:, None] + np.arange(self.prefix_length)[None, :]).ravel()
        return at[at > 0]

    def select(self, documents: np.ndarray) -> TokenStream:
        """A new stream made of the given documents, in that order."""
        documents = np.asarray(documents, dtype=np.int64)
        starts, ends = self.doc_starts[documents], self.doc_starts[documents + 1]
        lead = self.lead
        parts = [self.tokens[:lead]] + [self.tokens[s:e] for s, e in zip(starts, ends, strict=True)]
        lengths = (ends - starts).astype(np.int64)
        new_starts = np.concatenate([[lead], lead + np.cumsum(lengths)]).astype(np.int64)
        return TokenStream(np.concatenate(parts), new_starts, self.prefix_length)


def tokenize_documents(
    docs: Sequence[str], tokenizer: Any, eos_id: int, dtype: Any, prefix: Sequence[int] = ()
) -> TokenStream:
    """`[EOS] d1 EOS d2 EOS ...`, or with a prefix `BOS d1 EOS BOS d2 EOS ...`; each document
    encoded by `corpus.encode_batch` (as text).

    The in-memory form of `load_token_stream`'s streamed path: the same encoder, the same ids.
    """
    from domainlm.data.corpus import encode_batch

    prefix = [int(t) for t in prefix]
    lead = [] if prefix else [eos_id]
    pieces: list[np.ndarray] = [np.array(lead, dtype=dtype)]
    lengths: list[int] = []
    for start in range(0, len(docs), TOKENIZE_CHUNK_DOCS):
        batch = list(docs[start : start + TOKENIZE_CHUNK_DOCS])
        for doc_ids in encode_batch(tokenizer, batch):
            pieces.append(np.asarray([*prefix, *doc_ids, eos_id], dtype=dtype))
            lengths.append(len(prefix) + len(doc_ids) + 1)
    ends = len(lead) + np.cumsum(np.asarray(lengths, dtype=np.int64))
    starts = np.concatenate([[len(lead)], ends])
    return TokenStream(np.concatenate(pieces), starts.astype(np.int64), len(prefix))


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
    prefix: Sequence[int] = (),
) -> CachedStream:
    """Tokenize a corpus once; later calls with the same content and tokenizer read the cache.

    The key: the files' fingerprint (names, sizes, content), the tokenizer, EOS, the reading
    options, the text column (.jsonl field or table column) and the `prefix`, the tokens before
    every document (`LoadedModel.document_prefix`).
    """
    from domainlm.data.corpus import corpus_fingerprint, reader_key_parts, tokenize_to_files

    cache = writable_cache_dir(Path(cache_dir) if cache_dir else default_cache_dir())
    key_text = "|".join(
        [
            CACHE_FORMAT_VERSION,
            corpus_fingerprint(path),
            tokenizer_id,
            str(eos_id),
            doc_sep,
            encoding_errors,
        ]
        # the column read (.jsonl field or table column); the default keeps the keys of before
        + ([f"column={text_column}"] if text_column != "text" else [])
        # A prefix changes the stream; none keeps the key (and the caches) of before.
        + ([f"prefix={','.join(str(int(t)) for t in prefix)}"] if prefix else [])
        + reader_key_parts(path)  # .json and D.JSONL once read as lines: not their old caches
    )
    key = hashlib.sha256(key_text.encode()).hexdigest()[:24]
    tokens_file, starts_file = cache / f"{key}.tokens.npy", cache / f"{key}.docs.npy"
    if tokens_file.is_file() and starts_file.is_file():
        tokens = np.load(tokens_file, mmap_mode="r")
        stream = TokenStream(tokens, np.load(starts_file), len(prefix))
        return CachedStream(stream, True, key)
    # Streamed in bounded memory, on all cores (domainlm/data/corpus.py), straight into the cache.
    dtype = token_dtype(len(tokenizer))
    tokenize_to_files(
        path, tokenizer, eos_id, dtype, tokens_file, starts_file, doc_sep, encoding_errors,
        text_column=text_column,
        prefix=prefix,
    )  # fmt: skip
    stream = TokenStream(np.load(tokens_file, mmap_mode="r"), np.load(starts_file), len(prefix))
    return CachedStream(stream, False, key)


def writable_cache_dir(cache: Path) -> Path:
    """The token cache folder, created if missing; a clear error where it cannot be."""
    if cache.exists() and not cache.is_dir():
        raise UserError(
            f"the token cache {cache} is a file, not a folder: pass --cache-dir a folder "
            "(or set DOMAINLM_CACHE)"
        )
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot create the token cache folder {cache} ({exc.strerror or exc}): pass "
            "--cache-dir a folder you can write to (or set DOMAINLM_CACHE)"
        ) from exc
    return cache


def token_dtype(vocab_size: int) -> Any:
    """The smallest unsigned integer type that holds every token id of a vocabulary."""
    return np.uint16 if vocab_size <= 65535 else np.uint32


def stream_fingerprint(stream: TokenStream) -> str:
    """A fingerprint of a training token stream: its length, its documents' boundaries and
    about a million of its tokens, evenly spaced (cheap for a corpus of billions of tokens; any
    other file, edit that moves a boundary, or --doc-sep gives another)."""
    digest = hashlib.sha256()
    tokens = stream.tokens
    digest.update(np.int64(len(tokens)).tobytes())
    digest.update(np.ascontiguousarray(stream.doc_starts, dtype=np.int64).tobytes())
    step = max(1, len(tokens) // 2**20)
    digest.update(np.ascontiguousarray(tokens[::step], dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]
