"""LoRA on one GPU: domainlm against the HF Trainer + peft at the same settings (issue 15 item 5).

    python3 benchmarks/gpu_lora.py                        # Llama 1B and 8B shapes, ~4 min on one H100
    python3 benchmarks/gpu_lora.py --shapes 1b --steps 20
    python3 benchmarks/gpu_lora.py --shapes tiny          # the plumbing, on a CPU too (~30 s)

For each shape, random init with GPT-2's tokenizer (seed 0; benchmarks/gpu_check.py's make_llama,
the 1B folder shared with gpu_check.py when both use one --work-dir), each tool in its own process
so that the GPU memory peak is its own:
- `python -m domainlm train --lora --no-merge` (r 8, alpha 16, dropout 0.05, its default targets:
  every linear layer of the attention and MLP blocks), bf16, the base loaded in bf16 (what
  --lora under bf16 does), learning rate 2e-4;
- the HF Trainer with run_clm.py's pipeline (gpu_check.py's as_trainer) on
  `AutoModelForCausalLM.from_pretrained(..., dtype=torch.bfloat16)` with peft's
  `get_peft_model(LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=[q, k, v, o,
  gate, up, down]))`, bf16, the same learning rate, schedule, clipping, batch and steps;
- both with gradient checkpointing where the shape says so (non-reentrant in the Trainer).
Reported: steady tokens/s (gpu_check.py's definitions), the peak of nvidia-smi's memory.used
minus the idle figure, the number of trainable parameters on each side (domainlm's adapter
file, the Trainer's `requires_grad` parameters), which must be equal for "the same settings",
and domainlm's memory plan for the run (`domainlm inspect --model`'s GPU figure) against the
peak of live tensors it measured (metrics.jsonl's peak_gpu_memory_gib) (issue 15 item 2).
Shapes: 1b = gpu_check.py's LLAMA_1B (16 x 2048, GQA 32/8, MLP 8192), block 2048, batch 8;
8b = Llama 3 8B's body (32 x 4096, GQA 32/8, MLP 14336, untied head) with GPT-2's vocabulary
(50,257, not Llama 3's 128,256: the only tokenizer offline), saved in bf16, block 2048, batch 4,
gradient checkpointing; tiny = 2 x 64 (a dry run).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gpu_check import (
    LLAMA_1B,
    domainlm_train,
    make_corpus,
    make_llama,
    measured_peak_gib,
    planned_peak_gib,
    trainer_train,
)

LORA = {"r": 8, "alpha": 16, "dropout": 0.05}
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR = 2e-4
LLAMA_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=2048,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)
LLAMA_TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


@dataclass(frozen=True)
class Shape:
    """One row: a Llama shape and how both tools train it."""

    name: str
    config: dict
    saved_dtype: str  # the folder's weights (both tools load the base in bf16)
    block: int
    batch: int
    steps: int
    gradient_checkpointing: bool
    corpus_repeats: int  # the training file: the docstrings this many times


SHAPES = {
    "1b": Shape("llama-1b", LLAMA_1B, "float32", 2048, 8, 30, False, 4),
    "8b": Shape("llama-8b", LLAMA_8B, "bfloat16", 2048, 4, 20, True, 4),
    "tiny": Shape("llama-tiny", LLAMA_TINY, "float32", 128, 4, 8, True, 1),
}


def adapter_parameters(folder: Path) -> int:
    """The number of trainable parameters domainlm saved: every tensor of its adapter file."""
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        names = handle.keys()  # a safe_open handle is not iterable
        return sum(math.prod(handle.get_slice(name).get_shape()) for name in names)


def compare(shape: Shape, work: Path, steps: int | None) -> dict:
    """Both tools on one shape; their results and the folder's build time."""
    started = time.perf_counter()
    model = make_llama(work / shape.name, shape.config, shape.saved_dtype)
    built = time.perf_counter() - started
    corpus = make_corpus(work / f"corpus-x{shape.corpus_repeats}", shape.corpus_repeats)
    steps = steps or shape.steps
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out = work / f"lora-domainlm-{shape.name}"
    flags = ("--lora", "--lora-r", str(LORA["r"]), "--lora-alpha", str(LORA["alpha"]),
             "--lora-dropout", str(LORA["dropout"]), "--no-merge")  # fmt: skip
    if shape.gradient_checkpointing:
        flags += ("--gradient-checkpointing",)
    ours = domainlm_train(model, corpus, out, shape.block, shape.batch, steps,
                          logs / f"lora-domainlm-{shape.name}.log", flags, timeout=420, lr=LR,
                          logging_steps=5)  # fmt: skip
    ours["trainable"] = adapter_parameters(out)
    ours["live_peak_gib"] = measured_peak_gib(out)
    scenario = "lora+ckpt" if shape.gradient_checkpointing else "lora"
    ours["plan_gib"] = planned_peak_gib(model, shape.block, shape.batch, scenario)
    events = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    ours["steps"] = max(e["step"] for e in events if "loss" in e)
    print(f"domainlm {shape.name}: {ours}", flush=True)
    theirs = trainer_train(model, corpus, work / f"lora-trainer-{shape.name}", shape.block,
                           shape.batch, steps, logs / f"lora-trainer-{shape.name}.log", lr=LR,
                           gradient_checkpointing=shape.gradient_checkpointing,
                           lora={**LORA, "targets": LLAMA_TARGETS})  # fmt: skip
    print(f"trainer {shape.name}: {theirs}", flush=True)
    return {"domainlm": ours, "trainer": theirs, "build_seconds": round(built, 1), "steps": steps}


