"""Data lint: each problem is found, counted and located in generated files; --strict refuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import uneven_corpus, write_lines

from domainlm.config import TrainConfig
from domainlm.data.lint import check_training_data, count_long_documents, lint_corpus
from domainlm.errors import UserError
from domainlm.run.metrics import Console


def _messy(tmp_path: Path) -> Path:
    lines = uneven_corpus(20, seed=1)
    body = (
        [lines[0], "", "same line repeated here"]
        + lines[1:10]
        + [
            "same line repeated here",
            "ok",
            "tab\tis fine but bell \x07 is not",
            "same line repeated here",
        ]
    )
    raw = ("\r\n".join(body) + "\r\n").encode()
    bad = b"caf\xe9 in latin-1\r\n"  # line 17
    path = tmp_path / "train.txt"
    path.write_bytes(b"\xef\xbb\xbf" + raw + bad)
    return path


def test_every_problem_is_counted_with_line_numbers(tmp_path):
    report = lint_corpus(_messy(tmp_path))
    t = report.train
    assert t.lines == 17
    assert t.bom and t.crlf_lines == 17
    assert t.empty_lines == 1
    assert t.duplicate_lines == 2
    assert t.duplicate_examples[0] == ("same line repeated here", 3)
    assert t.control_char_lines == [15] and t.control_char_count == 1
    assert t.invalid_utf8_lines == [17] and t.invalid_utf8_count == 1
    assert t.short_lines == 1  # "ok"
    text = "\n".join(report.warnings())
    for needle in (
        "invalid UTF-8",
        "line(s) 17",
        "duplicate",
        "x3",
        "control",
        "CRLF",
        "byte-order",
    ):
        assert needle in text


def test_clean_file_has_no_warnings(tmp_path):
    path = write_lines(tmp_path / "clean.txt", sorted(set(uneven_corpus(30))))
    assert lint_corpus(path).warnings() == []


def test_leakage_counts_validation_lines_found_in_train(tmp_path):
    docs = uneven_corpus(40, seed=2)
    train = write_lines(tmp_path / "train.txt", docs)
    valid = write_lines(
        tmp_path / "valid.txt", [docs[3], "a brand new validation sentence", docs[7]]
    )
    report = lint_corpus(train, valid)
    assert report.validation.leaked_lines == 2
    assert set(report.validation.leaked_examples) == {docs[3], docs[7]}
    assert report.train.leaked_lines is None


def test_a_leaked_first_line_after_a_byte_order_mark_is_quoted(tmp_path):
    """The example of a leaked line is its text even where it is a validation file's first line,
    after a UTF-8 byte-order mark (the example was empty: the mark was read as text)."""
    docs = uneven_corpus(40, seed=2)
    train = write_lines(tmp_path / "train.txt", docs)
    valid = tmp_path / "valid.txt"
    valid.write_bytes(b"\xef\xbb\xbf" + f"{docs[3]}\na brand new validation line\n".encode())
    report = lint_corpus(train, valid)
    assert report.validation.leaked_lines == 1
    assert report.validation.leaked_examples == [docs[3]]
    assert f"e.g. {docs[3][:57]!r}"[:40] in "\n".join(report.warnings())


def test_a_jsonl_files_first_record_after_a_byte_order_mark_is_linted(tmp_path):
    """A .jsonl file starting with a byte-order mark: its first record is text, as training
    reads it (it was an empty line, missing from the duplicate and leakage checks)."""
    records = ['{"text": "bom json doc alpha beta gamma"}', '{"text": "two three four five"}']
    train = tmp_path / "train.jsonl"
    train.write_bytes(b"\xef\xbb\xbf" + "\n".join(records).encode() + b"\n")
    valid = write_lines(tmp_path / "valid.txt", ["bom json doc alpha beta gamma"])
    report = lint_corpus(train, valid)
    assert report.train.empty_lines == 0 and report.validation.leaked_lines == 1
    assert report.train.bom and "byte-order mark" in "\n".join(report.warnings())


def test_a_folders_lines_are_named_with_their_file(tmp_path):
    """In a folder, a line number alone does not say which file: each place is "file:line",
    the file's path inside the folder (a single file keeps bare numbers)."""
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("first file line one here\nfirst file line two here\n")
    (corpus / "sub" / "b.txt").write_text("second file line one\nsecond has a \x07 bell\n")
    (corpus / "c.txt").write_text("third file \x1b ok line\n<|endoftext|> spelled out\n")
    report = lint_corpus(corpus, special_tokens=["<|endoftext|>"])
    assert sorted(report.train.control_char_lines) == ["c.txt:1", "sub/b.txt:2"]
    assert report.train.special_token_lines == ["c.txt:2"]
    text = "\n".join(report.warnings())
    assert "e.g. line(s) c.txt:2;" in text
    (corpus / "sub" / "d.txt").write_bytes(b"\xef\xbb\xbfa file with a byte-order mark\n")
    report = lint_corpus(corpus, special_tokens=["<|endoftext|>"])
    assert report.train.bom_files == ["sub/d.txt"]
    assert "corpus: 1 file(s) start with a UTF-8 byte-order mark (dropped): sub/d.txt" in "\n".join(
        report.warnings()
    )
    single = lint_corpus(corpus / "c.txt", special_tokens=["<|endoftext|>"])
    assert single.train.control_char_lines == [1] and single.train.special_token_lines == [2]


