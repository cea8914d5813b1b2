"""One CPU training step, lever by lever: what each of domainlm's changes buys over the Trainer's.

    .venv/bin/python benchmarks/cpu_step.py                    # GPT-2 124M shape, batch 4 x 256, bf16
    .venv/bin/python benchmarks/cpu_step.py --repeats 3 --write-docs

Each variant runs in its own process (the malloc setting is per process), alternating, `--repeats`
times; each builds the same random-init model (seeded), runs `--warmup` steps, then times `--steps`
steps of bf16 autocast forward + backward + clip 1.0 + fused AdamW on random tokens, and reports
the median step time, tokens/s and the process's peak RSS. Variants, cumulative:

1. `trainer`: the Trainer's step: `model(input_ids, labels=...)` (full logits, transformers'
   ForCausalLMLoss), SDPA attention, glibc's malloc defaults.
2. `+ chunked loss`: `domainlm.model.loss.CausalLMLoss` instead (no full logits; fused softmax; grouped
   gradient matmuls).
3. `+ malloc reuse`: `domainlm.model.malloc.reuse_freed_host_memory()` (freed blocks kept, no page
   faults for each step's large tensors).
4. `+ fast kernels` = domainlm: `domainlm.model.fastpath.use_fast_kernels` (fused GELU; dropout masks
   from 16-bit SFC64 draws; eager attention with a bf16 softmax while training with dropout on CPU).
5. `+ compile`: what `domainlm train --compile` adds: the backbone compiled in place
   (`domainlm.run.train.compile_model`); `--warmup` must cover the compilation (>= 2 steps).

`--variants` runs a subset (the first one named is the baseline of "vs").

It also measures this CPU's bf16 matmul rate (a 2048^3 product) and reports each variant's model
FLOP rate (6N + 12 L H Q T FLOPs per token, benchmarks/model_flops.py) as a share of it: the
ceiling any step of this model can reach here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from docs_section import write_section
from model_flops import flops_per_token  # one FLOP formula for every benchmark

SECTION = "## One CPU training step, lever by lever"
VARIANTS = {
    "trainer": dict(loss="hf", malloc=False, fast=False),
    "+ chunked loss": dict(loss="domainlm", malloc=False, fast=False),
    "+ malloc reuse": dict(loss="domainlm", malloc=True, fast=False),
    "+ fast kernels (domainlm)": dict(loss="domainlm", malloc=True, fast=True),
    "+ compile (--compile)": dict(loss="domainlm", malloc=True, fast=True, compile=True),
}
# run unless --variants says otherwise: the cumulative levers (compiling is measured when asked)
DEFAULT_VARIANTS = [name for name, variant in VARIANTS.items() if not variant.get("compile")]


def child(args: argparse.Namespace) -> None:
    """One variant in this process; prints one JSON line."""
    variant = VARIANTS[args.variant]
    if variant["malloc"]:
        from domainlm.model.malloc import reuse_freed_host_memory

        reuse_freed_host_memory()
    import torch

    from domainlm.model.fastpath import use_fast_kernels
    from domainlm.model.loading import build_scratch_model
    from domainlm.model.loss import CausalLMLoss

    torch.manual_seed(0)
    overrides = {} if args.n_layer is None else {"n_layer": args.n_layer}
    model = build_scratch_model("gpt2", seed=0, **overrides).train()
    if variant["fast"]:
        use_fast_kernels(model)
    loss_module = CausalLMLoss(model)
    if variant.get("compile"):
        from domainlm.run.train import compile_model

        compile_model(loss_module)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.block_size))
    targets = args.batch_size * (args.block_size - 1)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if variant["loss"] == "hf":
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            else:
                loss = loss_module(ids[:, :-1], ids[:, 1:]).sum() / targets
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    tokens_per_s = args.batch_size * args.block_size / seconds
    print(json.dumps({
        "step_s": seconds,
        "tokens_per_s": tokens_per_s,
        "model_gflops": tokens_per_s * flops_per_token(model, args.block_size) / 1e9,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))  # fmt: skip


def matmul_gflops() -> float:
    """This CPU's bf16 matmul rate: median of 5 products of two 2048 x 2048 matrices."""
    import torch

    a = torch.randn(2048, 2048).bfloat16()
    b = torch.randn(2048, 2048).bfloat16()
    a @ b
    times = []
    for _ in range(5):
        started = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - started)
    return 2 * 2048**3 / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--n-layer", type=int, default=None, help="fewer layers, for a quick run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS)
    parser.add_argument("--write-docs", action="store_true", help="write docs/benchmarks.md")
    args = parser.parse_args()
    if args.variant:
        return child(args)

    # a DOMAINLM_SYSTEM_MALLOC=1 in the caller's environment would make "+ malloc reuse" a no-op
    env = dict(os.environ, DOMAINLM_SYSTEM_MALLOC="0")
    forwarded = [
        "--batch-size", str(args.batch_size), "--block-size", str(args.block_size),
        "--warmup", str(args.warmup), "--steps", str(args.steps),
    ] + ([] if args.n_layer is None else ["--n-layer", str(args.n_layer)])  # fmt: skip
    results: dict[str, list[dict]] = {name: [] for name in args.variants}
    peak = []
    for repeat in range(args.repeats):
        names = list(results) if repeat % 2 == 0 else list(reversed(results))
        for name in names:
            done = subprocess.run(
                [sys.executable, __file__, "--variant", name, *forwarded],
                env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results[name].append(result)
            print(f"  {name} #{repeat}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
        peak.append(matmul_gflops())
    peak_gflops = statistics.median(peak)
    base = statistics.median(r["step_s"] for r in results[args.variants[0]])
    lines = [
        f"| variant | step s | tokens/s | vs {args.variants[0]} | model GFLOP/s | share of matmul peak | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        step_s = statistics.median(r["step_s"] for r in runs)
        gflops = statistics.median(r["model_gflops"] for r in runs)
        lines.append(
            f"| {name} | {step_s:.3f} | {statistics.median(r['tokens_per_s'] for r in runs):.1f} | "
            f"{base / step_s:.2f}x | {gflops:.0f} | {gflops / peak_gflops:.0%} | "
            f"{statistics.median(r['peak_rss_mb'] for r in runs):,.0f} |"
        )
    table = "\n".join(lines)
    print(f"\nbf16 matmul peak (2048^3): {peak_gflops:.0f} GFLOP/s\n{table}")
    if args.write_docs:
        command = " ".join([".venv/bin/python benchmarks/cpu_step.py", *sys.argv[1:]])
        load = os.getloadavg()
        text = "\n".join([
            SECTION, "",
            f"GPT-2 124M shape{'' if args.n_layer is None else f' ({args.n_layer} layers)'}, "
            f"batch {args.batch_size} x {args.block_size}, bf16 autocast; median of {args.steps} "
            f"steps after {args.warmup}, {args.repeats} alternating processes per variant (medians).",
            "", f"Command: `{command}`", "",
            f"This CPU's bf16 matmul rate (2048^3): {peak_gflops:.0f} GFLOP/s. Load average "
            f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} when written.", "", table, "",
        ])  # fmt: skip
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
