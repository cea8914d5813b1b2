"""Large corpora: read text files in bounded chunks, tokenize them on all cores, key the cache fast.

A 1 GB file is never held in memory as text. It is read in chunks of `CHUNK_BYTES` cut at a line
end (or, with `--doc-sep blank`, at an empty line, so no document spans two chunks); each chunk
is decoded, split into documents exactly as `data.read_documents` does, and encoded with the
tokenizer's Rust batch encoder (`encode_batch_fast`: no offsets, parallel over all cores unless
TOKENIZERS_PARALLELISM=false) while the next chunk is read and split. Token ids go to a file on
disk as they come; at the end that file becomes the cache's `.npy`. Peak memory is a few chunks
of text and their token lists, whatever the size of the corpus.

Cache key (`corpus_fingerprint`): a file of up to `FULL_HASH_BYTES` is hashed whole (as before).
A larger file is keyed on its name, size, modification time (ns) and a SHA-256 of
`SAMPLES` evenly spaced 64 KiB samples plus its first and last MiB, so a second run over a 1 GB
file starts in well under a second instead of re-reading it. An edit changes the size or the
modification time; only an edit that keeps both and misses every sample would go unseen, so
`DOMAINLM_FULL_HASH=1` restores the full-content hash for those who rewrite files in place and
reset their timestamps.

Tables (`.parquet`, `.csv`, a `datasets.save_to_disk` folder; `formats.py`) are read in batches of
rows of their `--text-column`, each row a document, and keyed on the same fingerprint of their
files' bytes; the text column is part of the token cache's key (`tokens.load_token_stream`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from domainlm.config import RUN_FILE
from domainlm.data.formats import (
    DEFAULT_TEXT_COLUMN,
    check_table,
    dataset_folder_files,
    is_json_lines,
    is_table,
    iter_text_batches,
    suffix_of,
)
from domainlm.errors import UserError

CHUNK_BYTES = 4 << 20
FULL_HASH_BYTES = 64 << 20
SAMPLES = 64
SAMPLE_BYTES = 64 << 10
PROGRESS_MIN_BYTES = 32 << 20
MAX_LINE_NUMBERS = 10  # line numbers shown in one message or warning
TEXT_SUFFIXES = (".txt", ".jsonl", ".text")
FOLDER_SUFFIXES = (*TEXT_SUFFIXES, ".parquet", ".csv")


# ----------------------------------------------------------------------------- files


def text_files(path: str | os.PathLike) -> list[Path]:
    """The files behind a --train-file/--validation-file argument: the file, the .arrow files of a
    `datasets.save_to_disk` folder, or a folder's .txt/.jsonl/.parquet/.csv files (sorted; any
    case of the suffix), in its subfolders too, except hidden ones (`.git`, `.ipynb_checkpoints`,
    a name starting with a dot) and a domainlm run's folder (one holding a run_config.json: an
    --output-dir inside the data folder, whose metrics.jsonl is no text)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: no such file or folder")
    if p.is_dir():
        dataset = dataset_folder_files(p)
        if dataset is not None:
            return dataset
        files = []
        for root, folders, names in os.walk(p):
            here = Path(root)
            folders[:] = [
                name for name in folders
                if not name.startswith(".") and not (here / name / RUN_FILE).is_file()
            ]  # fmt: skip
            files += [
                here / name for name in names
                if not name.startswith(".") and suffix_of(name) in FOLDER_SUFFIXES
                and (here / name).is_file()
            ]  # fmt: skip
        if not files:
            raise UserError(f"{path}: the folder holds no .txt, .jsonl, .parquet or .csv files")
        return sorted(files)
    return [p]


def reader_key_parts(path: str | os.PathLike) -> list[str]:
    """Token cache key parts for an input holding a file whose reader changed: a .json file (once
    read as plain lines, now as JSON Lines) or a record file with an upper-case suffix
    (`D.JSONL`, `X.CSV`: once plain lines too). None for the rest, whose keys stay the same."""
    changed = any(
        suffix_of(f) == ".json" or (f.suffix != suffix_of(f) and (is_json_lines(f) or is_table(f)))
        for f in text_files(path)
    )
    return ["readers=case-insensitive,json"] if changed else []


