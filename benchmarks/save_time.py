"""Time to save one training checkpoint (synchronously, as a run does at --save-steps and on SIGTERM).

    .venv/bin/python benchmarks/save_time.py --repeats 3 --workdir /tmp/save_time
    .venv/bin/python benchmarks/save_time.py --shapes gpt2 llama-1b --write-docs

For each model shape: the model (random weights, fp32 as a run holds them) and a full AdamW state
(two moments per parameter, as after the first step) are built in memory; then, `--repeats` times,
into a fresh folder: the optimizer state as a run gathers it (`full_state_dicts`) and
`checkpoint.save_checkpoint` (weights as safetensors, tokenizer, training_state.pt, a SHA-256 of
every file, fsync, atomic rename). Reported: the median seconds, the checkpoint's bytes, the
resulting MB/s, and what `--preempt-grace` would be told at start (`preempt.probe_speeds` and the
size estimate of `diskspace.estimate_checkpoint`), to compare the estimate with the measured time.

Shapes: `gpt2` (scratch:gpt2, 124M), `gpt2-medium` (355M), `llama-1b` (a Llama of 1.1B parameters:
hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632, vocabulary 32000; TinyLlama's shape). A
shape is skipped when MemAvailable is under 1.5 x its weights and optimizer state (the machine's
memory is shared).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import torch

SECTION = "## Checkpoint save time (issue 17)"
SHAPES = ("gpt2", "gpt2-medium", "llama-1b")
PARAMS = {"gpt2": 124e6, "gpt2-medium": 355e6, "llama-1b": 1.1e9}  # for the memory check


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def build(shape: str) -> tuple[torch.nn.Module, object]:
    from domainlm.model.loading import load_model

    if shape in ("gpt2", "gpt2-medium"):
        loaded = load_model(f"scratch:{shape}")
        return loaded.model, loaded.tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
    )  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    for p in model.parameters():
        p.data.uniform_(-0.02, 0.02)  # real pages, not zeros the OS could share
    return model, load_model("scratch:tiny").tokenizer  # the tokenizer's files are small


def adamw_state(model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW with its state as after one step (exp_avg, exp_avg_sq, step), without a backward."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        optimizer.state[p] = {
            "step": torch.tensor(1.0),
            "exp_avg": torch.zeros_like(p).uniform_(-1e-3, 1e-3),
            "exp_avg_sq": torch.zeros_like(p).uniform_(0, 1e-6),
        }
    return optimizer


def time_saves(shape: str, repeats: int, workdir: Path) -> dict | None:
    from domainlm.model.distributed import SINGLE, full_state_dicts
    from domainlm.run.checkpoint import save_checkpoint
    from domainlm.run.diskspace import estimate_checkpoint
    from domainlm.run.preempt import probe_speeds

    need = PARAMS[shape] * 4 * 3 * 1.5  # fp32 weights and two moments, with a margin
    if mem_available() < need:
        print(f"{shape}: skipped, {mem_available() / 2**30:.1f} GiB available < {need / 2**30:.1f}")
        return None
    model, tokenizer = build(shape)
    params = sum(p.numel() for p in model.parameters())
    optimizer = adamw_state(model)
    size = estimate_checkpoint(model, tokenizer).total
    workdir.mkdir(parents=True, exist_ok=True)
    write, checksum = probe_speeds(workdir, size)
    estimate = size / write + size / checksum
    times, written = [], 0
    for r in range(repeats):
        out = workdir / f"{shape}-{r}"
        out.mkdir()
        start = time.perf_counter()
        model_state, optim_state = full_state_dicts(model, optimizer, SINGLE)
        state = {"step": 1, "epoch": 0, "offset": 0, "optimizer": optim_state}
        path = save_checkpoint(out, 1, model, tokenizer, state, None, model_state)
        times.append(time.perf_counter() - start)
        written = sum(f.stat().st_size for f in path.iterdir())
        shutil.rmtree(out)
        print(f"{shape}: save {r + 1}: {times[-1]:.2f} s", flush=True)
    median = statistics.median(times)
    return {
        "shape": shape, "params": params, "bytes": written, "estimate_bytes": size,
        "median_s": median, "times": times, "mb_s": written / median / 1e6,
        "estimated_s": estimate,
    }  # fmt: skip


def table(rows: list[dict], command: str, cpu: str) -> str:
    lines = [
        SECTION, "",
        f"`{command}` on {cpu}, fp32 weights and AdamW state, written to local disk (ext4 on a "
        f"virtual disk); load average {' / '.join(f'{x:.1f}' for x in os.getloadavg())} (1/5/15 "
        "min) when written. Median of the repeats; the estimate is what a run prints at "
        "start for --preempt-grace (size estimate / probed write speed + SHA-256 time).", "",
        "| shape | parameters | checkpoint | median save | MB/s | estimated at start | all |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['params'] / 1e6:.0f}M | {r['bytes'] / 1e9:.2f} GB "
            f"(estimate {r['estimate_bytes'] / 1e9:.2f}) | {r['median_s']:.1f} s | "
            f"{r['mb_s']:.0f} | {r['estimated_s']:.1f} s | "
            f"{', '.join(f'{t:.1f}' for t in r['times'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    import platform
    import subprocess
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/save_time"))
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    rows = [r for s in args.shapes if (r := time_saves(s, args.repeats, args.workdir))]
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if "Model name" in ln),
               platform.processor())  # fmt: skip
    command = "python benchmarks/save_time.py " + " ".join(sys.argv[1:])
    text = table(rows, command.replace(" --write-docs", ""), cpu)
    print(text)
    if args.write_docs:
        from docs_section import write_section

        write_section(SECTION, text)


if __name__ == "__main__":
    main()
