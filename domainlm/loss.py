"""The one place where token losses are computed: summed negative log-likelihood per row.

Training divides these sums by the number of target tokens in the whole accumulation window
(over all ranks), and evaluation adds them up in float64, so neither ever averages averages.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from domainlm.data import IGNORE_INDEX


class CausalLMLoss(torch.nn.Module):
    """Wraps a causal LM. forward(...) -> (b,) float32 sums of the NLL of each row's targets.

    It is the module that DDP/FSDP wrap, so that gradients synchronise through its forward.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        extra = {}
        if position_ids is not None:
            extra["position_ids"] = position_ids
        if attention_mask is not None:
            extra["attention_mask"] = attention_mask
        logits = self.model(input_ids=input_ids, use_cache=False, **extra).logits  # (b, T, V)
        return token_nll_sums(logits, targets)


def token_nll_sums(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(b, T, V) logits and (b, T) targets -> (b,) NLL sums in float32, padding ignored."""
    b, t, v = logits.shape
    nll = F.cross_entropy(
        logits.reshape(b * t, v).float(),
        targets.reshape(b * t),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return nll.view(b, t).sum(dim=1)
