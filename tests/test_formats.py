"""Parquet, CSV and `datasets.save_to_disk` folders read like .txt/.jsonl (domainlm/data/formats.py).

The same documents written as .txt, .jsonl, .parquet, .csv and a save_to_disk folder (each by its
own library: csv, json, pyarrow, datasets, never by domainlm) give the identical token stream,
lint, perplexity and per-line scores; `--text-column` picks the column; a Parquet file is read
lazily, batch by batch; bad tables are one line with exit code 2 and nothing written.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ModuleTemp

from domainlm.data import formats
from domainlm.data.corpus import iter_documents
from domainlm.data.lint import lint_corpus
from domainlm.data.tokens import load_token_stream
from domainlm.evaluation.perplexity import PerplexityConfig, evaluate_perplexity
from domainlm.model.loading import gpt2_tokenizer

EOS = 50256
# One document per line of the .txt; the tables also hold a null and a blank row (skipped, as a
# blank line is) and documents with what CSV must quote: commas, quotes, a newline is not here
# because the .txt reference has one document per line.
DOCS = [
    "the quick brown fox, jumps over the lazy dog",
    'she said "hello" and left',
    "héllo wörld, ελληνικά και 中文",
    "a line that quotes <|endoftext|> as plain text",
    "tab\tseparated; semi;colons",
    "the quick brown fox, jumps over the lazy dog",
    "x",
] + [f"document number {i} with some words in it" for i in range(16)]


def table_rows(docs: list[str]) -> list[str | None]:
    """The documents with a blank and a null row in among them (rows 3 and 6)."""
    rows: list[str | None] = list(docs)
    rows.insert(2, "   ")
    rows.insert(5, None)
    return rows


def write_formats(folder: Path, docs: list[str], column: str = "text") -> dict[str, Path]:
    """The documents as .txt, .jsonl, .parquet (many row groups), .csv and a save_to_disk folder;
    the tables also get an `other` column of different text and an integer column `n`."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    folder.mkdir(parents=True, exist_ok=True)
    rows = table_rows(docs)
    other = [f"other {i}" for i in range(len(rows))]
    paths = {name: folder / f"docs.{name}" for name in ("txt", "jsonl", "parquet", "csv")}
    paths["txt"].write_text("".join(d + "\n" for d in docs), encoding="utf-8")
    with open(paths["jsonl"], "w", encoding="utf-8") as handle:
        for doc in docs:
            handle.write(json.dumps({column: doc, "other": "x"}, ensure_ascii=False) + "\n")
    table = pa.table({"n": list(range(len(rows))), "other": other, column: rows})
    pq.write_table(table, paths["parquet"], row_group_size=5)
    with open(paths["csv"], "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["n", column, "other"])
        for i, row in enumerate(rows):
            writer.writerow([i, "" if row is None else row, other[i]])
    paths["dataset"] = folder / "dataset"
    Dataset.from_dict({column: rows, "other": other}).save_to_disk(str(paths["dataset"]))
    return paths


def reference_stream(docs: list[str]) -> np.ndarray:
    """[EOS] d1 EOS d2 ... by the tokenizer's plain call, special-token text kept as text."""
    tokenizer = gpt2_tokenizer()
    ids = [EOS]
    for doc in docs:
        ids += tokenizer(doc, add_special_tokens=False, split_special_tokens=True).input_ids
        ids.append(EOS)
    return np.array(ids)


@pytest.fixture(scope="module")
def files(module_tmp: ModuleTemp) -> dict[str, Path]:
    return write_formats(module_tmp.mktemp("formats"), DOCS)


FORMATS = ["txt", "jsonl", "parquet", "csv", "dataset"]


# ----------------------------------------------------------------------------- same documents


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_gives_the_same_token_stream(files, name, tmp_path) -> None:
    tokenizer = gpt2_tokenizer()
    cached = load_token_stream(files[name], tokenizer, EOS, "gpt2", tmp_path / "cache")
    np.testing.assert_array_equal(np.asarray(cached.stream.tokens), reference_stream(DOCS))
    assert cached.stream.num_documents == len(DOCS)
    again = load_token_stream(files[name], tokenizer, EOS, "gpt2", tmp_path / "cache")
    assert again.cache_hit and again.key == cached.key


@pytest.mark.parametrize(
    "name, upper", [("jsonl", "JSONL"), ("csv", "CSV"), ("parquet", "Parquet")]
)
def test_any_case_of_a_suffix_is_read_as_the_lower_case_file(files, name, upper, tmp_path) -> None:
    """`D.JSONL`, `X.CSV` and `X.Parquet`, given as a file or in a folder, give the token stream
    and the lint of their lower-case twins (they were read as plain lines of `{"text": ...}` and
    `n,text,other`, lint finding no problem, or refused as binary)."""
    tokenizer = gpt2_tokenizer()
    folder = tmp_path / "folder"
    folder.mkdir()
    twin = folder / f"DOCS.{upper}"
    twin.write_bytes(files[name].read_bytes())
    for source in (twin, folder):
        cached = load_token_stream(source, tokenizer, EOS, "gpt2", tmp_path / "cache")
        np.testing.assert_array_equal(np.asarray(cached.stream.tokens), reference_stream(DOCS))
        lint = lint_corpus(source, None, tmp_path / "cache").train
        expected = lint_corpus(files[name], None, tmp_path / "cache").train
        assert {**lint.to_dict(), "path": ""} == {**expected.to_dict(), "path": ""}, source


def test_text_column_picks_another_column_and_is_in_the_cache_key(tmp_path) -> None:
    paths = write_formats(tmp_path / "body", DOCS, column="body")
    tokenizer = gpt2_tokenizer()
    for name in ("jsonl", "parquet", "csv", "dataset"):
        body = load_token_stream(
            paths[name], tokenizer, EOS, "gpt2", tmp_path / "c", text_column="body"
        )
        np.testing.assert_array_equal(np.asarray(body.stream.tokens), reference_stream(DOCS))
        if name == "jsonl":
            continue
        other = load_token_stream(
            paths[name], tokenizer, EOS, "gpt2", tmp_path / "c", text_column="other"
        )
        assert not other.cache_hit and other.key != body.key
        expected = [f"other {i}" for i in range(len(DOCS) + 2)]
        np.testing.assert_array_equal(np.asarray(other.stream.tokens), reference_stream(expected))


def test_the_cache_key_follows_the_files_content(tmp_path) -> None:
    tokenizer = gpt2_tokenizer()
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["one text", "two texts"]}), path)
    first = load_token_stream(path, tokenizer, EOS, "gpt2", tmp_path / "c")
    pq.write_table(pa.table({"text": ["one text", "two textz"]}), path)
    second = load_token_stream(path, tokenizer, EOS, "gpt2", tmp_path / "c")
    assert not second.cache_hit and second.key != first.key


