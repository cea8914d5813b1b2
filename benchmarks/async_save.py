"""Checkpoint stall, synchronous vs --async-save, and the step-time cost of a save in flight.

    .venv/bin/python benchmarks/async_save.py                   # GPT-2 124M shape, bf16, CPU
    .venv/bin/python benchmarks/async_save.py --saves 3 --write-docs

One process builds the scratch:gpt2 model (fp32 weights, bf16 autocast, as `domainlm train
--precision bf16` runs it), domainlm's loss and fused AdamW, and takes `--warmup` steps of
`--batch` x `--block` random tokens (the optimizer state exists). Then, `--saves` times each,
alternating:

- sync: the training path's `full_state_dicts` + `checkpoint.save_checkpoint` (temporary folder,
  checksums, fsync, marker, rename). The step loop is blocked for all of it: the stall.
- async: `async_save.host_copy` of weights and optimizer state + `BackgroundWriter.submit` (the
  stall), then training steps until the write is published; each such step's time against the
  median step time with no save in flight is the cost of the save in flight.

Checkpoints go to `--dir` (default: a temporary folder), one at a time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from docs_section import write_section

SECTION = "## Checkpoint stall: synchronous vs --async-save"
SHAPE_NAMES = {
    "gpt2": "GPT-2 124M shape (scratch:gpt2)",
    "llama-1b": "Llama 1.1B shape (TinyLlama's)",
}


def section(args: argparse.Namespace) -> str:
    return SECTION if args.shape == "gpt2" else f"{SECTION}, {SHAPE_NAMES[args.shape]}"


def build(args: argparse.Namespace):  # noqa: ANN201 - (model, loss, optimizer, step function)
    import torch

    from domainlm.model.fastpath import use_fast_kernels
    from domainlm.model.loading import build_scratch_model, quiet_transformers
    from domainlm.model.loss import CausalLMLoss
    from domainlm.model.malloc import reuse_freed_host_memory

    reuse_freed_host_memory()
    quiet_transformers()
    torch.manual_seed(0)
    if args.shape == "gpt2":
        model = build_scratch_model("gpt2")
    else:  # TinyLlama's 1.1B shape, as benchmarks/save_time.py builds it
        from save_time import build as build_shape

        model, _ = build_shape(args.shape)
    if args.weights == "bf16":  # pure-bf16 weights and AdamW moments (--load-dtype bfloat16)
        model = model.to(torch.bfloat16)
    model.train()
    use_fast_kernels(model)
    loss_module = CausalLMLoss(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.block + 1))

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_module(ids[:, :-1], ids[:, 1:]).sum() / ids[:, 1:].numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return model, optimizer, step


def measure(args: argparse.Namespace, folder: Path) -> dict:
    from domainlm.model.distributed import SINGLE, full_state_dicts
    from domainlm.model.loading import gpt2_tokenizer
    from domainlm.run.async_save import (
        BackgroundWriter,
        CheckpointCopy,
        host_copy,
        model_state_for_saving,
    )
    from domainlm.run.checkpoint import save_checkpoint

    model, optimizer, step = build(args)
    tokenizer = gpt2_tokenizer()
    for _ in range(args.warmup):
        step()
    plain = [step() for _ in range(args.steps)]
    sync_stall, async_stall, in_flight, write_s, size = [], [], [], [], 0
    writer = BackgroundWriter()
    for index in range(args.saves):
        start = time.perf_counter()
        _, optim_state = full_state_dicts(model, optimizer, SINGLE)
        path = save_checkpoint(folder, index, model, tokenizer, {"optimizer": optim_state})
        sync_stall.append(time.perf_counter() - start)
        size = sum(f.stat().st_size for f in path.iterdir())
        shutil.rmtree(path)
        plain.append(step())

        start = time.perf_counter()
        _, optim_state = full_state_dicts(model, optimizer, SINGLE)
        copied = host_copy({"weights": model_state_for_saving(model), "optim": optim_state})
        job = CheckpointCopy(
            folder, 1000 + index, model, tokenizer, {"optimizer": copied["optim"]}, None,
            copied["weights"],
        )  # fmt: skip
        writer.submit(job)
        async_stall.append(time.perf_counter() - start)
        while writer.in_flight:
            in_flight.append(step())
        writer.wait()
        write_s.append(time.perf_counter() - start)
        shutil.rmtree(folder / f"checkpoint-{1000 + index}")
        plain.append(step())
    return {
        "size_mb": size / 1e6,
        "step_s": statistics.median(plain),
        "sync_stall_s": statistics.median(sync_stall),
        "async_stall_s": statistics.median(async_stall),
        "in_flight_step_s": statistics.median(in_flight) if in_flight else float("nan"),
        "in_flight_steps": len(in_flight),
        "async_write_s": statistics.median(write_s),
    }


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    line = next((x for x in out.splitlines() if x.startswith("Model name")), "Model name: ?")
    return line.split(":", 1)[1].strip()


def report(r: dict, args: argparse.Namespace) -> str:
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    weights = "fp32 weights with bf16 autocast" if args.weights == "fp32" else "bf16 weights"
    return f"""{section(args)}

{SHAPE_NAMES[args.shape]}, {weights}, fused AdamW, batch
{args.batch} x {args.block}, on the CPU ({cpu_name()}, with AMX); {args.saves} saves of each
kind, alternating, medians. A checkpoint is {r["size_mb"]:,.0f} MB (weights, AdamW state,
tokenizer), written to the local disk.

Command: `.venv/bin/python benchmarks/async_save.py --shape {args.shape} --weights {args.weights}
--saves {args.saves} --warmup {args.warmup} --steps {args.steps} --write-docs`

| | seconds (median) |
|---|---|
| training step, no save in flight | {r["step_s"]:.2f} |
| stall per save, synchronous (the step loop blocked) | {r["sync_stall_s"]:.2f} |
| stall per save, --async-save (host copy, hand-off) | {r["async_stall_s"]:.2f} |
| training step while an async save is in flight ({r["in_flight_steps"]} steps) | {r["in_flight_step_s"]:.2f} |
| async save, from the stall to publication | {r["async_write_s"]:.2f} |

The stall removed: {r["sync_stall_s"] / r["async_stall_s"]:.1f}x shorter
({r["sync_stall_s"] - r["async_stall_s"]:.2f} s less per save). The cost: a step with a save in
flight takes {r["in_flight_step_s"] / r["step_s"]:.2f}x the time of one without (the writer
thread's checksums, serialisation and fsync share the CPU with the step). Load average
{load} when written: the 2-core machine was shared with other jobs, so the figures are
noisy (a step of this shape takes a few seconds on the idle machine); read the ratios.
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPE_NAMES), default="gpt2")
    parser.add_argument("--weights", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps with no save")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="domainlm-async-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        result = measure(args, folder)
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    text = report(result, args)
    print(text)
    if args.write_docs:
        write_section(section(args), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
