"""Faster kernels for the same function: swaps that change no weight, no saved config and no
result beyond float rounding (and, for dropout, which random mask is drawn), applied to a model in
memory before training or evaluation. Saved models are unaffected: only module objects and the
in-memory attention choice change, so `config.json` still says `gelu_new` and loads as before.

- GELU: transformers' `NewGELUActivation` (`gelu_new`) is seven elementwise Python operations,
  each a pass over the (b, T, 4H) MLP activations that also stores its input for backward.
  `F.gelu(x, approximate="tanh")` is the same formula in one fused kernel (transformers' own
  `gelu_pytorch_tanh` says as much): a GPT-2 backbone's CPU training step ~10% faster.
- Dropout on CPU: `bernoulli_` draws each element serially at ~6 ns, and PyTorch's own integer
  draw (`random_`) at ~2.5-3 ns. `keep_mask` draws 16 random bits per element from numpy's SFC64
  (~0.7 ns), seeded from torch's generator (so `torch.manual_seed` and a checkpoint's saved RNG
  state decide the mask), and keeps an element when its bits are >= p * 2^16: a Bernoulli mask
  whose rate is p rounded to a multiple of 2^-16 (0.1 -> 0.1000061; the scale uses the same
  rounded p, so the expected output is unchanged). It is kept as uint8 (1 byte, as a bool): the
  product with a bool mask takes the CPU's slow mixed-dtype path, a uint8 mask cast to x's dtype
  does not. One GPT-2 attention mask (3.1M elements): 4.7 ms against `random_`'s 21.8 ms, its
  product 2.2 ms against 6.1 ms (2-core Xeon with AMX; benchmarks/cpu_kernels.py).
- Attention while training with dropout on CPU: SDPA's CPU kernels have no dropout, so
  `F.scaled_dot_product_attention(dropout_p > 0)` falls back to a float32 math path with a
  bernoulli_ mask and NaN-guarded softmax: ~50 ms per GPT-2 layer (fwd+bwd, batch 4 x 256) against
  ~28 ms for transformers' own eager formula (bf16 matmuls under autocast, float32 softmax) with
  the fast mask. `sdpa_unless_cpu_dropout` goes further: the query is scaled before its product
  (a (T, d) pass instead of a (T, T) one), the mask is added as a bias in the scores' dtype, and
  the softmax runs on the scores' dtype (autocast would take it to float32 and back: two casts
  each way per layer). Its output and gradients are as close to the float64 formula as those of
  the float32 softmax cast to bf16
  (tests/test_fastpath.py::test_bf16_attention_is_as_accurate_as_the_float32_softmax). It is `sdpa`
  everywhere else (evaluation, GPUs, grouped heads, position biases).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# The in-memory attention implementation name (never saved: transformers drops it from config.json)
ATTENTION_NAME = "sdpa_unless_cpu_dropout"


class TanhGELU(torch.nn.Module):
    """GELU, tanh approximation, one fused kernel: the function of `gelu_new`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


# Random bits per mask element: p is rounded to a multiple of 2^-MASK_BITS (0.1 -> 0.1000061);
# the scale 1 / (1 - p) uses the rounded p, so the expected output is still x.
MASK_BITS = 16


def keep_threshold(p: float) -> int:
    """Dropout rate p as the threshold of `keep_mask`: keep when the bits are >= p * 2^MASK_BITS."""
    return round(p * 2**MASK_BITS)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A uint8 tensor of `shape`, 1 with probability 1 - keep_threshold(p) / 2^MASK_BITS: 16-bit
    draws of numpy's SFC64, seeded with 64 bits from torch's default generator."""
    count = math.prod(shape)
    keep = torch.empty(count, dtype=torch.uint8)
    seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)) % 2**64
    bits = np.random.SFC64(seed).random_raw(-(-count // 4)).view(np.uint16)[:count]
    np.greater_equal(bits, keep_threshold(p), out=keep.numpy().view(np.bool_))
    return keep.view(shape)


def _masked(x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """x * keep * scale, rounded once as before; the mask cast to x's dtype first (fast)."""
    return torch.mul(x, keep.to(x.dtype)).mul_(scale)