def test_invalid_utf8_in_a_csv_is_refused_unless_replace(tmp_path) -> None:
    from domainlm.errors import UserError

    path = tmp_path / "bad.csv"
    path.write_bytes(b"text\nok text\nbad \xff byte\n")
    tokenizer = gpt2_tokenizer()
    with pytest.raises(UserError, match="invalid UTF8.*--encoding-errors replace"):
        load_token_stream(path, tokenizer, EOS, "gpt2", tmp_path / "c")
    replaced = load_token_stream(
        path, tokenizer, EOS, "gpt2", tmp_path / "c", encoding_errors="replace"
    )
    expected = reference_stream(["ok text", "bad \ufffd byte"])
    np.testing.assert_array_equal(np.asarray(replaced.stream.tokens), expected)


def test_perplexity_and_per_line_scores_are_identical_across_formats(
    files, tiny_model_dir, tmp_path
) -> None:
    results = {}
    for name in FORMATS:
        out = tmp_path / f"{name}.jsonl"
        (report,) = evaluate_perplexity(
            PerplexityConfig(
                model=[str(tiny_model_dir)],
                file=str(files[name]),
                per_line=str(out),
                block_size=16,
                quiet=True,
            )  # fmt: skip
        )
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        results[name] = (report, lines)
    base, base_lines = results["txt"]
    for name, (report, lines) in results.items():
        assert (report.nll, report.tokens, report.perplexity) == (
            base.nll,
            base.tokens,
            base.perplexity,
        ), name
        assert [r["nll"] for r in lines] == [r["nll"] for r in base_lines], name
    # where each line came from: the .txt line, the .jsonl line, the table's 1-based row
    assert [r["line"] for r in base_lines] == list(range(1, len(DOCS) + 1))
    rows = [i + 1 for i, row in enumerate(table_rows(DOCS)) if row is not None and row.strip()]
    for name in ("parquet", "csv", "dataset"):
        assert [r["line"] for r in results[name][1]] == rows, name


