"""The CPU step's elementwise levers, each against what it replaced, on GPT-2 124M's shapes.

    .venv/bin/python benchmarks/cpu_kernels.py            # 9 alternating rounds

Each lever is a pair of callables timed in alternating rounds (the median of 3 calls per round,
then the median over rounds), in one process with domainlm's malloc setting, on the tensors one
training step of batch 4 x 256 in bf16 has:

- attention: one layer's eager attention, forward + backward under bf16 autocast, dropout left out:
  transformers' eager formula (scores scaled and masked, float32 softmax cast to bf16) vs
  `fastpath.sdpa_unless_cpu_dropout` (query scaled, mask as a bf16 bias, bf16 softmax).
- mask draw: one attention dropout mask (4 x 12 x 255 x 255): PyTorch's `random_` on int32 vs
  `fastpath.keep_mask` (16-bit SFC64 draws).
- mask product: x * keep * scale with a bool mask vs `fastpath._masked` with the uint8 mask.
- head gradient scale: the (50,257 x 768) bf16 head gradient times a float32 (1,) scale, as a
  mixed-dtype product vs `loss._scaled_float32`.
- softmax sum: one 256-position chunk's float32 softmax summed per row in float64 (evaluation)
  vs float32 (training).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from domainlm.model.malloc import reuse_freed_host_memory

reuse_freed_host_memory()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import domainlm.model.fastpath as fastpath  # noqa: E402
from domainlm.model.loss import _scaled_float32  # noqa: E402

B, HEADS, T, D, VOCAB, HIDDEN = 4, 12, 255, 64, 50257, 768


class _Attention(torch.nn.Module):
    is_causal = True


def attention_pair() -> tuple[Callable[[], object], Callable[[], object]]:
    g = torch.Generator().manual_seed(0)
    qkv = [torch.randn(B, T, HEADS, D, generator=g).transpose(1, 2).requires_grad_() for _ in "qkv"]
    grad_out = torch.randn(B, T, HEADS, D, generator=g)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    module = _Attention().train()

    def transformers_eager(q, k, v):  # type: ignore[no-untyped-def]
        w = torch.matmul(q, k.transpose(-1, -2)) * D**-0.5
        w = w.masked_fill(future, torch.finfo(w.dtype).min)
        w = F.softmax(w, dim=-1).type(v.dtype)
        return torch.matmul(w, v).transpose(1, 2)

    def domainlm_eager(q, k, v):  # type: ignore[no-untyped-def]
        return fastpath.sdpa_unless_cpu_dropout(module, q, k, v, None, dropout=0.1)[0]

    def run(attention) -> Callable[[], object]:  # type: ignore[no-untyped-def]
        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = attention(*[t.bfloat16() for t in qkv])
            out.backward(grad_out)

        return step

    return run(transformers_eager), run(domainlm_eager)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    p, shape = 0.1, (B, HEADS, T, T)
    x = torch.randn(shape).bfloat16()
    bool_keep = torch.rand(shape) >= p
    uint8_keep = bool_keep.view(torch.uint8)
    head_grad = torch.randn(VOCAB, HIDDEN).bfloat16()
    loss_scale = torch.tensor([1 / 1020])
    probs = torch.softmax(torch.randn(256, VOCAB), dim=1)
    threshold = round(p * 2**31)
    old_attention, new_attention = attention_pair()
    levers = {
        "attention, one layer fwd+bwd": (old_attention, new_attention),
        "mask draw, 3.1M elements": (
            lambda: torch.empty(shape, dtype=torch.int32).random_() >= threshold,
            lambda: fastpath.keep_mask(shape, p),
        ),
        "mask product, 3.1M bf16": (
            lambda: x * bool_keep * (1 / (1 - p)),
            lambda: fastpath._masked(x, uint8_keep, 1 / (1 - p)),
        ),
        "head gradient scale": (
            lambda: head_grad * loss_scale,
            lambda: _scaled_float32(head_grad, loss_scale),
        ),
        "softmax sum, one chunk": (
            lambda: probs.sum(dim=1, dtype=torch.float64),
            lambda: probs.sum(dim=1),
        ),
    }
    real_dropout = fastpath.cpu_dropout
    fastpath.cpu_dropout = lambda x, p: x  # attention without its mask: the formula alone
    try:
        times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in levers}
        for _ in range(args.rounds):
            for name, pair in levers.items():
                for run, sink in zip(pair, times[name], strict=True):
                    run()
                    calls = []
                    for _ in range(3):
                        started = time.perf_counter()
                        run()
                        calls.append(time.perf_counter() - started)
                    sink.append(statistics.median(calls) * 1e3)
    finally:
        fastpath.cpu_dropout = real_dropout
    print("| lever | before, ms | after, ms | speed-up |\n|---|---|---|---|")
    for name, (before, after) in times.items():
        old, new = statistics.median(before), statistics.median(after)
        print(f"| {name} | {old:.2f} | {new:.2f} | {old / new:.2f}x |")


if __name__ == "__main__":
    main()