def bare_carriage_returns(path: str | os.PathLike, limit: int = CHUNK_BYTES) -> bool:
    """Whether the text files of an input hold a carriage return not followed by a line feed
    (old Mac line ends), other than a file's last byte; the first `limit` bytes of each file."""
    for file in text_files(path):
        if is_table(file) or is_json_lines(file):
            continue
        with open(file, "rb") as handle:
            head = handle.read(limit)
        if re.search(rb"\r(?!\n)", head.rstrip(b"\r")):
            return True
    return False


def check_input(path: str | os.PathLike, text_column: str = DEFAULT_TEXT_COLUMN) -> list[Path]:
    """`text_files`, and each table's column checked (its first batch read): bad input fails here,
    before anything is written."""
    files = text_files(path)
    for file in files:
        if is_table(file):
            check_table(file, text_column)
    return files


# ----------------------------------------------------------------------------- cache key


def corpus_fingerprint(path: str | os.PathLike) -> str:
    """A hash of a file or folder's text files that is fast for gigabytes (see module docstring)."""
    full = os.environ.get("DOMAINLM_FULL_HASH", "") not in ("", "0")
    digest = hashlib.sha256()
    for file in text_files(path):
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        if full or size <= FULL_HASH_BYTES:
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
        else:
            digest.update(f"sampled\0{file.stat().st_mtime_ns}\0".encode())
            digest.update(_sampled_bytes_digest(file, size))
    return digest.hexdigest()


