"""Time the memorization index (domainlm/text/memorize.py) on a corpus of a given size.

    python benchmarks/memorization_index.py --megabytes 100 --workdir /tmp/mem-bench

Writes a seeded synthetic corpus (lines of words drawn from the standard library's docstrings),
tokenizes it with GPT-2's tokenizer into the token cache (timed, not part of the index), builds
the n-gram index (timed), loads it again from the cache (timed), and looks up 100 samples of
200 tokens that each contain a 60-token span copied from the corpus (timed; the span is checked).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np

from domainlm.data.tokens import load_token_stream
from domainlm.demo import stdlib_docstrings
from domainlm.model.loading import gpt2_tokenizer, resolve_eos_id, tokenizer_fingerprint
from domainlm.text.memorize import NgramIndex


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> None:
    words = sorted({w for doc in stdlib_docstrings(limit=3000) for w in doc.split()})
    rng = random.Random(seed)
    target = int(megabytes * 1e6)
    with open(path, "w", encoding="utf-8") as handle:
        written = 0
        while written < target:
            line = " ".join(rng.choices(words, k=rng.randint(5, 120))) + "\n"
            handle.write(line)
            written += len(line.encode())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--megabytes", type=float, default=100)
    parser.add_argument("--workdir", default="/tmp/mem-bench")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    corpus, cache = work / f"corpus-{args.megabytes:g}mb.txt", work / "cache"
    if not corpus.is_file():
        write_corpus(corpus, args.megabytes)
    tokenizer = gpt2_tokenizer()
    eos = resolve_eos_id(tokenizer)
    started = time.perf_counter()
    cached = load_token_stream(corpus, tokenizer, eos, tokenizer_fingerprint(tokenizer, eos), cache)
    tokenize_s = time.perf_counter() - started
    for old in cache.glob(f"{cached.key}.ngram*"):
        old.unlink()  # time a fresh build
    index, hit, build_s = NgramIndex.load_or_build(cached.stream, cache, cached.key)
    assert not hit
    _, hit, load_s = NgramIndex.load_or_build(cached.stream, cache, cached.key)
    assert hit
    tokens = cached.stream.tokens
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(100):
        start = int(rng.integers(1, len(tokens) - 100))
        fresh = rng.integers(0, 50000, size=140).tolist()
        samples.append(fresh[:70] + np.asarray(tokens[start : start + 60]).tolist() + fresh[70:])
    started = time.perf_counter()
    found = [index.longest_copy(s) for s in samples]
    query_s = time.perf_counter() - started
    assert all(f is not None and f.length >= 50 for f in found)
    exact = sum(f.length >= 60 for f in found)
    for f, sample in zip(found, samples, strict=True):
        if f.length < 60:  # the documented limit: a copy starting on a very common n-gram
            print("reported short:", f.length, repr(tokenizer.decode(sample[70 : 70 + 12])))
    size_mb = corpus.stat().st_size / 1e6
    index_mb = (cache / f"{cached.key}.ngram8.v1.npy").stat().st_size / 1e6
    print(
        f"corpus {size_mb:.0f} MB, {len(tokens):,} tokens ({'cached' if cached.cache_hit else f'tokenized in {tokenize_s:.0f}s'}); "
        f"index build {build_s:.1f}s, {index_mb:.0f} MB on disk; load from cache {load_s:.3f}s; "
        f"100 lookups of 200-token samples {query_s:.2f}s ({query_s * 10:.1f} ms each); "
        f"{exact}/100 planted 60-token copies reported at full length"
    )


if __name__ == "__main__":
    main()
