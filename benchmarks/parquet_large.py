"""Tokenize a large Parquet file streaming: throughput and peak RSS, against the same text as .txt.

    python benchmarks/parquet_large.py --size-mb 1024 --workdir /tmp/dlp

1. Writes --size-mb MB of text (shuffled standard-library docstring lines, as
   benchmarks/tokenize_large.py) as a .txt file, then the same lines as rows of a `text` column
   of a Parquet file (row groups of 64k rows), without holding either in memory. The lines repeat,
   so by default the Parquet file is written without dictionary encoding or compression, as a
   ~1 GB file (`--compression snappy --dictionary`: pyarrow's defaults, a far smaller file).
2. In a fresh process each: `load_token_stream` of the Parquet file, then of the .txt file
   (cold caches), GPT-2 tokenizer; wall time, MB/s of text and the process's peak RSS
   (`ru_maxrss`) after tokenizing, and whether the two token streams are identical (a SHA-256
   of each, which maps the token file: `peak_rss_after_hash_mb` counts those file pages too).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tokenize_large import make_corpus  # noqa: E402

CHILD = r"""
import hashlib, json, resource, sys, time
from domainlm.data.tokens import load_token_stream
from domainlm.model.loading import gpt2_tokenizer, tokenizer_fingerprint
tok = gpt2_tokenizer()
t0 = time.perf_counter()
cached = load_token_stream(sys.argv[1], tok, 50256, tokenizer_fingerprint(tok, 50256), sys.argv[2])
t1 = time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the hash maps the tokens
tokens = cached.stream.tokens
print(json.dumps({"hit": cached.cache_hit, "tokens": int(cached.stream.num_predicted),
    "documents": int(cached.stream.num_documents), "tokenize_s": t1 - t0,
    "sha256": hashlib.sha256(memoryview(tokens)).hexdigest()[:16], "peak_rss_mb": peak,
    "peak_rss_after_hash_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_parquet(
    text_file: Path, target: Path, compression: str, dictionary: bool, rows_per_group: int = 65536
) -> None:
    """The non-blank lines of `text_file` as a `text` column, written group by group."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("text", pa.string())])
    with (
        open(text_file, encoding="utf-8") as lines,
        pq.ParquetWriter(
            target, schema, compression=compression, use_dictionary=dictionary
        ) as writer,
    ):
        batch: list[str] = []
        for line in lines:
            line = line.rstrip("\n")
            if line.strip():
                batch.append(line)
            if len(batch) == rows_per_group:
                writer.write_table(pa.table({"text": batch}, schema=schema))
                batch = []
        if batch:
            writer.write_table(pa.table({"text": batch}, schema=schema))


def run_child(corpus: Path, cache: Path) -> dict:
    env = dict(os.environ)
    env.pop("TOKENIZERS_PARALLELISM", None)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(corpus), str(cache)],
        check=True, capture_output=True, text=True, env=env,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--workdir", default="/tmp/domainlm-parquet-bench")
    parser.add_argument("--skip-txt", action="store_true", help="Only the Parquet file.")
    parser.add_argument("--compression", default="none", help="Parquet codec (none, snappy, ...).")
    parser.add_argument("--dictionary", action="store_true", help="Dictionary-encode the column.")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    text = work / f"corpus-{args.size_mb}mb.txt"
    table = work / f"corpus-{args.size_mb}mb-{args.compression}{'-dict' * args.dictionary}.parquet"
    if not text.is_file():
        make_corpus(text, args.size_mb)
    if not table.is_file():
        write_parquet(text, table, args.compression, args.dictionary)
    size_mb = text.stat().st_size / 2**20
    results: dict = {"cpus": os.cpu_count(), "text_mb": round(size_mb, 1),
                     "parquet_mb": round(table.stat().st_size / 2**20, 1)}  # fmt: skip
    for name, path in [("parquet", table)] + ([] if args.skip_txt else [("txt", text)]):
        cache = work / f"cache-{name}"
        shutil.rmtree(cache, ignore_errors=True)
        result = run_child(path, cache)
        result["text_mb_s"] = round(size_mb / result["tokenize_s"], 2)
        results[name] = result
        print(json.dumps({name: result}), flush=True)
    if "txt" in results:
        results["identical_streams"] = results["txt"]["sha256"] == results["parquet"]["sha256"]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
