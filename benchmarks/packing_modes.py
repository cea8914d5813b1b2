"""--packing concat vs docs: training speed and validation perplexity, side by side.

    python benchmarks/packing_modes.py --model scratch:tiny --steps 60 --repeats 2

Trains the same model from the same seed on the same generated corpus (short documents of
uneven length, so most blocks hold several documents) once per mode, alternating modes across
repeats; reports tokens/s (median over repeats) and the final validation perplexity (the
project's one windowed definition, the same for both modes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from domainlm.config import TrainConfig
from domainlm.demo import word_documents
from domainlm.run.train import train


def corpus(n: int, seed: int) -> list[str]:
    return word_documents(n, seed)


def step_speed(model_name: str, block: int, batch: int, repeats: int = 6) -> dict[str, float]:
    """Median seconds of one forward + backward on the same blocks, modes alternated."""
    import time

    import numpy as np

    from domainlm.data.blocks import BlockDataset
    from domainlm.data.tokens import tokenize_documents
    from domainlm.model.loading import load_model
    from domainlm.model.loss import CausalLMLoss

    loaded = load_model(model_name)
    stream = tokenize_documents(corpus(2000, 0), loaded.tokenizer, loaded.eos_id, np.uint16)
    loss = CausalLMLoss(loaded.model)
    times: dict[str, list[float]] = {"concat": [], "docs": []}
    for r in range(repeats + 1):
        for mode in ("concat", "docs") if r % 2 == 0 else ("docs", "concat"):
            b = BlockDataset(stream, block, mode).batch(list(range(batch)))
            start = time.perf_counter()
            loss(b.input_ids, b.targets, b.position_ids).sum().backward()
            if r:  # the first round warms up
                times[mode].append(time.perf_counter() - start)
    return {mode: statistics.median(v) for mode, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="scratch:tiny")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--micro-only", action="store_true", help="only the step timing")
    args = parser.parse_args()
    print(json.dumps({"step_seconds": step_speed(args.model, args.block_size, args.batch_size)}))
    if args.micro_only:
        return
    results: dict[str, dict[str, list[float]]] = {
        m: {"tokens_per_s": [], "perplexity": []} for m in ("concat", "docs")
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "train.txt").write_text("\n".join(corpus(3000, 0)) + "\n")
        (work / "valid.txt").write_text("\n".join(corpus(300, 1)) + "\n")
        for repeat in range(args.repeats):
            modes = ("concat", "docs") if repeat % 2 == 0 else ("docs", "concat")
            for mode in modes:
                out = work / f"run-{mode}-{repeat}"
                result = train(
                    TrainConfig(
                        model=args.model,
                        train_file=str(work / "train.txt"),
                        validation_file=str(work / "valid.txt"),
                        output_dir=str(out),
                        block_size=args.block_size,
                        batch_size=args.batch_size,
                        max_steps=args.steps,
                        lr=1e-3,
                        warmup_steps=5,
                        save_steps=args.steps,
                        logging_steps=args.steps,
                        packing=mode,
                        quiet=True,
                        seed=0,
                    )
                )
                results[mode]["tokens_per_s"].append(result.train_tokens / result.train_runtime)
                results[mode]["perplexity"].append(result.final_perplexity)
    summary = {
        mode: {k: round(statistics.median(v), 3) for k, v in r.items()} | r
        for mode, r in results.items()
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
