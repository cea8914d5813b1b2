"""One FLOP count for every benchmark: model FLOPs per trained token, and MFU's peak.

FLOPs per token = 6N + 12 L H Q T (PaLM, appendix B): N parameters that take part in the matmuls,
i.e. all of them except an input embedding that is not also the output layer (a tied GPT-2
embedding counts once, as the head); L layers, H heads, Q head size, T sequence length (the
attention term). A forward pass alone is a third of it.
"""

from __future__ import annotations

import torch

# Dense bf16 peak of an H100/H200 SXM, FLOP/s (the MFU denominator; --peak for other GPUs).
PEAK_BF16_H100_SXM = 989e12


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """6N + 12 L H Q T for a transformers causal LM (real or on the meta device)."""
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())  # a tied weight is listed once
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is None or head.weight is not embedding:
        n_params -= embedding.numel()  # a lookup, not a matmul
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 6 * n_params + 12 * cfg.num_hidden_layers * heads * head_dim * seq_len
