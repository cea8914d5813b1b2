"""Tables as text: the rows of one column of a .parquet, .csv or Hugging Face dataset folder.

Every table format yields the same thing, batches of `(row number, text or None)`, read
streaming with pyarrow so that a file larger than memory is never held in it:

- `.parquet`: `ParquetFile.iter_batches` over the one column, with buffered column-chunk reads
  (`buffer_size`, no pre-buffering), so memory is a batch of rows, not a row group or the file.
- `.csv`: pyarrow's streaming CSV reader (`pyarrow.csv.open_csv`), one block at a time, with
  quoted values that span lines; every CSV column is text (no type inference on the column read).
- a folder written by `datasets.Dataset.save_to_disk` (`state.json` + `data-*.arrow`): its Arrow
  IPC stream files, memory-mapped, in the order `state.json` lists them (`datasets` is not needed).
  A `DatasetDict` folder (`dataset_dict.json`) is refused: name one split's folder.

A row is a document; rows whose text is null, empty or only whitespace are skipped (as blank
lines are). `--doc-sep` does not apply (as for .jsonl). Bad input (no such column, a column that
is not text, a corrupt or truncated file) is one `UserError` line naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from domainlm.errors import UserError

TABLE_SUFFIXES = (".parquet", ".csv", ".arrow")
# Records of one JSON object per line; `.json` too (what run_clm.py's --train_file means by it)
JSON_LINES_SUFFIXES = (".jsonl", ".json")
DEFAULT_TEXT_COLUMN = "text"
BATCH_BYTES = 4 << 20  # aim: this much text per batch
MIN_BATCH_ROWS, MAX_BATCH_ROWS = 16, 65536
READ_BUFFER_BYTES = 1 << 20
HF_STATE = "state.json"
HF_DICT = "dataset_dict.json"


@dataclass
class TextBatch:
    """One batch of a table's text column: rows `first_row, first_row + 1, ...` (1-based)."""

    first_row: int
    texts: list[str | None]
    progress: int  # bytes of the file this batch stands for (for progress bars)


def suffix_of(file: str | Path) -> str:
    """A file's suffix, lower-cased: the one input to every choice of reader, so `X.CSV`,
    `D.JSONL` and `X.Parquet` are read as their lower-case twins are."""
    return Path(file).suffix.lower()


def is_table(file: Path) -> bool:
    return suffix_of(file) in TABLE_SUFFIXES


def is_json_lines(file: Path) -> bool:
    """A .jsonl (or .json) file: one JSON object per line, its text a field of each."""
    return suffix_of(file) in JSON_LINES_SUFFIXES


# ----------------------------------------------------------------------------- dataset folders


def dataset_folder_files(folder: Path) -> list[Path] | None:
    """The .arrow files of a `save_to_disk` folder, in order; None when `folder` is not one."""
    if (folder / HF_DICT).is_file():
        try:
            splits = json.loads((folder / HF_DICT).read_text(encoding="utf-8"))["splits"]
        except (ValueError, KeyError, TypeError):
            splits = sorted(p.name for p in folder.iterdir() if (p / HF_STATE).is_file())
        example = f"{folder}/{splits[0]}" if splits else f"{folder}/train"
        raise UserError(
            f"{folder}: a Hugging Face DatasetDict with splits {', '.join(map(str, splits))}; "
            f"pass one split's folder, e.g. {example}"
        )
    state = folder / HF_STATE
    if not state.is_file():
        return None
    try:
        entries = json.loads(state.read_text(encoding="utf-8"))["_data_files"]
        files = [folder / entry["filename"] for entry in entries]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{state}: not a readable datasets state.json ({exc})") from exc
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{folder}: state.json lists missing data file(s): {', '.join(missing)}")
    if not files:
        raise UserError(f"{folder}: the dataset folder lists no data files")
    return files


# ----------------------------------------------------------------------------- reading


def iter_text_batches(
    file: Path, text_column: str = DEFAULT_TEXT_COLUMN, encoding_errors: str = "strict"
) -> Iterator[TextBatch]:
    """The text column of a table file in batches of rows, read lazily (see module docstring)."""
    import pyarrow as pa

    readers = {".parquet": _parquet_batches, ".csv": _csv_batches, ".arrow": _arrow_batches}
    batches = readers[suffix_of(file)](file, text_column, encoding_errors)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError, UnicodeDecodeError, ValueError) as exc:
            hint = "; fix it or pass --encoding-errors replace" if "UTF8" in str(exc) else ""
            raise UserError(
                f"{file}: {_what(file)} cannot be read: {_one_line(exc)}{hint}"
            ) from exc
        yield batch


def check_table(file: Path, text_column: str = DEFAULT_TEXT_COLUMN) -> None:
    """Open a table and read its first batch: a UserError now for a bad column or file (invalid
    UTF-8 is left to the read itself, which knows --encoding-errors)."""
    for _ in iter_text_batches(file, text_column, "replace"):
        break


