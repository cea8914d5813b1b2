"""The token loop behind `domainlm generate`: batched, left-padded, KV-cached sampling.

Pure torch over token ids, so tests can compare it with a slow obvious loop. Every prompt is
preceded by the context every document of the token stream starts from in training: the EOS, or
the BOS of tokenizers that put one before a text (`LoadedModel.start_ids`). Random
choices draw from private `torch.Generator`s, one per sample (`sample_seed`), so a seed
reproduces a sample whatever runs beside it, and the global RNG (dropout, the training loop) is
never touched.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from domainlm.errors import UserError


@dataclass(frozen=True)
class SamplingSettings:
    """How the next token is chosen from the logits. temperature 0 means greedy (argmax)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # nan too
            raise UserError(f"--temperature must be 0 (greedy) or more, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise UserError(f"--top-k must be 0 (off) or more, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:  # nan too
            raise UserError(f"--repetition-penalty must be positive, got {self.repetition_penalty}")


Generators = torch.Generator | Sequence[torch.Generator] | None


def next_tokens(
    logits: torch.Tensor,
    seen: torch.Tensor | None,
    settings: SamplingSettings,
    generator: Generators,
) -> torch.Tensor:
    """(b,) next token ids from (b, V) float logits; `seen` (b, V) bool marks tokens for the penalty.

    `generator`: one for the batch, or one per row (a row's draws are then its own, whatever
    else is in the batch)."""
    logits = filtered_logits(logits, seen, settings)
    if settings.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits, dim=-1)
    if isinstance(generator, Sequence):
        rows = [
            torch.multinomial(probs[i : i + 1], 1, generator=g) for i, g in enumerate(generator)
        ]
        return torch.cat(rows).squeeze(1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def filtered_logits(
    logits: torch.Tensor, seen: torch.Tensor | None, settings: SamplingSettings
) -> torch.Tensor:
    """The (b, V) logits that `next_tokens` samples from: softmax of them is the distribution.

    In order: the repetition penalty on `seen` tokens; then (temperature > 0) division by the
    temperature, top-k (the k largest logits stay, ties with the k-th too) and top-p (the fewest
    most likely tokens whose probabilities sum to at least top_p stay); a dropped token is -inf.
    """
    if settings.repetition_penalty != 1.0 and seen is not None:
        # CTRL's penalty (as in HF): make already-seen tokens less likely, whatever the logit's sign.
        r = settings.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
        logits = logits.clamp(max=torch.finfo(logits.dtype).max)  # a tiny r: no +inf, no NaN
    if settings.temperature == 0:
        return logits
    # Shifted to a maximum of 0 first (softmax is the same): a tiny temperature then sends the
    # others to -inf, never the largest to +inf (whose softmax is NaN).
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / settings.temperature
    if settings.top_k:
        k = min(settings.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already cover top_p (the first always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= settings.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@dataclass
class Continuation:
    """The tokens generated after one prompt; `stopped_at_eos` when EOS ended it (EOS not included)."""

    tokens: list[int]
    stopped_at_eos: bool


@torch.no_grad()
def sample_batch(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    eos_id: int,
    max_new_tokens: int,
    settings: SamplingSettings,
    generator: Generators = None,
    context_length: int | None = None,
    pad_id: int | None = None,
    on_step: Callable[[list[list[int]]], None] | None = None,
    start: Sequence[int] | None = None,
) -> list[Continuation]:
    """Continue each prompt (token ids; `start` is put in front, by default the EOS) until EOS or
    `max_new_tokens`.

    The prompts are left-padded into one batch; position ids count real tokens only, so a padded
    row computes the same thing as the prompt alone. With `context_length`, every row stops where
    the batch's longest prompt fills the context (`generate_samples` batches a prompt that the
    context would cut alone). `generator`: one, or one per prompt (`next_tokens`). `on_step`
    sees the tokens generated so far.
    """
    device = next(model.parameters()).device
    pad_id = eos_id if pad_id is None else pad_id
    start = [eos_id] if start is None else [int(t) for t in start]
    rows = [[*start, *map(int, p)] for p in prompts]
    width = max(len(r) for r in rows)
    if context_length is not None:
        if width > context_length:
            raise UserError(
                f"a prompt of {width - len(start)} tokens does not fit the model's context of "
                f"{context_length} tokens; shorten it"
            )
        max_new_tokens = min(max_new_tokens, context_length - width)
    b = len(rows)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((b, width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row, device=device)
        mask[i, width - len(row) :] = 1
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)  # (b, width)

    vocab = int(model.get_input_embeddings().weight.shape[0])
    seen = None
    if settings.repetition_penalty != 1.0:
        seen = torch.zeros((b, vocab), dtype=torch.bool, device=device)
        for i, row in enumerate(rows):
            seen[i, torch.tensor(row[len(start) :], dtype=torch.long, device=device)] = True

    generated: list[list[int]] = [[] for _ in range(b)]
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    cache_arg = cache_argument(model)
    step_ids, step_positions, past = input_ids, positions, None
    for _ in range(max_new_tokens):
        out = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=step_positions,
            use_cache=True,
            **{cache_arg: past},
        )
        past = getattr(out, cache_arg)
        logits = out.logits[:, -1, :vocab].float()  # (b, V)
        chosen = next_tokens(logits, seen, settings, generator)
        chosen = torch.where(finished, torch.full_like(chosen, pad_id), chosen)
        is_eos = (chosen == eos_id) & ~finished
        for i, token in enumerate(chosen.tolist()):
            if not finished[i] and not is_eos[i]:
                generated[i].append(token)
        finished |= is_eos
        if on_step is not None:
            on_step(generated)
        if bool(finished.all()):
            break
        if seen is not None:
            seen[torch.arange(b, device=device), chosen] = True
        step_ids = chosen[:, None]  # (b, 1)
        step_positions = step_positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=device)], dim=1)
    return [Continuation(g, bool(f)) for g, f in zip(generated, finished.tolist(), strict=True)]


def cache_argument(model: torch.nn.Module) -> str:
    """The KV-cache keyword of this model's forward: `cache` (transformers >= 5.2x) or the old name."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def sample_seed(seed: int | None, prompt: str, sample: int) -> int | None:
    """The seed of one sample's generator: from --seed, the prompt's text and the sample's number,
    so a sample is the same whatever the other prompts and the batch it runs in (None: None)."""
    if seed is None:
        return None
    digest = hashlib.sha256(f"{seed}\0{sample}\0{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A private RNG on `device`: seeded when a seed is given, else from fresh entropy."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