def gib(x: float, on_gpu: bool) -> str:
    return f"{x:.1f}" if on_gpu else "n/a"


def table(shapes: list[Shape], results: dict, on_gpu: bool) -> list[str]:
    lines = [
        "| shape, block x batch | grad. ckpt | trainable (domainlm / Trainer+peft) | tokens/s "
        "domainlm | tokens/s Trainer+peft | ratio | GPU GiB domainlm | GPU GiB Trainer+peft "
        "| ratio | domainlm: plan GiB | measured live peak GiB | plan / measured |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for shape in shapes:
        r = results[shape.name]
        ours, theirs = r["domainlm"], r["trainer"]
        memory_ratio = (
            f"{ours['memory_gib'] / theirs['memory_gib']:.2f}x"
            if on_gpu and theirs["memory_gib"]
            else "n/a"
        )
        lines.append(
            f"| {shape.name}, {shape.block} x {shape.batch} | "
            f"{'yes' if shape.gradient_checkpointing else 'no'} | "
            f"{ours['trainable']:,} / {theirs['trainable']:,} | {ours['tokens_per_s']:,.0f} | "
            f"{theirs['tokens_per_s']:,.0f} | "
            f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x | "
            f"{gib(ours['memory_gib'], on_gpu)} | {gib(theirs['memory_gib'], on_gpu)} | "
            f"{memory_ratio} | {ours['plan_gib']:.2f} | {gib(ours['live_peak_gib'], on_gpu)} | "
            f"{ours['plan_gib'] / ours['live_peak_gib']:.3f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default="/tmp/domainlm-gpu-check")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["1b", "8b"])
    parser.add_argument("--steps", type=int, default=None, help="override each shape's steps")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import torch

    on_gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if on_gpu else "no GPU: a dry run on the CPU"
    print(f"{device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}", flush=True)
    started = time.perf_counter()
    work = Path(args.work_dir)
    shapes = [SHAPES[name] for name in args.shapes]
    results: dict = {"device": device, "torch": torch.__version__}
    for shape in shapes:
        results[shape.name] = compare(shape, work, args.steps)
    results["seconds"] = round(time.perf_counter() - started)
    print(f"\n{device}; LoRA r {LORA['r']}, alpha {LORA['alpha']}, dropout {LORA['dropout']}, "
          f"bf16 base, lr {LR}; whole run {results['seconds']} s\n")  # fmt: skip
    print("\n".join(table(shapes, results, on_gpu)), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    mismatched = [s.name for s in shapes
                  if results[s.name]["domainlm"]["trainable"] != results[s.name]["trainer"]["trainable"]]  # fmt: skip
    if mismatched:
        sys.exit(f"not the same settings: trainable parameters differ for {', '.join(mismatched)}")


if __name__ == "__main__":
    main()
