"""Data lint: the problems that silently spoil a run, found before training starts.

Per file: empty lines, exact duplicate lines (count and the most repeated examples), control
characters, CRLF line ends, a byte-order mark, invalid UTF-8 (line numbers), very short lines,
lines that contain the text of one of the tokenizer's special tokens (`<|endoftext|>`, `[SEP]`);
for a validation file, its lines that also appear in the training data (leakage); and, from the
token stream, documents longer than the block size (they cannot fit in one block or window).

The text pass reads each file in chunks (`corpus.iter_chunks`), so it runs in bounded memory:
each line costs one 8-byte hash. Its results are cached beside the token cache, keyed on the
corpus fingerprints, so a second run over a 1 GB file does not pay for it again.

A table (.parquet, .csv, a save_to_disk folder) is linted row by row, streaming, on its text
column: a row is a line (its row number the line number), a null or blank row an empty line; the
checks that are about bytes on disk (CRLF, byte-order mark, invalid UTF-8) do not apply.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from domainlm.data.corpus import (
    MAX_LINE_NUMBERS,
    corpus_fingerprint,
    iter_chunks,
    lines_shown,
    text_files,
)
from domainlm.data.formats import (
    DEFAULT_TEXT_COLUMN,
    is_json_lines,
    is_table,
    iter_text_batches,
)
from domainlm.data.tokens import default_cache_dir

# 3: .jsonl text field; 4: CRLF one character; 5: "file:line" in folders, bare CRs;
# 6: any case of a suffix (D.JSONL is records), .json read as JSON Lines
LINT_VERSION = "6"
SHORT_LINE_CHARS = 10  # a non-empty line under this many characters is "very short"
MAX_EXAMPLES = 3
CONTROL_CHARS = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
BOM = b"\xef\xbb\xbf"  # UTF-8's byte-order mark


@dataclass
class FileLint:
    """What the text pass found in one --train-file / --validation-file (file or folder)."""

    path: str
    lines: int = 0
    characters: int = 0
    empty_lines: int = 0
    duplicate_lines: int = 0  # lines that repeat an earlier line exactly (extra copies)
    duplicate_examples: list[tuple[str, int]] = field(default_factory=list)  # (text, copies)
    short_lines: int = 0
    crlf_lines: int = 0
    lone_carriage_returns: int = 0  # CRs with no LF after them: old Mac line ends, not line ends
    bom: bool = False
    bom_files: list[str] = field(default_factory=list)  # which, in a folder of several files
    # Where lines are: a file's line numbers, or in a folder "file:line" (its relative path)
    control_char_lines: list[int | str] = field(default_factory=list)  # the first ones
    control_char_count: int = 0
    invalid_utf8_lines: list[int | str] = field(default_factory=list)
    invalid_utf8_count: int = 0
    special_token_count: int = 0  # lines holding special-token text (encoded as plain text)
    special_token_lines: list[int | str] = field(default_factory=list)  # the first ones
    special_token_texts: list[str] = field(default_factory=list)  # which ones were seen
    leaked_lines: int | None = None  # validation only: its lines also found in the train data
    leaked_examples: list[str] = field(default_factory=list)
    long_documents: int | None = None  # documents of more tokens than the block size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LintReport:
    train: FileLint
    validation: FileLint | None = None

    def warnings(self, doc_sep: str = "line", block_size: int | None = None) -> list[str]:
        out = file_warnings(self.train, doc_sep, block_size)
        if self.validation is not None:
            out += file_warnings(self.validation, doc_sep, block_size)
        return out


def file_warnings(lint: FileLint, doc_sep: str, block_size: int | None) -> list[str]:
    """One line per problem found, naming the file and what to do."""
    p, out = lint.path, []
    if lint.invalid_utf8_count:
        out.append(
            f"{p}: {lint.invalid_utf8_count} line(s) of invalid UTF-8, e.g. line(s) "
            f"{lines_shown(lint.invalid_utf8_lines)}"
        )
    if lint.empty_lines and doc_sep == "line":
        out.append(f"{p}: {lint.empty_lines} empty line(s) (skipped)")
    if lint.duplicate_lines:
        examples = "; ".join(f"{_short(t)!r} x{n}" for t, n in lint.duplicate_examples)
        out.append(f"{p}: {lint.duplicate_lines} exact duplicate line(s), e.g. {examples}")
    if lint.leaked_lines:
        examples = "; ".join(repr(_short(t)) for t in lint.leaked_examples)
        out.append(
            f"{p}: {lint.leaked_lines} validation line(s) also appear in the training data "
            f"(leakage: validation perplexity will be optimistic), e.g. {examples}"
        )
    if lint.long_documents:
        what = "line(s)" if doc_sep == "line" else "document(s)"
        out.append(
            f"{p}: {lint.long_documents} {what} longer than the block size of {block_size} "
            "tokens (split across blocks; their start is cut from the context of their end)"
        )
    if lint.special_token_count:
        seen = ", ".join(lint.special_token_texts)
        out.append(
            f"{p}: {lint.special_token_count} line(s) contain special-token text ({seen}), e.g. "
            f"line(s) {lines_shown(lint.special_token_lines)}; it is read as plain text, not as the "
            "special token (documents end only where --doc-sep says)"
        )
    if lint.control_char_count:
        out.append(
            f"{p}: {lint.control_char_count} line(s) with control characters, e.g. line(s) "
            f"{lines_shown(lint.control_char_lines)}"
        )
    if lint.crlf_lines:
        out.append(f"{p}: {lint.crlf_lines} line(s) end in CRLF (Windows); the CR is dropped")
    if lint.lone_carriage_returns:
        out.append(
            f"{p}: {lint.lone_carriage_returns} carriage return(s) with no line feed after them "
            "(old Mac line ends?): only a line feed ends a line, so the text around them is read "
            "as one line; convert them to line feeds (e.g. tr '\\r' '\\n') if they end lines"
        )
    if lint.bom_files:
        shown = ", ".join(lint.bom_files[:MAX_EXAMPLES]) + (
            " ..." if len(lint.bom_files) > MAX_EXAMPLES else ""
        )  # fmt: skip
        out.append(f"{p}: {len(lint.bom_files)} file(s) start with a UTF-8 byte-order mark "
                   f"(dropped): {shown}")  # fmt: skip
    elif lint.bom:
        out.append(f"{p}: starts with a UTF-8 byte-order mark (dropped)")
    if lint.short_lines:
        out.append(
            f"{p}: {lint.short_lines} very short line(s) (under {SHORT_LINE_CHARS} characters)"
        )
    return out


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------- the text pass


def _has_records(file: Path) -> bool:
    """A table or a .jsonl (.json) file: its texts are fields of records, not its lines."""
    return is_table(file) or is_json_lines(file)


def _iter_file_lines(path: str | os.PathLike) -> Iterator[tuple[Path, int, bytes]]:
    """(file, first line number, chunk) over all plain text files of a file or folder."""
    for file in text_files(path):
        if not _has_records(file):
            for first, chunk in iter_chunks(file):
                yield file, first, chunk


def _placer(path: str | os.PathLike, file: Path, files: int) -> Callable[[int], int | str]:
    """How a line (or row) of `file` is named in a lint of `path`, which holds `files` files:
    its number where that is the only one, else "relative/path:number" (line numbers alone
    would not say which file; a saved dataset's shards number their rows each from 1)."""
    root = Path(path)
    if files < 2 or not root.is_dir():
        return lambda number: number
    name = file.relative_to(root).as_posix() if file.is_relative_to(root) else str(file)
    return lambda number: f"{name}:{number}"


def _iter_table_rows(
    path: str | os.PathLike, text_column: str
) -> Iterator[tuple[Path, int, list[str | None]]]:
    """(file, first row number, texts) per batch over all table and .jsonl files of a file or folder:
    a .jsonl line's row is its `text_column` field, as training reads it (None where a line is
    blank or has no such string field: training refuses those with their line number)."""
    for file in text_files(path):
        if is_table(file):
            for batch in iter_text_batches(file, text_column, "replace"):
                yield file, batch.first_row, batch.texts
        elif _has_records(file):
            for first, chunk in iter_chunks(file):
                codec = "utf-8-sig" if first == 1 else "utf-8"  # a BOM dropped, as training does
                lines = chunk.decode(codec, errors="replace").split("\n")
                if lines and lines[-1] == "":
                    lines.pop()  # the piece after the final line end
                yield file, first, [_jsonl_field(line, text_column) for line in lines]


def _jsonl_field(line: str, text_column: str) -> str | None:
    try:
        record = json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None
    text = record.get(text_column) if isinstance(record, dict) else None
    return text if isinstance(text, str) else None


def _special_pattern(special_tokens: Sequence[str]) -> re.Pattern[bytes] | None:
    """A byte pattern matching any of the special-token strings (None when there are none)."""
    texts = sorted({t for t in special_tokens if t}, key=len, reverse=True)
    if not texts:
        return None
    return re.compile(b"|".join(re.escape(t.encode("utf-8")) for t in texts))


def _scan(
    path: str | os.PathLike,
    special_tokens: Sequence[str] = (),
    text_column: str = DEFAULT_TEXT_COLUMN,
) -> tuple[FileLint, np.ndarray]:
    """The lint of one input, and the hashes of its non-empty lines (CR dropped), in order."""
    lint = FileLint(str(path))
    special = _special_pattern(special_tokens)
    hashes: list[np.ndarray] = []
    files = len(text_files(path))
    for file, first, texts in _iter_table_rows(path, text_column):
        place = _placer(path, file, files)
        if first == 1 and is_json_lines(file):  # its text read without the mark, as a .txt
            with open(file, "rb") as handle:
                _note_bom(lint, place, handle.read(len(BOM)))
        hashes.append(_scan_rows(lint, special, first, texts, place))
    for file, first, chunk in _iter_file_lines(path):
        place = _placer(path, file, files)
        if first == 1 and _note_bom(lint, place, chunk):
            chunk = chunk[len(BOM) :]
        lines = chunk.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()  # the piece after the final line end
        lint.lines += len(lines)
        crs = chunk.count(b"\r\n")  # a CRLF line end is one character, as LF is
        lint.crlf_lines += crs
        ends_in_cr = chunk.endswith(b"\r")  # a last line with no LF: its CR ends it too
        lint.lone_carriage_returns += chunk.count(b"\r") - crs - ends_in_cr
        try:
            lint.characters += len(chunk.decode("utf-8")) - crs
        except UnicodeDecodeError:
            lint.characters += len(chunk.decode("utf-8", errors="replace")) - crs
            bad = [place(n) for n, line in enumerate(lines, start=first) if not _is_utf8(line)]
            lint.invalid_utf8_count += len(bad)
            lint.invalid_utf8_lines += bad[: MAX_LINE_NUMBERS - len(lint.invalid_utf8_lines)]
        for match in CONTROL_CHARS.finditer(chunk):
            number = place(first + chunk.count(b"\n", 0, match.start()))
            if not lint.control_char_lines or lint.control_char_lines[-1] != number:
                lint.control_char_count += 1
                if len(lint.control_char_lines) < MAX_LINE_NUMBERS:
                    lint.control_char_lines.append(number)
        if special is not None:
            _find_special(lint, special, first, chunk, place)
        stripped = [line.rstrip(b"\r") for line in lines]
        kept = [line for line in stripped if line.strip()]
        lint.empty_lines += len(stripped) - len(kept)
        lint.short_lines += sum(1 for line in kept if len(line.strip()) < SHORT_LINE_CHARS)
        hashes.append(np.fromiter((hash(line) for line in kept), dtype=np.int64, count=len(kept)))
    return lint, np.concatenate([np.zeros(0, np.int64), *hashes])


def _note_bom(lint: FileLint, place: Callable[[int], int | str], start: bytes) -> bool:
    """Whether a file's first bytes `start` are a byte-order mark; counted in `lint` if so."""
    if not start.startswith(BOM):
        return False
    lint.bom = True
    named = place(1)
    if isinstance(named, str):  # "file:1": a folder's file
        lint.bom_files.append(named.rsplit(":", 1)[0])
    return True


def _scan_rows(
    lint: FileLint,
    special: re.Pattern[bytes] | None,
    first: int,
    texts: list[str | None],
    place: Callable[[int], int | str],
) -> np.ndarray:
    """Lint one batch of table rows (row = line); the hashes of its non-empty rows' UTF-8."""
    lint.lines += len(texts)
    kept: list[bytes] = []
    for number, text in enumerate(texts, start=first):
        if text is None or not text.strip():
            lint.empty_lines += 1
            continue
        data = text.encode("utf-8")
        kept.append(data)
        lint.characters += len(text)
        lint.short_lines += len(text.strip()) < SHORT_LINE_CHARS
        if CONTROL_CHARS.search(data):
            lint.control_char_count += 1
            if len(lint.control_char_lines) < MAX_LINE_NUMBERS:
                lint.control_char_lines.append(place(number))
        seen = {m.group().decode("utf-8") for m in special.finditer(data)} if special else set()
        if seen:
            lint.special_token_count += 1
            if len(lint.special_token_lines) < MAX_LINE_NUMBERS:
                lint.special_token_lines.append(place(number))
            lint.special_token_texts += sorted(seen - set(lint.special_token_texts))
    return np.fromiter((hash(data) for data in kept), dtype=np.int64, count=len(kept))


def _find_special(
    lint: FileLint,
    special: re.Pattern[bytes],
    first: int,
    chunk: bytes,
    place: Callable[[int], int | str],
) -> None:
    """Count the lines of `chunk` (first line number `first`) holding special-token text."""
    position, number, last = 0, first, 0
    for match in special.finditer(chunk):
        number += chunk.count(b"\n", position, match.start())
        position = match.start()
        text = match.group().decode("utf-8")
        if text not in lint.special_token_texts:
            lint.special_token_texts.append(text)
        if number != last:
            last = number
            lint.special_token_count += 1
            if len(lint.special_token_lines) < MAX_LINE_NUMBERS:
                lint.special_token_lines.append(place(number))


def _is_utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _texts_of(
    path: str | os.PathLike, wanted: set[int], limit: int, text_column: str = DEFAULT_TEXT_COLUMN
) -> dict[int, str]:
    """The first line text of each wanted hash (stops reading once all are found)."""
    found: dict[int, str] = {}
    for _, _, texts in _iter_table_rows(path, text_column):
        for text in texts:
            if text is not None and hash(data := text.encode("utf-8")) in wanted:
                found.setdefault(hash(data), text.strip())
                if len(found) >= min(limit, len(wanted)):
                    return found
    for _, first, chunk in _iter_file_lines(path):
        if first == 1 and chunk.startswith(BOM):
            chunk = chunk[len(BOM) :]  # as the scan reads it: the first line's text, no mark
        for line in chunk.split(b"\n"):
            line = line.rstrip(b"\r")
            h = hash(line)
            if h in wanted and h not in found:
                found[h] = line.decode("utf-8", errors="replace").strip()
                if len(found) >= min(limit, len(wanted)):
                    return found
    return found


def _duplicates(
    lint: FileLint, path: str | os.PathLike, hashes: np.ndarray, text_column: str
) -> np.ndarray:
    """Fill the duplicate counts and examples; returns the unique hashes."""
    unique, counts = np.unique(hashes, return_counts=True)
    lint.duplicate_lines = int(len(hashes) - len(unique))
    if lint.duplicate_lines:
        top = np.argsort(-counts, kind="stable")[:MAX_EXAMPLES]
        top = [i for i in top if counts[i] > 1]
        texts = _texts_of(path, {int(unique[i]) for i in top}, MAX_EXAMPLES, text_column)
        lint.duplicate_examples = [(texts.get(int(unique[i]), "?"), int(counts[i])) for i in top]
    return unique


def lint_corpus(
    train_file: str | os.PathLike,
    validation_file: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    special_tokens: Sequence[str] = (),
    text_column: str = DEFAULT_TEXT_COLUMN,
) -> LintReport:
    """The text lint of the training (and validation) input, read from the lint cache if there.

    `special_tokens`: the tokenizer's special-token strings to look for (`special_token_texts`);
    `text_column`: the column (or .jsonl field) of tables that holds the text.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    key_text = "|".join(
        [
            LINT_VERSION,
            corpus_fingerprint(train_file),
            corpus_fingerprint(validation_file) if validation_file else "-",
            str(train_file),
            str(validation_file),
            "\0".join(special_tokens),
            text_column,
        ]
    )
    cached = cache / f"lint-{hashlib.sha256(key_text.encode()).hexdigest()[:24]}.json"
    if cached.is_file():
        try:
            return _report_from_dict(json.loads(cached.read_text(encoding="utf-8")))
        except (ValueError, TypeError, KeyError):
            pass  # an unreadable cache entry is recomputed
    train, train_hashes = _scan(train_file, special_tokens, text_column)
    train_unique = _duplicates(train, train_file, train_hashes, text_column)
    del train_hashes
    validation = None
    if validation_file:
        validation, valid_hashes = _scan(validation_file, special_tokens, text_column)
        _duplicates(validation, validation_file, valid_hashes, text_column)
        leaked = np.isin(valid_hashes, train_unique)
        validation.leaked_lines = int(leaked.sum())
        if validation.leaked_lines:
            wanted = {int(h) for h in valid_hashes[leaked][:MAX_EXAMPLES]}
            validation.leaked_examples = list(
                _texts_of(validation_file, wanted, MAX_EXAMPLES, text_column).values()
            )
    report = LintReport(train, validation)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_report_to_dict(report)), encoding="utf-8")
    os.replace(tmp, cached)
    return report


def count_long_documents(doc_starts: np.ndarray, block_size: int, prefix_length: int = 0) -> int:
    """Documents whose segment (leading EOS + tokens, or BOS prefix + tokens) does not fit in
    one block."""
    lengths = np.diff(np.asarray(doc_starts, dtype=np.int64))  # tokens + the EOS after each
    if prefix_length:
        lengths -= 1  # prefix + tokens + EOS: the EOS predicts only the next BOS
    return int((lengths > block_size).sum())


def _report_to_dict(report: LintReport) -> dict[str, Any]:
    return {
        "train": report.train.to_dict(),
        "validation": report.validation.to_dict() if report.validation else None,
    }


def _file_from_dict(data: dict[str, Any]) -> FileLint:
    data = dict(data)
    data["duplicate_examples"] = [tuple(x) for x in data["duplicate_examples"]]
    return FileLint(**data)


def _report_from_dict(data: dict[str, Any]) -> LintReport:
    valid = data.get("validation")
    return LintReport(_file_from_dict(data["train"]), _file_from_dict(valid) if valid else None)


# A share of a text's tokens being the tokenizer's unknown token above which lint says so: the
# tokenizer does not cover the text (another script; emoji under a BERT-style vocabulary).
UNKNOWN_SHARE_WARNED = 0.01


def unknown_token(tokenizer: Any, eos_id: int) -> tuple[int | None, str]:
    """The tokenizer's own unknown token ([UNK], <unk>): its id and text; no id where it has
    none, or where it is a token the stream holds anyway (GPT-2's unk_token is <|endoftext|>,
    every document's EOS)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    ends = {
        eos_id,
        getattr(tokenizer, "bos_token_id", None),
        getattr(tokenizer, "pad_token_id", None),
    }
    if not isinstance(unk, int) or unk in ends:
        return None, ""
    return unk, str(getattr(tokenizer, "unk_token", ""))


def unknown_token_warnings(
    streams: Sequence[tuple[str, Any]], unknown_id: int | None, unknown_text: str
) -> list[str]:
    """One warning per (name, TokenStream) whose tokens are UNKNOWN_SHARE_WARNED or more the
    unknown token: the model would learn and be scored on that token in place of the text."""
    if unknown_id is None:
        return []
    found = []
    for name, stream in streams:
        count, total = int(np.count_nonzero(stream.tokens == unknown_id)), stream.num_predicted
        if total and count / total >= UNKNOWN_SHARE_WARNED:
            found.append(
                f"{name}: {count:,} of its {total:,} tokens ({count / total:.1%}) are the "
                f"tokenizer's unknown token {unknown_text}: its vocabulary does not cover this "
                "text (another script, emoji?); the model learns and is scored on that token in "
                "their place: choose a model whose tokenizer covers the text"
            )
    return found


def check_training_data(
    config: Any,
    block_size: int,
    train_stream: Any,
    valid_stream: Any,
    console: Any,
    special_tokens: Sequence[str] = (),
    unknown: tuple[int | None, str] = (None, ""),
) -> list[str]:
    """Lint at the start of `train`: warnings on the console, or with --strict one UserError.
    `unknown`: the tokenizer's unknown token and its text (`unknown_token`).

    Runs after the token streams are loaded and before the output folder is touched.
    """
    from domainlm.errors import UserError

    report = lint_corpus(
        config.train_file,
        config.validation_file,
        config.cache_dir,
        special_tokens,
        getattr(config, "text_column", DEFAULT_TEXT_COLUMN),
    )
    train_long = count_long_documents(
        train_stream.doc_starts, block_size, train_stream.prefix_length
    )
    valid_long = count_long_documents(
        valid_stream.doc_starts, block_size, valid_stream.prefix_length
    )
    if report.validation is None:
        report.train.long_documents = train_long + valid_long
        if report.train.duplicate_lines:
            report.train.leaked_lines = None
    else:
        report.train.long_documents = train_long
        report.validation.long_documents = valid_long
    problems = report.warnings(config.doc_sep, block_size)
    named = [(str(config.train_file), train_stream)]
    named += [(str(config.validation_file), valid_stream)] if config.validation_file else []
    problems += unknown_token_warnings(named, *unknown)
    if report.validation is None and report.train.duplicate_lines:
        problems.append(
            f"{config.train_file}: with no --validation-file, copies of a duplicated line can land "
            "on both sides of the held-out split (leakage)"
        )
    if config.strict and problems:
        raise UserError(f"--strict: {len(problems)} data problem(s): " + " | ".join(problems))
    for problem in problems:
        console.warn(problem)
    return problems