def _sampled_bytes_digest(file: Path, size: int) -> bytes:
    """SHA-256 of the first and last MiB and SAMPLES evenly spaced SAMPLE_BYTES pieces."""
    digest = hashlib.sha256()
    step = max(1, size // (SAMPLES + 1))
    pieces = [(0, 1 << 20), (max(0, size - (1 << 20)), 1 << 20)]
    pieces += [(i * step, SAMPLE_BYTES) for i in range(1, SAMPLES + 1)]
    with open(file, "rb") as handle:
        for offset, length in pieces:
            handle.seek(offset)
            digest.update(handle.read(length))
    return digest.digest()


# ----------------------------------------------------------------------------- chunked reading


def iter_chunks(
    file: Path, doc_sep: str = "line", chunk_bytes: int | None = None
) -> Iterator[tuple[int, bytes]]:
    """(number of the chunk's first line, chunk bytes); each chunk ends at a document boundary."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    line_number = 1
    carry = b""
    with open(file, "rb") as handle:
        while True:
            data = handle.read(chunk_bytes)
            if not data:
                if carry:
                    yield line_number, carry
                return
            buffer = carry + data
            cut = _last_boundary(buffer, doc_sep)
            if cut <= 0:
                carry = buffer
                continue
            chunk, carry = buffer[:cut], buffer[cut:]
            yield line_number, chunk
            line_number += chunk.count(b"\n")


def _last_boundary(buffer: bytes, doc_sep: str) -> int:
    """Index just after the last line end (line) or the last empty line (blank); -1 if none."""
    if doc_sep != "blank":
        at = buffer.rfind(b"\n")
        return at + 1 if at >= 0 else -1
    at = max(buffer.rfind(b"\n\n") + 2, buffer.rfind(b"\n\r\n") + 3)
    return at if at > 3 else -1


def decode_chunk(file: Path, first_line: int, chunk: bytes, encoding_errors: str) -> str:
    """UTF-8 text of a chunk (a BOM dropped at the file start); bad bytes name their lines."""
    codec = "utf-8-sig" if first_line == 1 else "utf-8"
    if first_line == 1:
        refuse_non_text(file, chunk[: 1 << 20])
    try:
        return chunk.decode(codec)
    except UnicodeDecodeError:
        if encoding_errors == "replace":
            return chunk.decode(codec, errors="replace")
    raise UserError(invalid_utf8_message(file, chunk, first_line))


# (first bytes, what the file is, how to decompress it); bz2's magic with its first block's
# header (1AY&SY), so that no text that happens to start with "BZh" is taken for one
COMPRESSED_MAGIC = (
    (re.compile(rb"\x1f\x8b"), "gzip-compressed", "gzip -dc FILE > OUT"),
    (re.compile(rb"BZh[1-9]1AY&SY"), "bzip2-compressed", "bzip2 -dc FILE > OUT"),
    (re.compile(rb"\xfd7zXZ\x00"), "xz-compressed", "xz -dc FILE > OUT"),
    (re.compile(rb"\x28\xb5\x2f\xfd"), "zstd-compressed", "zstd -dc FILE > OUT"),
    (re.compile(rb"PK\x03\x04"), "a zip archive", "unzip FILE, then give the files it holds"),
)
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")
# UTF-32's marks first: UTF-32-LE's starts with UTF-16-LE's
UNICODE_BOMS = (
    (b"\xff\xfe\x00\x00", "utf-32"),
    (b"\x00\x00\xfe\xff", "utf-32"),
    (b"\xff\xfe", "utf-16"),
    (b"\xfe\xff", "utf-16"),
)


def refuse_non_text(file: Path, head: bytes) -> None:
    """The one place that tells a file that is not UTF-8 text by its first bytes `head`: a
    compressed file or archive, UTF-16/32 text (its byte-order mark), or NUL bytes (binary).
    A UserError saying what it is and what to do; nothing when it may be text."""
    for magic, what, command in COMPRESSED_MAGIC:
        if magic.match(head):
            plain = (
                file.with_suffix("") if suffix_of(file) in COMPRESSED_SUFFIXES
                else file.with_name(f"{file.stem}.decompressed{file.suffix}")
            )  # fmt: skip
            command = command.replace("FILE", str(file)).replace("OUT", str(plain))
            raise UserError(f"{file}: is {what}, not text; decompress it first: {command}")
    for bom, codec in UNICODE_BOMS:
        if head.startswith(bom):
            raise UserError(
                f"{file}: is {codec.upper()} text (it starts with a {codec.upper()} byte-order "
                f"mark), not UTF-8; convert it: iconv -f {codec} -t utf-8 {file} > {file}.utf8.txt"
            )
    if b"\x00" in head:
        raise UserError(
            f"{file}: looks like a binary file, not text: NUL bytes on line(s) "
            f"{lines_shown(nul_lines(head, 1))}; give a text file, or if "
            "this is one remove its NUL bytes (tr -d '\\000')"
        )


def invalid_utf8_message(file: Path, chunk: bytes, first_line: int) -> str:
    """The refusal of a chunk with invalid UTF-8: its lines, and iconv's command first where the
    bad lines read as Chinese in GB18030 (GBK, GB2312), whose text `replace` would ruin."""
    bad = invalid_utf8_lines(chunk, first_line)
    shown = f"{file}: invalid UTF-8 on line(s) {lines_shown(bad)}"
    lines = chunk.split(b"\n")
    if reads_as_gb18030([lines[n - first_line] for n in bad[:1000]]):
        return (
            f"{shown}; it reads as GB18030/GBK (Chinese) text: convert it first with "
            f"iconv -f gb18030 -t utf-8 {file} > {file}.utf8.txt (--encoding-errors replace "
            "would go on, turning each bad character into U+FFFD)"
        )
    return f"{shown}; fix the file or pass --encoding-errors replace"


def reads_as_gb18030(lines: list[bytes]) -> bool:
    """Whether lines that are not UTF-8 are GB18030 text: nine in ten decode in it, and into
    CJK characters (Latin-1 accents decode too, now and then, but rarely as whole lines)."""
    texts = [line.decode("gb18030", errors="replace") for line in lines]
    decoded = [text for text in texts if "\ufffd" not in text]
    has_cjk = any("\u4e00" <= c <= "\u9fff" for text in decoded for c in text)
    return bool(lines) and len(decoded) >= 0.9 * len(lines) and has_cjk


def invalid_utf8_lines_shown(chunk: bytes, first_line: int) -> str:
    """The numbers of the chunk's lines that are not UTF-8, the first ten, for a message."""
    return lines_shown(invalid_utf8_lines(chunk, first_line))


def lines_shown(numbers: list[int]) -> str:
    """Line numbers for a message: the first MAX_LINE_NUMBERS, then "..." if there are more."""
    shown = ", ".join(map(str, numbers[:MAX_LINE_NUMBERS]))
    return shown + (" ..." if len(numbers) > MAX_LINE_NUMBERS else "")


def nul_lines(chunk: bytes, first_line: int) -> list[int]:
    """The numbers of the chunk's lines that hold a NUL byte."""
    return [n for n, line in enumerate(chunk.split(b"\n"), start=first_line) if b"\x00" in line]


def invalid_utf8_lines(chunk: bytes, first_line: int) -> list[int]:
    bad = []
    for number, line in enumerate(chunk.split(b"\n"), start=first_line):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            bad.append(number)
    return bad


def chunk_documents(
    file: Path, first_line: int, text: str, doc_sep: str, text_column: str = DEFAULT_TEXT_COLUMN
) -> list[str]:
    """The documents of one decoded chunk, with the rules of `data.read_documents`."""
    numbered = chunk_numbered_documents(file, first_line, text, doc_sep, text_column)
    return [doc for _, doc in numbered]


def chunk_numbered_documents(
    file: Path, first_line: int, text: str, doc_sep: str, text_column: str = DEFAULT_TEXT_COLUMN
) -> list[tuple[int, str]]:
    """(line number where it starts, document) for each document of one decoded chunk.

    The one place the splitting rules live: training, validation and `domainlm perplexity` all
    come here. A line end is LF or CRLF (the CR is dropped); a line of only whitespace is blank;
    `line`: each non-blank line is a document; `blank`: runs of non-blank lines joined by LF are.
    A .jsonl line gives its `text_column` field.
    """
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    if is_json_lines(file):
        return _jsonl_texts(file, first_line, lines, text_column)
    if doc_sep == "blank":
        docs: list[tuple[int, str]] = []
        paragraph: list[str] = []
        start = first_line
        for number, line in enumerate([*lines, ""], start=first_line):
            if line.strip():
                if not paragraph:
                    start = number
                paragraph.append(line)
            elif paragraph:
                docs.append((start, "\n".join(paragraph)))
                paragraph = []
        return docs
    return [(n, line) for n, line in enumerate(lines, start=first_line) if line.strip()]


def _jsonl_texts(
    file: Path, first_line: int, lines: list[str], text_column: str
) -> list[tuple[int, str]]:
    texts: list[tuple[int, str]] = []
    first_record = first_line == 1
    for number, line in enumerate(lines, start=first_line):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            # an array's "[", or a pretty-printed object's "{" alone on the file's first line,
            # or any first line that the lines after it complete into one JSON document
            if line.lstrip().startswith("[") or (first_record and line.strip() == "{"):
                _refuse_one_json_document(file)
            if first_record and _one_json_document("\n".join(lines[number - first_line :])):
                _refuse_one_json_document(file)
            raise UserError(f"{file}:{number}: not valid JSON ({exc.msg})") from exc
        if isinstance(record, list):
            _refuse_one_json_document(file)
        first_record = False
        if isinstance(record, dict) and text_column in record and record[text_column] is None:
            continue  # a null text is an empty document, skipped, as a table's null row
        if not isinstance(record, dict) or not isinstance(record.get(text_column), str):
            raise UserError(f'{file}:{number}: each JSON line needs a string field "{text_column}"')
        if record[text_column].strip():
            texts.append((number, record[text_column]))
    return texts


def _one_json_document(text: str) -> bool:
    """Whether `text` is one JSON object or array spread over several lines."""
    try:
        return isinstance(json.loads(text), dict | list) and "\n" in text.strip()
    except json.JSONDecodeError:
        return False


def _refuse_one_json_document(file: Path) -> None:
    """A .json(l) file that is one JSON array, or one object spread over lines, not JSON Lines."""
    raise UserError(
        f"{file}: holds one JSON document (an array, or an object over several lines); JSON "
        "Lines is expected, one object per line; convert it, e.g. for an array of objects: "
        f"jq -c '.[]' {file} > {Path(file).with_suffix('.jsonl')}"
    )


def table_numbered_documents(
    file: Path, text_column: str, encoding_errors: str
) -> Iterator[tuple[int, list[tuple[int, str]]]]:
    """(bytes the batch stands for, [(row number, document)]) per batch of a table file.

    A row is a document; null, empty and whitespace-only texts are skipped (as blank lines are).
    """
    for batch in iter_text_batches(file, text_column, encoding_errors):
        numbered = [
            (row, text)
            for row, text in enumerate(batch.texts, start=batch.first_row)
            if text is not None and text.strip()
        ]
        yield batch.progress, numbered


def iter_documents(
    path: str | os.PathLike,
    doc_sep: str = "line",
    encoding_errors: str = "strict",
    text_column: str = DEFAULT_TEXT_COLUMN,
) -> Iterator[tuple[int, list[str]]]:
    """(bytes read, documents) per chunk (or batch of table rows) over all files of an input."""
    for size, numbered in _iter_numbered_chunks(path, doc_sep, encoding_errors, text_column):
        yield size, [doc for _, _, doc in numbered]


def iter_numbered_documents(
    path: str | os.PathLike,
    doc_sep: str = "line",
    encoding_errors: str = "strict",
    text_column: str = DEFAULT_TEXT_COLUMN,
) -> Iterator[tuple[Path, int, str]]:
    """(file, line (table: row) number where it starts, document) over all files of an input.

    The same chunks, decoding and splitting as `iter_documents` (so the same documents, in the
    same order), with where each came from.
    """
    for _, numbered in _iter_numbered_chunks(path, doc_sep, encoding_errors, text_column):
        yield from numbered


def _iter_numbered_chunks(
    path: str | os.PathLike, doc_sep: str, encoding_errors: str, text_column: str
) -> Iterator[tuple[int, list[tuple[Path, int, str]]]]:
    """The one reader: (bytes read, [(file, line or row number, document)]) per chunk or batch."""
    for file in text_files(path):
        if is_table(file):
            for size, rows in table_numbered_documents(file, text_column, encoding_errors):
                yield size, [(file, number, doc) for number, doc in rows]
            continue
        for first_line, chunk in iter_chunks(file, doc_sep):
            text = decode_chunk(file, first_line, chunk, encoding_errors)
            docs = chunk_numbered_documents(file, first_line, text, doc_sep, text_column)
            yield len(chunk), [(file, number, doc) for number, doc in docs]


# ----------------------------------------------------------------------------- tokenizing


def encode_batch(tokenizer: Any, docs: list[str]) -> list[list[int]]:
    """Token ids of each document as plain text: the one encoder of every token stream.

    No special tokens are added, and special-token text inside a document (`<|endoftext|>`,
    `[SEP]`, ...) is encoded as the characters it is, never as the special token: a corpus that
    quotes the string must not end its document in the middle (`lint` reports such lines).
    The Rust batch encoder (`encode_batch_fast`, no offsets) where the tokenizer has one.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        # The switch is the backend's own state (transformers sets it on every call it makes),
        # so it is set for this call and put back.
        before = backend.encode_special_tokens
        backend.encode_special_tokens = True
        try:
            return [e.ids for e in backend.encode_batch_fast(docs, add_special_tokens=False)]
        finally:
            backend.encode_special_tokens = before
    return tokenizer(docs, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _flatten(
    ids: list[list[int]], eos_id: int, dtype: Any, prefix: Sequence[int] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens with the prefix before and one EOS after each document, their segment lengths)."""
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    ends = np.cumsum(lengths)
    if not prefix:
        return np.insert(flat, ends, eos_id).astype(dtype, copy=False), lengths + 1
    # Per document: the prefix at its start, then the EOS at its end. np.insert keeps the given
    # order at equal indices, so an EOS comes before the next document's prefix.
    where = np.concatenate([np.repeat((ends - lengths)[:, None], len(prefix), 1), ends[:, None]], 1)
    values = np.tile(np.asarray([*prefix, eos_id], dtype=np.int64), len(ids))
    tokens = np.insert(flat, where.ravel(), values).astype(dtype, copy=False)
    return tokens, lengths + len(prefix) + 1


def tokenize_to_files(
    path: str | os.PathLike,
    tokenizer: Any,
    eos_id: int,
    dtype: Any,
    tokens_file: Path,
    starts_file: Path,
    doc_sep: str = "line",
    encoding_errors: str = "strict",
    progress: bool | None = None,
    text_column: str = DEFAULT_TEXT_COLUMN,
    prefix: Sequence[int] = (),
) -> int:
    """Stream a corpus into `tokens_file` / `starts_file` (.npy, as `data.TokenStream` holds them).

    Without a `prefix` a leading EOS comes first; with one, each document starts with it.
    Returns the number of documents. Both files appear atomically, only when all went well.
    """
    total_bytes = sum(f.stat().st_size for f in check_input(path, text_column))
    show = total_bytes >= PROGRESS_MIN_BYTES if progress is None else progress
    tokens_file.parent.mkdir(parents=True, exist_ok=True)
    raw = tokens_file.with_name(f".{tokens_file.name}.{os.getpid()}.raw")
    lengths: list[np.ndarray] = []
    prefix = [int(t) for t in prefix]
    lead = [] if prefix else [eos_id]
    count = len(lead)
    bar = _progress_bar(total_bytes, f"tokenizing {Path(path).name}") if show else None
    try:
        with open(raw, "wb") as out, ThreadPoolExecutor(max_workers=1) as pool:
            np.array(lead, dtype=dtype).tofile(out)
            pending = None  # encode chunk k in the pool while chunk k+1 is read and split
            for size, docs in itertools.chain(
                iter_documents(path, doc_sep, encoding_errors, text_column), [(0, None)]
            ):
                if pending is not None:
                    done_size, future = pending
                    tokens, doc_lengths = future.result()
                    tokens.tofile(out)
                    lengths.append(doc_lengths)
                    count += len(tokens)
                    if bar is not None:
                        bar.update(done_size)
                pending = None
                if docs is not None:
                    pending = (
                        size,
                        pool.submit(_encode_chunk, tokenizer, docs, eos_id, dtype, prefix),
                    )
        num_docs = sum(len(x) for x in lengths)
        if num_docs == 0:
            raise UserError(f"{path}: no text in it (the file is empty or holds only blank lines)")
        starts = np.empty(num_docs + 1, dtype=np.int64)  # filled in place: one array, not four
        starts[0] = 0
        np.concatenate(lengths, out=starts[1:])
        del lengths
        np.cumsum(starts, out=starts)
        starts += len(lead)
        _save_npy_from_raw(raw, tokens_file, dtype, count)
        tmp = starts_file.with_name(f".{starts_file.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            np.save(handle, starts)
        os.replace(tmp, starts_file)
        return num_docs
    finally:
        raw.unlink(missing_ok=True)
        if bar is not None:
            bar.close()


def _encode_chunk(
    tokenizer: Any, docs: list[str], eos_id: int, dtype: Any, prefix: Sequence[int] = ()
) -> tuple[np.ndarray, np.ndarray]:
    if not docs:
        return np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.int64)
    return _flatten(encode_batch(tokenizer, docs), eos_id, dtype, prefix)


def _save_npy_from_raw(raw: Path, target: Path, dtype: Any, count: int) -> None:
    """Write the .npy header, then copy the raw token bytes (no array in memory)."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
        "fortran_order": False,
        "shape": (count,),
    }
    with open(tmp, "wb") as out, open(raw, "rb") as source:
        np.lib.format.write_array_header_1_0(out, header)
        shutil.copyfileobj(source, out, 16 << 20)
    os.replace(tmp, target)


def _progress_bar(total: int, desc: str) -> Any:
    import sys

    from tqdm.auto import tqdm

    return tqdm(
        total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr, dynamic_ncols=True
    )
