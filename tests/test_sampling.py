"""top-k, top-p and the repetition penalty (domainlm/text/sampling.py) against plain-Python references.

Issue 12: "top-k, top-p and the repetition penalty are not tested at all". The references below
work on Python lists of floats with `math.exp`, one token at a time, and share no code with the
torch implementation.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from domainlm.model.loading import load_model
from domainlm.text.sampling import SamplingSettings, filtered_logits, next_tokens, sample_batch


def reference_probs(
    logits: list[float],
    seen: set[int],
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    penalty: float = 1.0,
) -> list[float]:
    """The sampling distribution, the slow obvious way."""
    values = list(logits)
    for i in seen:  # CTRL: a seen token's logit moves towards "less likely" whatever its sign
        values[i] = values[i] / penalty if values[i] > 0 else values[i] * penalty
    values = [v / temperature for v in values]
    keep = set(range(len(values)))
    if top_k:
        kth = sorted(values, reverse=True)[min(top_k, len(values)) - 1]
        keep = {i for i in keep if values[i] >= kth}
    if top_p < 1.0:
        z = sum(math.exp(values[i]) for i in keep)
        probs = {i: math.exp(values[i]) / z for i in keep}
        kept, covered = set(), 0.0
        for i in sorted(keep, key=lambda i: -probs[i]):
            if covered >= top_p:  # the tokens taken so far already cover top_p
                break
            kept.add(i)
            covered += probs[i]
        keep = kept
    z = sum(math.exp(values[i]) for i in keep)
    return [math.exp(values[i]) / z if i in keep else 0.0 for i in range(len(values))]


def probs_of(logits: list[list[float]], seen: list[set[int]], settings: SamplingSettings):  # type: ignore[no-untyped-def]
    x = torch.tensor(logits, dtype=torch.float32)
    mask = torch.zeros_like(x, dtype=torch.bool)
    for row, tokens in enumerate(seen):
        mask[row, list(tokens)] = True
    return torch.softmax(filtered_logits(x, mask, settings), dim=-1).double()


QUARTERS = [math.log(p) for p in (0.5, 0.3, 0.15, 0.05)]  # probabilities 0.5, 0.3, 0.15, 0.05


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [(0.4, [0]), (0.6, [0, 1]), (0.79, [0, 1]), (0.81, [0, 1, 2]), (0.9, [0, 1, 2]), (0.97, [0, 1, 2, 3])],
)  # fmt: skip
def test_top_p_keeps_the_fewest_tokens_that_cover_p(top_p, kept):
    """By hand: 0.5 alone covers 0.4; 0.5 + 0.3 covers up to 0.8; + 0.15 up to 0.95."""
    probs = probs_of([QUARTERS], [set()], SamplingSettings(top_p=top_p))[0]
    assert [i for i in range(4) if probs[i] > 0] == kept
    total = sum((0.5, 0.3, 0.15, 0.05)[i] for i in kept)
    expected = [(0.5, 0.3, 0.15, 0.05)[i] / total if i in kept else 0.0 for i in range(4)]
    assert probs.tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("top_k", "kept"), [(1, [0]), (2, [0, 1]), (3, [0, 1, 2]), (9, [0, 1, 2, 3])]
)
def test_top_k_keeps_the_k_largest(top_k, kept):
    probs = probs_of([QUARTERS], [set()], SamplingSettings(top_k=top_k))[0]
    assert [i for i in range(4) if probs[i] > 0] == kept


def test_repetition_penalty_by_hand():
    """Seen tokens: a positive logit is divided by the penalty, a negative one multiplied."""
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    seen = torch.tensor([[True, True, False, False]])
    got = filtered_logits(logits, seen, SamplingSettings(temperature=0, repetition_penalty=2.0))
    assert got.tolist() == [[1.0, -2.0, 0.5, -3.0]]
    # Greedy: the penalty moves the choice away from a seen token, for either sign of logit.
    for row, expected in (([2.0, 1.5], 1), ([-0.5, -0.6], 1)):
        choice = next_tokens(
            torch.tensor([row]), torch.tensor([[True, False]]),
            SamplingSettings(temperature=0, repetition_penalty=2.0), None,
        )  # fmt: skip
        assert choice.tolist() == [expected]


@pytest.mark.parametrize(
    "settings",
    [SamplingSettings(temperature=1e-38), SamplingSettings(temperature=1e-45),
     SamplingSettings(temperature=1.0, repetition_penalty=1e-38)],
)  # fmt: skip
def test_extreme_settings_sample_the_limit_not_nan(settings: SamplingSettings) -> None:
    """A temperature or penalty so small that dividing by it overflows: the distribution is its
    limit (all on the largest logit; ties share it), not NaN (multinomial raised)."""
    logits = torch.tensor([[2.0, 3.0, -1.0, 3.0], [5.0, -4.0, 7.0, 6.0]])
    seen = torch.tensor([[False, False, False, False], [True, False, True, True]])
    probs = torch.softmax(filtered_logits(logits, seen, settings), dim=-1)
    assert torch.isfinite(probs).all()
    if settings.repetition_penalty == 1.0:
        assert probs.tolist() == [[0.0, 0.5, 0.0, 0.5], [0.0, 0.0, 1.0, 0.0]]
    else:  # every seen positive logit overflows to the same largest value: they share it
        assert probs.tolist()[1] == pytest.approx([1 / 3, 0.0, 1 / 3, 1 / 3])
    draws = next_tokens(logits, seen, settings, torch.Generator().manual_seed(0))
    assert probs[torch.arange(2), draws].min() > 0


def test_all_settings_together_match_the_reference():
    generator = torch.Generator().manual_seed(3)
    logits = (torch.randn(6, 12, generator=generator) * 2).tolist()
    seen = [{0, 3}, {1}, set(), {2, 5, 7}, set(range(12)), {11}]
    for temperature, top_k, top_p, penalty in [
        (1.0, None, 1.0, 1.3),
        (0.7, 5, 1.0, 1.0),
        (1.3, None, 0.62, 1.0),
        (0.9, 6, 0.8, 1.5),
        (1.0, 3, 0.5, 0.8),
    ]:
        settings = SamplingSettings(
            temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty
        )
        got = probs_of(logits, seen, settings)
        for row in range(len(logits)):
            expected = reference_probs(
                logits[row], seen[row], temperature=temperature, top_k=top_k, top_p=top_p,
                penalty=penalty,
            )  # fmt: skip
            assert got[row].tolist() == pytest.approx(expected, abs=1e-6)


def test_sampled_tokens_are_only_the_kept_ones_in_proportion():
    """Draws from `next_tokens` itself: only kept tokens, at about their reference frequency."""
    settings = SamplingSettings(top_p=0.81)  # keeps 0.5, 0.3, 0.15 of QUARTERS
    generator = torch.Generator().manual_seed(0)
    logits = torch.tensor([QUARTERS] * 20000)
    draws = next_tokens(logits, None, settings, generator)
    counts = torch.bincount(draws, minlength=4).double() / len(draws)
    assert counts[3] == 0
    assert counts.tolist() == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0], abs=0.015)


def test_penalized_greedy_generation_equals_a_slow_loop(tiny_model_dir: Path):
    """sample_batch marks the prompt and every generated token as seen, row by row."""
    loaded = load_model(str(tiny_model_dir))
    model, eos = loaded.model.eval(), loaded.eos_id
    prompts = [[464, 3797, 3332, 464], [40]]
    settings = SamplingSettings(temperature=0, repetition_penalty=1.5)
    got = sample_batch(model, prompts, eos_id=eos, max_new_tokens=10, settings=settings)
    for prompt, result in zip(prompts, got, strict=True):
        ids, seen, out = [eos, *prompt], set(prompt), []
        for _ in range(10):
            with torch.no_grad():
                row = model(torch.tensor([ids])).logits[0, -1].tolist()
            for i in seen:
                row[i] = row[i] / 1.5 if row[i] > 0 else row[i] * 1.5
            token = max(range(len(row)), key=row.__getitem__)
            if token == eos:
                break
            out.append(token)
            ids.append(token)
            seen.add(token)
        assert result.tokens == out
    plain = sample_batch(
        model, prompts, eos_id=eos, max_new_tokens=10, settings=SamplingSettings(temperature=0)
    )
    assert [r.tokens for r in plain] != [r.tokens for r in got]  # the penalty changed something