def test_old_mac_line_ends_are_warned_of(tmp_path):
    """A file whose lines end in a bare CR is read as one line (only LF ends a line): said, with
    the count, and how to convert; a CRLF file's CRs are no such thing."""
    old_mac = tmp_path / "mac.txt"
    old_mac.write_bytes(b"".join(f"line number {i} here\r".encode() for i in range(50)))
    report = lint_corpus(old_mac)
    assert report.train.lines == 1 and report.train.lone_carriage_returns == 49  # the last ends
    (said,) = [w for w in report.warnings() if "carriage return" in w]  # the file's last line
    assert "49 carriage return(s) with no line feed" in said and "tr '\\r' '\\n'" in said
    last_only = tmp_path / "last.txt"
    last_only.write_bytes(b"one line\nthe last line here\r")
    assert lint_corpus(last_only).train.lone_carriage_returns == 0
    windows = write_lines(tmp_path / "win.txt", uneven_corpus(20, seed=3), newline="\r\n")
    assert lint_corpus(windows).train.lone_carriage_returns == 0


def test_a_jsonl_file_is_linted_on_its_text_field(tmp_path):
    """A .jsonl file's texts are its records' "text" fields, as training reads them: duplicates
    and leaks are found among them (records differ by their other fields), examples quote the
    text, not the JSON, and characters count the texts as a .csv's rows are counted."""
    import csv
    import json

    docs = uneven_corpus(12, seed=3)
    texts = docs + docs[:4]  # 4 repeated texts, each record with its own id
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    valid = write_lines(tmp_path / "valid.txt", [docs[5], "a brand new validation sentence"])
    report = lint_corpus(train, valid, cache_dir=tmp_path / "cache")
    assert report.train.duplicate_lines == 4
    assert report.validation.leaked_lines == 1
    assert report.validation.leaked_examples == [docs[5]]
    assert report.train.lines == len(texts)
    with open(tmp_path / "train.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["text"], *([t] for t in texts)])
    table = lint_corpus(tmp_path / "train.csv", cache_dir=tmp_path / "cache").train
    assert report.train.characters == table.characters == sum(len(t) for t in texts)


def test_a_crlf_file_has_the_characters_of_its_lf_copy(tmp_path):
    """A line end is one character, LF or CRLF (characters = what Python's text mode reads)."""
    docs = uneven_corpus(10, seed=4)
    lf = write_lines(tmp_path / "lf.txt", docs)
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(lf.read_bytes().replace(b"\n", b"\r\n"))
    counts = [lint_corpus(p, cache_dir=tmp_path / "cache").train.characters for p in (lf, crlf)]
    assert counts == [len(lf.read_text()), len(crlf.read_text())] == [len(lf.read_text())] * 2


def test_long_documents_from_token_lengths():
    # documents of 3, 9 and 4 tokens (+ EOS each): starts 1, 5, 15, 20
    assert count_long_documents(np.array([1, 5, 15, 20]), block_size=8) == 1
    assert count_long_documents(np.array([1, 5, 15, 20]), block_size=10) == 0


def test_chunked_scan_matches_one_chunk(tmp_path, monkeypatch):
    """Line numbers and counts do not depend on where the reader cuts its chunks."""
    path = _messy(tmp_path)
    whole = lint_corpus(path, cache_dir=tmp_path / "a").train
    monkeypatch.setattr("domainlm.data.corpus.CHUNK_BYTES", 64)
    chunked = lint_corpus(path, cache_dir=tmp_path / "b").train
    assert chunked == whole


def test_strict_training_refuses_before_writing(tmp_path):
    from domainlm.data.tokens import TokenStream

    train = _messy(tmp_path)
    out = tmp_path / "run"
    config = TrainConfig(
        model="scratch:tiny",
        train_file=str(train),
        output_dir=str(out),
        strict=True,
        encoding_errors="replace",
    )
    stream = TokenStream(np.zeros(10, np.uint16), np.array([1, 5, 10]))
    with pytest.raises(UserError, match="--strict: .*data problem"):
        check_training_data(config, 64, stream, stream, Console(enabled=False))
    assert not out.exists()
    config.strict = False
    problems = check_training_data(config, 64, stream, stream, Console(enabled=False))
    assert any("duplicate" in p for p in problems)


def test_lint_result_is_cached(tmp_path):
    path = write_lines(tmp_path / "t.txt", ["x y z w v u t s", "x y z w v u t s"])
    lint_corpus(path)
    assert len(list((tmp_path / "token-cache").glob("lint-*.json"))) == 1
    assert lint_corpus(path).train.duplicate_examples == [("x y z w v u t s", 2)]
