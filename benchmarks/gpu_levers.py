"""One GPU training step, lever by lever: where domainlm's GPU time goes and what each lever buys.

    python3 benchmarks/gpu_levers.py                      # GPT-2 124M shape, block 1024, bf16
    python3 benchmarks/gpu_levers.py --profile chunked+compile --batch-sizes 16 64

Runs in one process on one CUDA GPU. Each variant builds the same random-init GPT-2 (seeded) and
times `--steps` training steps after `--warmup` on random tokens: bf16 autocast, forward, backward,
global-norm clipping at 1.0, fused AdamW (the Trainer's default optimizer), zero_grad. Variants:

- trainer: what the HF Trainer runs per step: `model(input_ids, labels=...)` (full logits and
  transformers' ForCausalLMLoss).
- chunked-v1: domainlm's loss as it was on the CPU: 256-position chunks, 50,257-row head.
- chunked-unfused: domainlm's loss with the vocabulary padded to 50,304 rows inside the loss and
  chunks of ~2^27 logits (domainlm/model/loss.py CUDA_VOCAB_MULTIPLE, CUDA_CHUNK_LOGITS), each chunk's
  softmax, NLL and gradient in separate kernels (the float64-exact evaluation path).
- chunked: domainlm's loss on a GPU: the same with one compiled kernel per chunk for the softmax,
  NLL and gradient (domainlm/model/loss.py fused_nll_and_grad).
- liger: liger-kernel's fused linear cross-entropy on the backbone's hidden states (if installed).
- +compile: the backbone (or for `trainer`, the whole model) compiled with torch.compile.

MFU = tokens/s x FLOPs per token / peak (benchmarks/model_flops.py: 6N + 12 L H Q T; peak 989
TFLOP/s, dense bf16 of an H100/H200 SXM; `--peak` for other GPUs).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable

import torch
from model_flops import PEAK_BF16_H100_SXM, flops_per_token

from domainlm.model.fastpath import use_fast_kernels
from domainlm.model.loading import build_scratch_model
from domainlm.model.loss import CausalLMLoss


def make_loss(
    model: torch.nn.Module, kind: str
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The mean NLL of (inputs, targets) computed the variant's way."""
    if kind == "trainer":
        return lambda inputs, targets: model(input_ids=inputs, labels=inputs, use_cache=False).loss
    if kind == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        fused = LigerFusedLinearCrossEntropyLoss()

        def liger(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            hidden = model.base_model(input_ids=inputs, use_cache=False)[0]
            h = hidden.reshape(-1, hidden.shape[-1])
            return fused(model.lm_head.weight, h, targets.reshape(-1))

        return liger
    import domainlm.model.loss

    domainlm.model.loss.USE_FUSED_KERNEL = kind != "chunked-unfused"
    if kind == "chunked-v1":
        loss = CausalLMLoss(model, chunk_tokens=256, vocab_multiple=1)
    else:
        loss = CausalLMLoss(model)
    return lambda inputs, targets: loss(inputs, targets).sum() / targets.numel()


def run_variant(
    kind: str, compile_: bool, batch: int, args: argparse.Namespace, profile: bool
) -> dict:
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = build_scratch_model("gpt2", seed=0).to(device).train()
    fpt = flops_per_token(model, args.block_size)
    if kind != "trainer":
        use_fast_kernels(model)  # as train.py does
    loss_fn = make_loss(model, kind)
    if compile_:
        (model if kind == "trainer" else model.base_model).compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, model.config.vocab_size, (batch, args.block_size + 1), generator=g)
    inputs = data[:, :-1].contiguous().to(device)
    targets = data[:, 1:].contiguous().to(device)

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
    tokens_per_s = args.steps * batch * args.block_size / seconds
    result = {
        "variant": f"{kind}{' + compile' if compile_ else ''}, batch {batch}",
        "tokens_per_s": round(tokens_per_s),
        "step_ms": round(1000 * seconds / args.steps, 2),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "mfu": round(tokens_per_s * fpt / args.peak, 4),
        "loss": round(float(loss), 4),
        "warmup_s": round(warm_s, 1),
    }
    if profile:
        result["profile"] = profile_steps(step, 3)
    return result


def profile_steps(step: Callable[[], torch.Tensor], n: int) -> dict:
    """Per step: wall ms, summed kernel ms, host (CPU) ms of the top-level ops; top kernels."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        for _ in range(n):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - started) / n
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
    top_kernels = sorted(
        (e for e in events if e.device_type.name == "CUDA"),
        key=lambda e: e.self_device_time_total,
        reverse=True,
    )[:12]
    top_cpu = sorted(
        (e for e in events if e.device_type.name == "CPU"),
        key=lambda e: e.self_cpu_time_total,
        reverse=True,
    )[:12]
    return {
        "wall_ms_per_step_profiled": round(1000 * wall, 2),
        "kernel_ms_per_step": round(kernel_us / 1000 / n, 2),
        "host_self_ms_per_step": round(
            sum(e.self_cpu_time_total for e in events if e.device_type.name == "CPU") / 1000 / n, 2
        ),
        "top_kernels": [
            (e.key[:90], round(e.self_device_time_total / 1000 / n, 3), e.count // n)
            for e in top_kernels
        ],
        "top_host_ops": [
            (e.key[:60], round(e.self_cpu_time_total / 1000 / n, 3), e.count // n) for e in top_cpu
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["trainer", "chunked-v1", "chunked", "chunked+compile", "liger+compile"],
    )
    parser.add_argument(
        "--profile", nargs="*", default=[], help="variants to profile (at the first batch size)"
    )
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak", type=float, default=PEAK_BF16_H100_SXM, help="peak FLOP/s")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_levers.py needs a CUDA GPU")
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, GPT-2 124M shape, "
        f"block {args.block_size}, bf16, peak {args.peak / 1e12:.0f} TFLOP/s",
        flush=True,
    )
    results = []
    for batch in args.batch_sizes:
        for variant in args.variants:
            kind, _, extra = variant.partition("+")
            name = f"{variant}, batch {batch}"
            try:
                r = run_variant(
                    kind,
                    extra == "compile",
                    batch,
                    args,
                    variant in args.profile and batch == args.batch_sizes[0],
                )
            except torch.OutOfMemoryError:
                r = {"variant": name, "error": "OOM"}
            except Exception as exc:  # noqa: BLE001 - a lever that cannot run is reported, not fatal
                r = {
                    "variant": name,
                    "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                }
            results.append(r)
            gc.collect()
            torch.cuda.empty_cache()
            torch._dynamo.reset()
            print(json.dumps(r), flush=True)
    print("\n| variant | tokens/s | step ms | peak GiB | MFU |\n|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['variant']} | {r['error']} | | | |")
        else:
            print(
                f"| {r['variant']} | {r['tokens_per_s']:,} | {r['step_ms']} | "
                f"{r['peak_mem_gib']} | {r['mfu']:.1%} |"
            )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