class _CPUDropout(torch.autograd.Function):
    """x * keep / (1 - p), keep from `keep_mask`; backward reuses the mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:  # type: ignore[override]
        keep = keep_mask(x.shape, p)
        ctx.scale = 1.0 / (1.0 - keep_threshold(p) / 2**MASK_BITS)
        ctx.save_for_backward(keep)
        return _masked(x, keep, ctx.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return _masked(grad, keep, ctx.scale), None


def cpu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout; the fast mask on CPU, `F.dropout` elsewhere, for p outside (0, 1)
    or so near 0 or 1 that `keep_threshold` rounds it there, or inside torch.compile (which
    cannot trace the mask's numpy draw: a graph break at every dropout, while the compiler fuses
    `F.dropout`'s own mask)."""
    if (
        x.device.type != "cpu"
        or not 0.0 < p < 1.0
        or not 0 < keep_threshold(p) < 2**MASK_BITS
        or torch.compiler.is_compiling()
    ):
        return F.dropout(x, p, training=True)
    return _CPUDropout.apply(x, p)


class FastDropout(torch.nn.Dropout):
    """nn.Dropout (same `p`, same eval behaviour) whose CPU training mask is `cpu_dropout`'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.device.type == "cpu" and not self.inplace:
            return cpu_dropout(x, self.p)
        return super().forward(x)


def sdpa_unless_cpu_dropout(  # type: ignore[no-untyped-def]
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs
):
    """transformers' `sdpa` attention, except when training with dropout on a CPU with one key
    head per query head and no position bias: there, the eager formula with `cpu_dropout`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    eager = (
        dropout > 0.0
        and module.training
        and query.device.type == "cpu"
        and key.shape[1] == query.shape[1]  # no grouped key/value heads
        and key.shape[2] == query.shape[2]  # no cache
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
    )
    if not eager:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    weights = torch.matmul(query * scale, key.transpose(-1, -2))
    lowest = torch.finfo(weights.dtype).min  # as transformers' eager masks: no NaN on empty rows
    if attention_mask is None:
        is_causal = kwargs.get("is_causal")
        is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if is_causal and query.shape[2] > 1:
            n = query.shape[2]  # the future (above the diagonal) at `lowest`, the rest 0
            future = torch.full((n, n), lowest, dtype=weights.dtype, device=query.device).triu(1)
            weights = weights + future
    elif attention_mask.dtype == torch.bool:  # sdpa masks: True = may attend
        bias = torch.zeros(attention_mask.shape, dtype=weights.dtype, device=query.device)
        weights = weights + bias.masked_fill_(~attention_mask, lowest)
    else:  # an additive float mask, its -inf or float32 minimum clamped into the scores' range
        weights = weights + attention_mask.clamp(min=lowest).to(weights.dtype)
    with torch.autocast(query.device.type, enabled=False):  # softmax in the scores' dtype
        weights = F.softmax(weights, dim=-1).type(value.dtype)
    weights = cpu_dropout(weights, dropout)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), None


def _use_fast_attention(model: torch.nn.Module) -> bool:
    """Route a model that uses `sdpa` through `sdpa_unless_cpu_dropout` (same masks)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or getattr(
        config, "sub_configs", None
    ):
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, sdpa_unless_cpu_dropout)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    config._attn_implementation = ATTENTION_NAME
    return True


def use_fast_kernels(model: torch.nn.Module) -> int:
    """Apply every swap above in place; returns how many modules or settings were changed."""
    from transformers.activations import NewGELUActivation

    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is NewGELUActivation:
                setattr(module, name, TanhGELU())
                replaced += 1
            elif type(child) is torch.nn.Dropout:
                setattr(module, name, FastDropout(child.p, child.inplace).train(child.training))
                replaced += 1
    return replaced + int(_use_fast_attention(model))