def test_lint_of_a_table_matches_the_text_file(files, tmp_path) -> None:
    """Duplicates, special-token text, short lines and leakage are found in tables as in text;
    the table's blank and null rows are its empty lines."""
    valid = tmp_path / "valid.csv"
    valid.write_text("text\n" + DOCS[3] + "\nsomething new entirely\n", encoding="utf-8")
    text = lint_corpus(files["txt"], valid, tmp_path / "c", ["<|endoftext|>"])
    for name in ("parquet", "csv", "dataset"):
        table = lint_corpus(files[name], valid, tmp_path / "c", ["<|endoftext|>"])
        for attr in ("duplicate_lines", "duplicate_examples", "short_lines", "special_token_count",
                     "special_token_texts", "control_char_count"):  # fmt: skip
            assert getattr(table.train, attr) == getattr(text.train, attr), (name, attr)
        assert table.train.lines == len(DOCS) + 2 and table.train.empty_lines == 2
        assert table.train.characters == text.train.characters - len(DOCS)  # no line ends
        assert table.train.special_token_lines == [5]  # row 5 (DOCS[3] after the blank row)
        assert table.validation.leaked_lines == text.validation.leaked_lines == 1
    assert text.train.duplicate_lines == 1 and text.train.special_token_count == 1


def test_training_on_parquet_equals_training_on_text(files, tiny_model_dir, tmp_path) -> None:
    from domainlm.config import TrainConfig
    from domainlm.run.train import train

    def run(train_file: Path, valid_file: Path, out: str) -> object:
        return train(TrainConfig(
            model=str(tiny_model_dir), train_file=str(train_file), validation_file=str(valid_file),
            output_dir=str(tmp_path / out), block_size=16, batch_size=4, max_steps=3,
            eval_steps=3, save_steps=3, precision="fp32", quiet=True, report_to=[],
        ))  # fmt: skip

    text = run(files["txt"], files["jsonl"], "text")
    table = run(files["parquet"], files["dataset"], "table")
    assert table.initial_perplexity == text.initial_perplexity
    assert table.final_perplexity == text.final_perplexity
    assert table.train_tokens == text.train_tokens


# ----------------------------------------------------------------------------- streaming


class CountingFile:
    """A binary file that counts the bytes read from it."""

    opened: list[CountingFile] = []

    def __init__(self, path: Path) -> None:
        self.handle = open(path, "rb")  # noqa: SIM115 (closed by __exit__)
        self.read_bytes = 0
        CountingFile.opened.append(self)

    def read(self, n: int = -1) -> bytes:
        data = self.handle.read(n)
        self.read_bytes += len(data)
        return data

    def __getattr__(self, name: str) -> object:
        return getattr(self.handle, name)

    def __enter__(self) -> CountingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()


