"""fastpath.py: kernel swaps that keep the function (GELU, dropout's distribution, attention)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import domainlm.model.fastpath as fastpath
from domainlm.model.fastpath import (
    ATTENTION_NAME,
    FastDropout,
    TanhGELU,
    cpu_dropout,
    sdpa_unless_cpu_dropout,
    use_fast_kernels,
)
from domainlm.model.loading import build_scratch_model


def tiny_gpt2(**dropouts: float) -> torch.nn.Module:
    rates = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, **dropouts}
    return build_scratch_model("tiny", seed=0, **rates)


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50257, (3, 40), generator=torch.Generator().manual_seed(seed))


def test_swaps_keep_the_function_and_the_saved_config(tmp_path: Path) -> None:
    model = tiny_gpt2().eval()
    with torch.no_grad():
        before = model(input_ids=ids()).logits
        layers = model.config.n_layer
        # n_layer GELUs; dropouts: embeddings + 3 per layer; the attention setting
        assert use_fast_kernels(model) == layers + (1 + 3 * layers) + 1
        assert isinstance(model.transformer.h[0].mlp.act, TanhGELU)
        assert isinstance(model.transformer.h[0].attn.attn_dropout, FastDropout)
        assert not model.transformer.h[0].attn.attn_dropout.training  # eval mode kept
        assert model.config._attn_implementation == ATTENTION_NAME
        after = model(input_ids=ids()).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["activation_function"] == "gelu_new" and ATTENTION_NAME not in json.dumps(saved)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids()).logits, before, rtol=1e-5, atol=1e-5)


def test_cpu_dropout_is_bernoulli_p_seeded_and_its_gradient_uses_the_same_mask() -> None:
    p, n = 0.1, 1_000_000
    x = torch.ones(n, requires_grad=True)
    torch.manual_seed(3)
    out = cpu_dropout(x, p)
    dropped = (out == 0).double().mean().item()
    assert abs(dropped - p) < 0.0015  # 5 standard deviations of a Bernoulli(0.1) mean over 1e6
    kept = out[out != 0]
    scale = 1 / (1 - round(p * 2**16) / 2**16)  # p as the mask rounds it: 6,554 / 65,536
    assert torch.all(kept == kept[0]) and kept[0].item() == pytest.approx(scale, rel=1e-7)
    out.sum().backward()
    assert torch.equal(x.grad, out.detach())  # d out / d x = keep * scale
    torch.manual_seed(3)
    assert torch.equal(cpu_dropout(torch.ones(n), p), out.detach())  # the seed decides the mask
    assert torch.equal(cpu_dropout(torch.ones(5), 0.0), torch.ones(5))


def test_the_mask_rate_is_p_rounded_to_16_bits_and_uncorrelated() -> None:
    """The kept share is 1 - round(p * 2^16) / 2^16 for rates that 16 bits round differently
    (0.3 and 0.05 too), and neighbouring elements are independent draws (not one draw repeated
    or shifted: the 16-bit halves of one 64-bit draw are four elements)."""
    n = 4_000_000
    for p in (0.1, 0.3, 0.05):
        torch.manual_seed(11)
        keep = fastpath.keep_mask((n,), p).double()
        rate = round(p * 2**16) / 2**16
        sd = (rate * (1 - rate) / n) ** 0.5
        assert abs((1 - keep.mean().item()) - rate) < 5 * sd
        for lag in (1, 2, 3, 4, 5):  # both kept: (1 - rate)^2 if independent
            both = (keep[:-lag] * keep[lag:]).mean().item()
            assert abs(both - (1 - rate) ** 2) < 5 * sd, (p, lag)


class _Attention(torch.nn.Module):
    is_causal = True


def _qkv(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, 9, 8, generator=g, requires_grad=True) for _ in range(3)]


def _reference(q, k, v, bias: torch.Tensor, keep: torch.Tensor | None, p: float):  # type: ignore[no-untyped-def]
    """The slow obvious formula in float64: softmax(q k^T / sqrt(d) + bias), dropout, @ v."""
    w = torch.softmax((q.double() @ k.double().transpose(-1, -2)) / 8**0.5 + bias, dim=-1)
    if keep is not None:
        w = w * keep / (1 - round(p * 2**16) / 2**16)
    return (w @ v.double()).transpose(1, 2)


@pytest.mark.parametrize("mask", ["causal", "bool", "float"])
def test_attention_with_cpu_dropout_equals_the_formula(mask: str) -> None:
    """The eager path, with its dropout mask redrawn from the same seed for the reference."""
    q, k, v = _qkv()
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    bias = torch.zeros(9, 9, dtype=torch.float64).masked_fill(~causal, float("-inf"))
    attention_mask = {
        "causal": None,
        "bool": causal.expand(2, 1, 9, 9),
        "float": bias.float().clamp(min=torch.finfo(torch.float32).min).expand(2, 1, 9, 9),
    }[mask]
    module, p = _Attention().train(), 0.25
    torch.manual_seed(7)
    got, _ = sdpa_unless_cpu_dropout(module, q, k, v, attention_mask, dropout=p)
    torch.manual_seed(7)
    keep = fastpath.keep_mask((2, 4, 9, 9), p)  # the same draw (its distribution: tests above)
    expected = _reference(q, k, v, bias, keep, p)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    got.sum().backward()
    got_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    expected.sum().backward()
    for got_grad, t in zip(got_grads, (q, k, v), strict=True):
        torch.testing.assert_close(got_grad.double(), t.grad.double(), rtol=1e-5, atol=1e-6)


def test_bf16_attention_is_as_accurate_as_the_float32_softmax(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under bf16 autocast the eager path scales the query, adds the mask in bf16 and takes the
    softmax in bf16: its output and gradients are as close to the float64 formula as those of
    transformers' eager formula (scores scaled and masked, float32 softmax cast to bf16)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = [torch.randn(2, 4, 64, 8, generator=g, requires_grad=True) for _ in range(3)]
    grad_out = torch.randn(2, 64, 4, 8, generator=g)
    causal = torch.ones(64, 64, dtype=torch.bool).tril()
    bias = torch.zeros(64, 64, dtype=torch.float64).masked_fill(~causal, float("-inf"))
    expected = _reference(q, k, v, bias, None, 0.0)
    expected.backward(grad_out.double())
    reference = [expected.detach()] + [t.grad.clone() for t in (q, k, v)]
    monkeypatch.setattr(fastpath, "cpu_dropout", lambda x, p: x)  # the formula without its mask

    def float32_softmax(q, k, v):  # type: ignore[no-untyped-def]
        w = torch.matmul(q, k.transpose(-1, -2)) * 8**-0.5
        w = w.masked_fill(~causal, torch.finfo(w.dtype).min)
        w = F.softmax(w, dim=-1).type(v.dtype)  # autocast: float32
        return torch.matmul(w, v).transpose(1, 2)

    def errors(attention) -> list[float]:  # type: ignore[no-untyped-def]
        for t in (q, k, v):
            t.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = attention(q, k, v)
        got.backward(grad_out)
        results = [got.detach()] + [t.grad for t in (q, k, v)]
        return [
            ((a.double() - b).norm() / b.norm()).item()
            for a, b in zip(results, reference, strict=True)
        ]

    module = _Attention().train()
    eager = errors(lambda q, k, v: sdpa_unless_cpu_dropout(module, q, k, v, None, dropout=0.1)[0])
    baseline = errors(float32_softmax)
    for eager_error, baseline_error in zip(eager, baseline, strict=True):
        assert eager_error < 1.1 * baseline_error, (eager, baseline)


def test_attention_is_sdpa_without_dropout_and_in_eval() -> None:
    q, k, v = _qkv(seed=2)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    for module in (_Attention().train(), _Attention().eval()):  # eval: transformers passes 0.0
        got, _ = sdpa_unless_cpu_dropout(module, q, k, v, None, dropout=0.0)
        torch.testing.assert_close(got, expected)


def test_model_in_training_takes_the_eager_path_with_the_same_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A GPT-2 in train mode with attention dropout goes through the eager formula: with the
    dropout itself made the identity, its logits equal the plain sdpa model's without dropout."""
    plain = tiny_gpt2().train()
    with torch.no_grad():
        expected = plain(input_ids=ids(4)).logits
    model = tiny_gpt2(attn_pdrop=0.1).train()
    use_fast_kernels(model)
    calls = []

    def identity(x: torch.Tensor, p: float) -> torch.Tensor:
        calls.append(p)
        return x

    monkeypatch.setattr(fastpath, "cpu_dropout", identity)
    with torch.no_grad():
        got = model(input_ids=ids(4)).logits
    assert [p for p in calls if p > 0] == [0.1] * model.config.n_layer  # the attention's
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_compiled_backbone_has_no_graph_break_in_training() -> None:
    """`--compile` traces the backbone in one graph on the CPU, dropout included: the fast mask's
    in-place `random_` cannot be traced (a graph break at every dropout), so inside the compiler
    the mask is `F.dropout`'s, which it can fuse."""
    import torch._dynamo

    model = tiny_gpt2(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1).train()
    use_fast_kernels(model)
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(model.base_model)(input_ids=ids(), use_cache=False)
    reasons = [reason.reason.splitlines()[0] for reason in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1
