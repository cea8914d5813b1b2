"""GPU throughput and MFU of one training step: domainlm's loss path vs the HF Trainer's, bf16.

    .venv/bin/python benchmarks/gpu_mfu.py                   # GPT-2 124M shape, block 1024, batch 16
    .venv/bin/python benchmarks/gpu_mfu.py --no-compile      # eager only (faster to run)

Runs in one process on one CUDA GPU, in under 5 minutes on an H100/H200. For each variant it builds
the same random-init GPT-2 (seeded), trains `--steps` steps after `--warmup` steps on random
tokens, and reports tokens/s, peak allocated memory and MFU:

- baseline: what `Trainer` runs per step with `bf16=True`: bf16 autocast, `model(input_ids,
  labels=...)` (full logits, transformers' ForCausalLMLoss), backward, clip 1.0, fused AdamW
  (the Trainer's default optimizer on torch >= 2.8). `--compile` adds its `torch_compile=True`.
- domainlm: the same, with `domainlm.loss.CausalLMLoss` (chunked head + cross-entropy, gradients
  formed in the forward pass, no full logits) and the backbone compiled with `--compile`.

MFU = tokens/s x FLOPs per token / peak. FLOPs per token = 6N + 12 L H Q T (PaLM, appendix B:
N parameters with the tied embedding counted once, L layers, H heads, Q head size, T sequence
length; the second term is attention). Peak = 989 TFLOP/s, dense bf16 of an H100/H200 SXM (`--peak`
for other GPUs). The Trainer's own Python overhead (dataloader, callbacks) is not included, which
flatters the baseline.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from domainlm.fastpath import use_fast_kernels
from domainlm.loss import CausalLMLoss
from domainlm.models import build_scratch_model

PEAK_BF16_H100_SXM = 989e12


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())  # tied wte/lm_head counted once
    head_dim = cfg.n_embd // cfg.n_head
    return 6 * n_params + 12 * cfg.n_layer * cfg.n_head * head_dim * seq_len


def run_variant(name: str, args: argparse.Namespace, compile_: bool) -> dict:
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = build_scratch_model("gpt2", seed=0).to(device).train()
    fpt = flops_per_token(model, args.block_size)
    if name == "baseline":

        def loss_fn(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return model(input_ids=inputs, labels=inputs, use_cache=False).loss

        if compile_:
            model.compile()
    else:
        use_fast_kernels(model)  # as train.py does
        loss_module = CausalLMLoss(model)
        if compile_:
            model.base_model.compile()

        def loss_fn(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return loss_module(inputs, targets).sum() / targets.numel()

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(
        0, model.config.vocab_size, (args.batch_size, args.block_size + 1), generator=g
    )
    inputs = data[:, :-1].pin_memory().to(device, non_blocking=True)
    targets = data[:, 1:].pin_memory().to(device, non_blocking=True)

    def step() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    started = time.perf_counter()
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - started
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    tokens_per_s = args.steps * args.batch_size * args.block_size / seconds
    result = {
        "variant": name + (" + compile" if compile_ else ""),
        "tokens_per_s": round(tokens_per_s),
        "step_ms": round(1000 * seconds / args.steps, 2),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "mfu": round(tokens_per_s * fpt / args.peak, 4),
        "loss": round(float(loss), 4),
        "warmup_s": round(warm_s, 1),
        "flops_per_token": fpt,
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--peak", type=float, default=PEAK_BF16_H100_SXM, help="peak FLOP/s")
    parser.add_argument("--no-compile", action="store_true", help="eager variants only")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_mfu.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, GPT-2 124M shape, "
          f"block {args.block_size}, batch {args.batch_size}, bf16, peak {args.peak / 1e12:.0f} TFLOP/s")  # fmt: skip
    variants = [("baseline", False), ("domainlm", False)]
    if not args.no_compile:
        variants += [("baseline", True), ("domainlm", True)]
    results = []
    for name, compile_ in variants:
        try:
            results.append(run_variant(name, args, compile_))
        except torch.OutOfMemoryError:
            results.append({"variant": name + (" + compile" if compile_ else ""), "error": "OOM"})
        gc.collect()  # the variant's model and optimizer go with its frame
        torch.cuda.empty_cache()
        torch._dynamo.reset()
        print(json.dumps(results[-1]), flush=True)
    print("\n| variant | tokens/s | step ms | peak GiB | MFU |\n|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['variant']} | {r['error']} | | | |")
        else:
            print(f"| {r['variant']} | {r['tokens_per_s']:,} | {r['step_ms']} | "
                  f"{r['peak_mem_gib']} | {r['mfu']:.1%} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
