"""Data pipeline benchmark: tokenize a large corpus into the token cache; restart from the cache.

    python benchmarks/tokenize_large.py --size-mb 1024 --compare-mb 64

1. Writes a corpus of --size-mb MB of Python standard-library docstring lines (shuffled, seeded).
2. In a fresh process: `load_token_stream` (streamed tokenization into the cache) + the lint pass;
   reports wall time, MB/s and the process's peak RSS.
3. In another fresh process: the same calls again (cache hits), timed; this is what a second
   `domainlm train` pays before its first step, besides imports and model loading.
4. On a --compare-mb MB prefix: domainlm's tokenizer path against `datasets`' run_clm.py recipe
   (`load_dataset("text")` + `.map(tokenize, batched=True)`), same GPT-2 tokenizer, alternated
   --repeats times; medians and the ratio.
Needs the `bench` extra (datasets, psutil).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from domainlm.data.tokens import load_token_stream
from domainlm.data.lint import lint_corpus
from domainlm.model.loading import gpt2_tokenizer, tokenizer_fingerprint
tok = gpt2_tokenizer()
t1 = time.perf_counter()
cached = load_token_stream(sys.argv[1], tok, 50256, tokenizer_fingerprint(tok, 50256), sys.argv[2])
t2 = time.perf_counter()
lint_corpus(sys.argv[1], None, sys.argv[2])
t3 = time.perf_counter()
print(json.dumps({"hit": cached.cache_hit, "tokens": int(cached.stream.num_predicted),
    "imports_s": t1 - t0, "tokenize_s": t2 - t1, "lint_s": t3 - t2,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_corpus(path: Path, size_mb: int, seed: int = 0) -> None:
    """Docstring lines of the standard library, shuffled and repeated up to the size."""
    import pkgutil
    import pydoc

    lines: list[str] = []
    for module in sorted(m.name for m in pkgutil.iter_modules() if not m.name.startswith("_"))[
        :400
    ]:
        try:
            obj = pydoc.safeimport(module)
        except Exception:  # noqa: BLE001 - some modules refuse to import here; skip them
            continue
        for value in [obj, *vars(obj).values()] if obj else []:
            doc = getattr(value, "__doc__", None)
            if isinstance(doc, str):
                lines += [x.strip() for x in doc.splitlines() if len(x.strip()) > 20]
    rng = random.Random(seed)
    target = size_mb << 20
    with open(path, "w", encoding="utf-8") as out:
        written = 0
        while written < target:
            rng.shuffle(lines)
            block = "\n".join(lines) + "\n"
            out.write(block[: target - written] if written + len(block) > target else block)
            written += len(block.encode())
    with open(path, "a", encoding="utf-8") as out:
        out.write("\n")


def run_child(corpus: Path, cache: Path) -> dict:
    env = dict(os.environ)
    env.pop("TOKENIZERS_PARALLELISM", None)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(corpus), str(cache)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def ours(corpus: Path) -> float:
    from domainlm.data.corpus import tokenize_to_files
    from domainlm.model.loading import gpt2_tokenizer

    tok = gpt2_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        tokenize_to_files(corpus, tok, 50256, "uint16", Path(tmp) / "t.npy", Path(tmp) / "d.npy")
        return time.perf_counter() - start


def hf_datasets(corpus: Path) -> float:
    from datasets import load_dataset

    from domainlm.model.loading import gpt2_tokenizer

    tok = gpt2_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        raw = load_dataset("text", data_files={"train": str(corpus)}, cache_dir=tmp)["train"]
        raw.map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--compare-mb", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/domainlm-bench")
    parser.add_argument("--skip-large", action="store_true")
    args = parser.parse_args()
    os.environ.pop("TOKENIZERS_PARALLELISM", None)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"cpus": os.cpu_count()}

    if not args.skip_large:
        corpus = work / f"corpus-{args.size_mb}mb.txt"
        if not corpus.is_file():
            make_corpus(corpus, args.size_mb)
        cache = work / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        size_mb = corpus.stat().st_size / 2**20
        first = run_child(corpus, cache)
        second = run_child(corpus, cache)
        results["large"] = {
            "size_mb": round(size_mb, 1),
            "first": first,
            "tokenize_mb_s": round(size_mb / first["tokenize_s"], 2),
            "second": second,
        }
        print(json.dumps(results["large"], indent=2), flush=True)

    small = work / f"corpus-{args.compare_mb}mb.txt"
    if not small.is_file():
        make_corpus(small, args.compare_mb, seed=1)
    size_mb = small.stat().st_size / 2**20
    times: dict[str, list[float]] = {"domainlm": [], "datasets.map": []}
    for _ in range(args.repeats):  # alternate, so both see the same machine load
        times["domainlm"].append(ours(small))
        times["datasets.map"].append(hf_datasets(small))
    med = {k: statistics.median(v) for k, v in times.items()}
    results["compare"] = {
        "size_mb": round(size_mb, 1),
        "seconds": times,
        "mb_s": {k: round(size_mb / v, 2) for k, v in med.items()},
        "ratio": round(med["datasets.map"] / med["domainlm"], 2),
    }
    results["peak_rss_this_process_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