def test_parquet_is_read_lazily_batch_by_batch(tmp_path, monkeypatch) -> None:
    """A Parquet file of 64 row groups: the first documents come after reading a small part of
    the file; the rest is read only as the documents are consumed."""
    rng = np.random.default_rng(0)
    rows = [
        "".join(map(chr, rng.integers(97, 123, 400))) for _ in range(64 * 50)
    ]  # random: no compression
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": rows}), path, row_group_size=50)
    monkeypatch.setattr(formats, "BATCH_BYTES", 20_000)  # ~50 rows a batch
    monkeypatch.setattr(formats, "_open_binary", CountingFile)
    CountingFile.opened.clear()
    size = path.stat().st_size
    chunks = iter_documents(path)
    first = next(chunks)[1]
    assert first == rows[: len(first)] and 0 < len(first) <= 100
    assert CountingFile.opened[-1].read_bytes < size / 8  # a few row groups, not the file
    rest = [doc for _, docs in chunks for doc in docs]
    assert first + rest == rows
    assert CountingFile.opened[-1].read_bytes >= size * 0.9


def test_reading_a_parquet_file_holds_a_batch_not_the_file(tmp_path) -> None:
    """Peak memory while reading all documents, in a fresh process: Python's (tracemalloc) and
    Arrow's (its memory pool's high-water mark), both far below the text's 48 MB (with batches of
    1 MB; the default, formats.BATCH_BYTES, is 4 MB)."""
    letters = np.random.default_rng(1).integers(97, 123, (24_000, 2000), dtype=np.uint8)
    rows = [row.tobytes().decode("ascii") for row in letters]  # random: Parquet cannot shrink it
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": rows}), path, row_group_size=6000)
    del letters
    script = textwrap.dedent(f"""
        import json, tracemalloc, pyarrow as pa
        from domainlm.data import formats
        from domainlm.data.corpus import iter_documents
        formats.BATCH_BYTES = 1 << 20  # batches of ~500 rows of the 24,000
        tracemalloc.start()
        docs = chars = 0
        for _, chunk in iter_documents({str(path)!r}):
            docs += len(chunk); chars += sum(map(len, chunk))
        print(json.dumps([docs, chars, tracemalloc.get_traced_memory()[1],
                          pa.default_memory_pool().max_memory()]))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    docs, chars, python_peak, arrow_peak = json.loads(out.stdout)
    assert (docs, chars) == (len(rows), 2000 * len(rows))
    assert python_peak < chars / 8, python_peak  # ~2.5 MB: two batches of Python strings
    assert arrow_peak < chars / 4, arrow_peak  # ~9 MB: page buffers, whatever the file's size


# ----------------------------------------------------------------------------- bad input


def bad_inputs(folder: Path) -> dict[str, tuple[Path, list[str], str]]:
    """name -> (input, extra flags, what the one-line error must say)."""
    folder.mkdir()
    good = folder / "good.parquet"
    pq.write_table(
        pa.table({"text": ["a text"] * 50, "n": list(range(50))}), good, row_group_size=10
    )
    truncated = folder / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    csv_file = folder / "ragged.csv"
    csv_file.write_text("text,n\nfine,1\nbroken,2,3\n", encoding="utf-8")  # 3 fields, not 2
    twice = folder / "twice.csv"
    twice.write_text("text,text\nhello world,second\n", encoding="utf-8")
    from datasets import Dataset, DatasetDict, disable_progress_bars

    disable_progress_bars()
    split = Dataset.from_dict({"text": ["a"] * 5})
    DatasetDict(train=split, validation=split).save_to_disk(str(folder / "dict"))
    split.save_to_disk(str(folder / "broken"))
    arrow = next((folder / "broken").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:40])
    return {
        "missing column": (
            good,
            ["--text-column", "body"],
            "no column 'body' (its columns: text, n)",
        ),
        "not a text column": (good, ["--text-column", "n"], "column 'n' holds int64, not text"),
        "truncated parquet": (truncated, [], "not a readable Parquet file"),
        "ragged csv": (csv_file, [], "CSV file cannot be read"),
        "a csv column named twice": (twice, [], "2 columns are named 'text'; rename one"),
        "dataset dict": (folder / "dict", [], "splits train, validation; pass one split's folder"),
        "truncated arrow": (folder / "broken", [], "Arrow data file cannot be read"),
    }


COMMANDS = {
    "missing column": "train",
    "not a text column": "perplexity",
    "truncated parquet": "train",
    "ragged csv": "inspect",
    "a csv column named twice": "perplexity",
    "dataset dict": "train",
    "truncated arrow": "perplexity",
}


def cli_args(case: str, folder: Path, model: Path) -> tuple[list[str], str, Path]:
    """(argv for domainlm, the expected message, the input) of one bad-input case."""
    source, flags, message = bad_inputs(folder / "in")[case]
    out, command = folder / "out", COMMANDS[case]
    if command == "train":
        args = ["--train-file", str(source), "--output-dir", str(out)]
    elif command == "perplexity":
        args = ["--file", str(source), "--per-line", str(out) + ".jsonl"]
    else:
        args = ["--train-file", str(source), "--time-steps", "0"]
    return [command, "--model", str(model), *args, *flags], message, source


def assert_nothing_written(folder: Path, cache: Path) -> None:
    out = folder / "out"
    assert not out.exists() and not Path(str(out) + ".jsonl").exists()
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]


@pytest.mark.parametrize("case", list(COMMANDS))
def test_bad_tables_are_one_line_exit_2_and_nothing_written(
    case, tmp_path, tiny_model_dir, isolated_cache, capsys
) -> None:
    """Through the command line's entry point (`cli.main`, as `domainlm` runs it): exit code 2,
    one line naming the file, no output folder, no per-line file, no cache file."""
    from domainlm.cli import main

    argv, message, source = cli_args(case, tmp_path, tiny_model_dir)
    capsys.readouterr()  # what writing the inputs printed
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and message in err and source.name in err, err
    assert_nothing_written(tmp_path, isolated_cache)


@pytest.mark.parametrize("case", ["missing column", "truncated parquet"])
def test_bad_tables_in_a_subprocess_exit_2_with_no_traceback(
    case, tmp_path, tiny_model_dir, isolated_cache
) -> None:
    argv, message, source = cli_args(case, tmp_path, tiny_model_dir)
    result = subprocess.run(
        [sys.executable, "-m", "domainlm", *argv], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert message in result.stderr and source.name in result.stderr, result.stderr
    assert_nothing_written(tmp_path, isolated_cache)


def test_a_refused_csv_exits_2_every_time(tmp_path, isolated_cache) -> None:
    """A CSV refused while its reader opens (empty, another column, ragged) leaves no Arrow
    thread calling into Python: `train` exits 2 each time, never aborts at exit (134: about one
    run in three, with the reader on a Python file handle and OMP_NUM_THREADS=1, as torchrun
    sets it). Six processes per file."""
    files = [tmp_path / "empty.csv", tmp_path / "other.csv", tmp_path / "ragged.csv"]
    files[0].write_text("")
    files[1].write_text("id,body\n1,the cat\n")
    files[2].write_text("text\na b\nc,d,e\n")
    runs = [
        subprocess.run(
            [
                sys.executable,
                "-m",
                "domainlm",
                "train",
                "--model",
                "scratch:tiny",
                "--train-file",
                str(f),
                "--output-dir",
                str(tmp_path / "out"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        for f in files
        for _ in range(6)
    ]
    codes, errors = [r.returncode for r in runs], [r.stderr for r in runs]
    assert codes == [2] * len(runs), list(zip(codes, errors, strict=True))
    assert all(e.count("\n") == 1 and ("cannot be read" in e or "no column" in e) for e in errors)


def test_a_dictionary_encoded_text_column_is_text(tmp_path) -> None:
    """pandas' `category` of strings is written to Parquet as a dictionary of strings: the same
    documents as the plain column (it was refused as "not text ... it has no text column")."""
    texts = ["the cat sat on the mat", "a dog ran away", None, "the cat sat on the mat"] * 5
    plain, coded = tmp_path / "plain.parquet", tmp_path / "coded.parquet"
    pq.write_table(pa.table({"text": pa.array(texts)}), plain)
    pq.write_table(pa.table({"text": pa.array(texts).dictionary_encode()}), coded)
    assert pa.types.is_dictionary(pq.read_schema(coded).field("text").type)
    read = [[doc for _, docs in iter_documents(p) for doc in docs] for p in (plain, coded)]
    assert read[0] == read[1] == [t for t in texts if t]
