"""Faster kernels for the same function: swaps that change no weight, no saved config and no
result beyond float rounding (and, for dropout, which random mask is drawn), applied to a model in
memory before training or evaluation. Saved models are unaffected: only module objects and the
in-memory attention choice change, so `config.json` still says `gelu_new` and loads as before.

- GELU: transformers' `NewGELUActivation` (`gelu_new`) is seven elementwise Python operations,
  each a pass over the (b, T, 4H) MLP activations that also stores its input for backward.
  `F.gelu(x, approximate="tanh")` is the same formula in one fused kernel (transformers' own
  `gelu_pytorch_tanh` says as much): a GPT-2 backbone's CPU training step ~10% faster.
- Dropout on CPU: `bernoulli_` draws each element serially at ~6 ns; `cpu_dropout` draws one
  31-bit integer per element (~2.4 ns) and keeps it when it is >= p * 2^31: the same Bernoulli
  distribution (p rounded to a multiple of 2^-31, as fine as bernoulli_'s own float compare),
  from torch's seeded generator, 1.7-2.3x faster.
- Attention while training with dropout on CPU: SDPA's CPU kernels have no dropout, so
  `F.scaled_dot_product_attention(dropout_p > 0)` falls back to a float32 math path with a
  bernoulli_ mask and NaN-guarded softmax: ~50 ms per GPT-2 layer (fwd+bwd, batch 4 x 256) against
  ~28 ms for transformers' own eager formula (bf16 matmuls under autocast, float32 softmax) with
  `cpu_dropout`. `SdpaUnlessCpuDropout` is `sdpa` everywhere else (evaluation, GPUs, masks with
  grouped heads or position biases).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The in-memory attention implementation name (never saved: transformers drops it from config.json)
ATTENTION_NAME = "sdpa_unless_cpu_dropout"


class TanhGELU(torch.nn.Module):
    """GELU, tanh approximation, one fused kernel: the function of `gelu_new`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class _CPUDropout(torch.autograd.Function):
    """x * keep / (1 - p), keep drawn as 31-bit integers >= p * 2^31; backward reuses the mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:  # type: ignore[override]
        threshold = round(p * 2**31)
        keep = torch.empty(x.shape, dtype=torch.int32).random_() >= threshold  # [0, 2^31)
        ctx.scale = 1.0 / (1.0 - threshold / 2**31)
        ctx.save_for_backward(keep)
        return x * keep * ctx.scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None


def cpu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout; the fast mask on CPU, `F.dropout` elsewhere, for p outside (0, 1),
    or inside torch.compile (which cannot trace the mask's in-place `random_`: a graph break at
    every dropout, while the compiler fuses `F.dropout`'s own mask)."""
    if x.device.type != "cpu" or not 0.0 < p < 1.0 or torch.compiler.is_compiling():
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
    weights = torch.matmul(query, key.transpose(-1, -2)) * scale
    lowest = torch.finfo(weights.dtype).min  # as transformers' eager masks: no NaN on empty rows
    if attention_mask is None:
        is_causal = kwargs.get("is_causal")
        is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if is_causal and query.shape[2] > 1:
            n = query.shape[2]
            future = torch.ones(n, n, dtype=torch.bool, device=query.device).triu(1)
            weights = weights.masked_fill(future, lowest)
    elif attention_mask.dtype == torch.bool:  # sdpa masks: True = may attend
        weights = weights.masked_fill(~attention_mask, lowest)
    else:
        weights = weights + attention_mask
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