def _what(file: Path) -> str:
    return {".parquet": "Parquet file", ".csv": "CSV file"}.get(suffix_of(file), "Arrow data file")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def _check_column(file: Path, schema: Any, text_column: str) -> None:
    """The column exists and holds strings; otherwise a UserError naming what is there."""

    names = list(schema.names)
    if text_column not in names:
        shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
        raise UserError(
            f"{file}: no column {text_column!r} (its columns: {shown}); pick one with --text-column"
        )
    if names.count(text_column) > 1:  # a CSV header may name a column twice; which is meant?
        raise UserError(
            f"{file}: {names.count(text_column)} columns are named {text_column!r}; rename one in "
            "the header, or pick another with --text-column"
        )
    kind = schema.field(text_column).type
    if not holds_text(kind):
        texts = [f.name for f in schema if holds_text(f.type)]
        hint = f" (text columns: {', '.join(texts)})" if texts else " (it has no text column)"
        raise UserError(
            f"{file}: column {text_column!r} holds {kind}, not text; pick a text column with "
            f"--text-column{hint}"
        )


def holds_text(kind: Any) -> bool:
    """An Arrow type of text: string, large_string, string_view, or a dictionary of one of
    them (pandas' `category` of strings, written to Parquet)."""
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        return holds_text(kind.value_type)
    is_view = getattr(pa.types, "is_string_view", lambda _: False)(kind)
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or is_view


def _to_texts(column: Any, encoding_errors: str) -> list[str | None]:
    import pyarrow as pa

    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return [
            None if b is None else b.decode("utf-8", errors=encoding_errors)
            for b in column.to_pylist()
        ]
    return column.to_pylist()


def _batch_rows(average_bytes: float) -> int:
    rows = int(BATCH_BYTES / max(average_bytes, 1.0))
    return max(MIN_BATCH_ROWS, min(MAX_BATCH_ROWS, rows))


def _open_binary(file: Path) -> Any:
    """The file opened for reading (tests wrap it to count the bytes read)."""
    return open(file, "rb")


def _parquet_batches(file: Path, text_column: str, encoding_errors: str) -> Iterator[TextBatch]:
    import pyarrow.parquet as pq

    with _open_binary(file) as handle:
        try:
            reader = pq.ParquetFile(
                handle, buffer_size=READ_BUFFER_BYTES, pre_buffer=False, memory_map=False
            )
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a bad footer
            raise UserError(f"{file}: not a readable Parquet file: {_one_line(exc)}") from exc
        _check_column(file, reader.schema_arrow, text_column)
        meta, size = reader.metadata, file.stat().st_size
        index = reader.schema_arrow.get_field_index(text_column)
        text_bytes = sum(
            meta.row_group(i).column(index).total_uncompressed_size
            for i in range(meta.num_row_groups)
        )
        rows = max(meta.num_rows, 1)
        row, batch_size = 1, _batch_rows(text_bytes / rows)
        for batch in reader.iter_batches(batch_size=batch_size, columns=[text_column]):
            texts = _to_texts(batch.column(0), encoding_errors)
            yield TextBatch(row, texts, size * len(texts) // rows)
            row += len(texts)


def _csv_batches(file: Path, text_column: str, encoding_errors: str) -> Iterator[TextBatch]:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    kind = pa.string() if encoding_errors == "strict" else pa.binary()
    read = pcsv.ReadOptions(block_size=BATCH_BYTES)
    parse = pcsv.ParseOptions(newlines_in_values=True)
    # Arrow's own file, not a Python handle: the reader's read-ahead thread then never calls back
    # into Python, which aborted the process at exit (about 1 run in 4) after a refused CSV.
    with pa.OSFile(str(file)) as handle:
        header = pcsv.open_csv(handle, read_options=read, parse_options=parse)
        _check_column(
            file, pa.schema([pa.field(n, pa.string()) for n in header.schema.names]), text_column
        )
    convert = pcsv.ConvertOptions(
        column_types={text_column: kind}, include_columns=[text_column], strings_can_be_null=False
    )
    with pa.OSFile(str(file)) as handle:
        reader = pcsv.open_csv(
            handle, read_options=read, parse_options=parse, convert_options=convert
        )
        row, done = 1, 0
        for batch in reader:
            texts = _to_texts(batch.column(0), encoding_errors)
            position = handle.tell()
            yield TextBatch(row, texts, max(0, position - done))
            row, done = row + len(texts), max(done, position)


def _arrow_batches(file: Path, text_column: str, encoding_errors: str) -> Iterator[TextBatch]:
    import pyarrow as pa

    with pa.memory_map(str(file)) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)  # the random-access form, also .arrow
            batches: Any = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            batches = reader
        _check_column(file, reader.schema, text_column)
        index = reader.schema.get_field_index(text_column)
        row = 1
        for batch in batches:
            column = batch.column(index)
            step = _batch_rows(column.nbytes / max(len(column), 1))
            for start in range(0, len(column), step):
                piece = column.slice(start, step)
                texts = _to_texts(piece, encoding_errors)
                yield TextBatch(row, texts, piece.nbytes)  # uncompressed: ~ the file's bytes
                row += len(texts)
