"""CausalLMLoss: the chunked head + cross-entropy equals full-logits cross-entropy, gradients too."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import domainlm.model.loss
from domainlm.data.blocks import IGNORE_INDEX
from domainlm.model.loading import build_scratch_model
from domainlm.model.loss import CausalLMLoss, _nll_and_softmax, chunked_nll_sums, linear_head


def reference_row_sums(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor):
    """The slow obvious definition: full logits, cross-entropy in float64, summed per row."""
    logits = model(input_ids=inputs, use_cache=False).logits.double()
    nll = F.cross_entropy(
        logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return nll.sum(dim=1)


def batch(seed: int = 0, b: int = 3, t: int = 40, vocab: int = 50257):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, vocab, (b, t), generator=g)
    targets = torch.randint(0, vocab, (b, t), generator=g)
    targets[0, -7:] = IGNORE_INDEX  # a padded last block
    targets[2, :25] = IGNORE_INDEX  # an evaluation window with context positions
    return inputs, targets


def tiny_gpt2() -> torch.nn.Module:
    return build_scratch_model(
        "tiny", seed=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    ).train()


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "chunk, row_weights",
    [(7, [0.5, 2.0, 1.0]), (64, [0.25, 0.25, 0.25]), (1000, [1.0, 1.0, 1.0])],
)
def test_chunked_loss_equals_full_logits_fp32_values_and_gradients(
    chunk: int, row_weights: list[float]
) -> None:
    """Uniform upstream gradients (training) use the gradients formed in forward; non-uniform
    ones recompute the head's gradient: both must equal the reference."""
    model = tiny_gpt2()
    inputs, targets = batch()
    weights = torch.tensor(row_weights)

    expected = reference_row_sums(model, inputs, targets)
    (expected * weights).sum().backward()
    expected_grads = grads(model)
    model.zero_grad(set_to_none=True)

    loss = CausalLMLoss(model, chunk_tokens=chunk)
    assert linear_head(model) is model.lm_head  # the chunked path is the one under test
    got = loss(inputs, targets)
    (got * weights).sum().backward()
    got_grads = grads(model)

    assert got.dtype == torch.float64 and got.shape == (3,)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    assert got_grads.keys() == expected_grads.keys()
    for name, g in expected_grads.items():
        assert_close_relative(got_grads[name], g, name)


def assert_close_relative(got: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Equal to 1e-5 relative to the tensor's scale (elementwise, tiny entries included)."""
    scale = expected.abs().max().item()
    error = (got - expected).abs().max().item()
    assert error <= 1e-5 * scale, f"{name}: max error {error:.3g} vs scale {scale:.3g}"


def test_gradients_formed_over_several_groups_equal_full_logits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The head's gradients are built one group of positions at a time (GRAD_GROUP_TOKENS, 2,048
    normally); groups of 10 with chunks of 7 inside them must give the same gradients."""
    monkeypatch.setattr(domainlm.model.loss, "GRAD_GROUP_TOKENS", 10)
    model = tiny_gpt2()
    inputs, targets = batch(seed=5)
    reference_row_sums(model, inputs, targets).sum().backward()
    expected_grads = grads(model)
    model.zero_grad(set_to_none=True)
    got = CausalLMLoss(model, chunk_tokens=7)(inputs, targets)
    got.sum().backward()
    torch.testing.assert_close(got, reference_row_sums(model, inputs, targets), rtol=1e-5, atol=0)
    for name, g in expected_grads.items():
        assert_close_relative(grads(model)[name], g, name)


def test_nll_and_softmax_are_float64_exact_and_skip_rows_without_target() -> None:
    """The NLL read off the float32 softmax (max - log p_max + log sum p) equals a float64
    log-softmax to 1e-6 absolute even for wide logits; a row without a target (kept unfiltered
    on a GPU) scores 0 and has zero gradient; the others get softmax - onehot."""
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(5, 50257, generator=g) * torch.tensor([1.0, 5, 20, 1, 3])[:, None]
    targets = torch.randint(0, 50257, (5,), generator=g)
    targets[3] = IGNORE_INDEX
    nll, grad = _nll_and_softmax(logits, targets)
    log_probs = torch.log_softmax(logits.double(), dim=1)
    expected = -log_probs.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    expected[3] = 0.0
    assert nll.dtype == torch.float64
    assert (nll - expected).abs().max().item() < 1e-6
    expected_grad = log_probs.exp()
    expected_grad[torch.arange(5), targets.clamp(min=0)] -= 1.0
    expected_grad[3] = 0.0
    # the gradient is a float32 softmax (its normalising sum rounds at ~1e-6): bf16 after this
    assert (grad.double() - expected_grad).abs().max().item() < 1e-5
    assert grad[3].abs().sum().item() == 0.0


def test_training_nll_sums_the_softmax_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluation (no gradients) reads the NLL off a float64 sum of the softmax: within 5e-8 of
    the float64 log-softmax on logits that a float32 matmul computes exactly (multiples of 1/8:
    the error is the loss's own); training sums it in float32: within 1e-6, and each chunk of a
    training step takes that path, each chunk of an evaluation the float64 one."""
    g = torch.Generator().manual_seed(9)
    hidden = torch.randint(-8, 9, (37, 16), generator=g).float() / 8
    head = torch.nn.Linear(16, 50257, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randint(-16, 17, (50257, 16), generator=g).float() / 8)
    targets = torch.randint(0, 50257, (37,), generator=g)
    logits = hidden.double() @ head.weight.double().t()
    expected = -torch.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
    calls: list[bool] = []
    real = domainlm.model.loss._nll_and_softmax

    def spy(logits, targets, exact_sum=True):  # type: ignore[no-untyped-def]
        calls.append(exact_sum)
        return real(logits, targets, exact_sum)

    monkeypatch.setattr(domainlm.model.loss, "_nll_and_softmax", spy)
    with torch.no_grad():
        evaluated = chunked_nll_sums(hidden[None], head, targets[None], chunk_tokens=8)
    assert calls == [True] * 5
    assert (evaluated[0] - expected.sum()).abs().item() < 5e-8 * 37
    exact, _ = real(logits.float(), targets)
    approximate, _ = real(logits.float(), targets, exact_sum=False)
    assert (exact - expected).abs().max().item() < 5e-8
    assert (approximate - expected).abs().max().item() < 1e-6
    calls.clear()
    trained = chunked_nll_sums(hidden[None].requires_grad_(), head, targets[None], chunk_tokens=8)
    trained.sum().backward()
    assert calls == [False] * 5 and head.weight.grad is not None
    assert (trained[0] - expected.sum()).abs().item() < 1e-6 * 37


def test_fully_masked_row_scores_zero_and_eval_mode_matches() -> None:
    model = tiny_gpt2().eval()
    inputs, targets = batch(seed=1)
    targets[1] = IGNORE_INDEX
    with torch.no_grad():
        got = CausalLMLoss(model, chunk_tokens=16)(inputs, targets)
        expected = reference_row_sums(model, inputs, targets)
    assert got[1].item() == 0.0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def test_full_logits_fallback_for_unknown_architectures() -> None:
    model = tiny_gpt2()
    model.config.model_type = "some-unknown-arch"
    assert linear_head(model) is None
    inputs, targets = batch(seed=2)
    got = CausalLMLoss(model)(inputs, targets)
    torch.testing.assert_close(got, reference_row_sums(model, inputs, targets), rtol=1e-5, atol=0)


def test_bf16_autocast_stays_close_to_fp32() -> None:
    model = tiny_gpt2().eval()
    inputs, targets = batch(seed=3)
    with torch.no_grad():
        exact = reference_row_sums(model, inputs, targets)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = CausalLMLoss(model)(inputs, targets)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, exact, rtol=2e-2, atol=0)


def test_chunked_nll_sums_with_bias_matches_linear_reference() -> None:
    g = torch.Generator().manual_seed(4)
    head = torch.nn.Linear(16, 50, bias=True)
    hidden = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (2, 9), generator=g)
    targets[1, 3] = IGNORE_INDEX
    got = chunked_nll_sums(hidden, head, targets, chunk_tokens=4)
    got.sum().backward()
    got_grad = hidden.grad.clone()
    hidden.grad = None
    expected = F.cross_entropy(
        head(hidden).double().transpose(1, 2),
        targets,
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).sum(1)
    expected.sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    assert_close_relative(got_grad, hidden.grad, "hidden")


@pytest.mark.parametrize("multiple, groups", [(64, False), (64, True), (1000, True)])
def test_padded_vocabulary_equals_full_logits(
    multiple: int, groups: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The head padded inside the loss (50,257 -> 50,304 rows, as on a GPU; or 51,000) gives the
    reference's values and gradients: the padding logits are -inf, and the gradient of the
    model's own 50,257-row weight keeps its shape."""
    if groups:
        monkeypatch.setattr(domainlm.model.loss, "GRAD_GROUP_TOKENS", 10)
    model = tiny_gpt2()
    inputs, targets = batch(seed=7)
    expected = reference_row_sums(model, inputs, targets)
    expected.sum().backward()
    expected_grads = grads(model)
    model.zero_grad(set_to_none=True)
    got = CausalLMLoss(model, chunk_tokens=7, vocab_multiple=multiple)(inputs, targets)
    got.sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    assert model.lm_head.weight.grad.shape == (50257, model.config.n_embd)
    for name, g in expected_grads.items():
        assert_close_relative(grads(model)[name], g, name)


def test_padded_vocabulary_with_bias_matches_linear_reference() -> None:
    """A biased head of 50 rows padded to 64: padding bias entries stay out of the softmax."""
    g = torch.Generator().manual_seed(8)
    head = torch.nn.Linear(16, 50, bias=True)
    hidden = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (2, 9), generator=g)
    got = chunked_nll_sums(hidden, head, targets, chunk_tokens=4, vocab_multiple=64)
    got.sum().backward()
    got_grads = [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    hidden.grad = head.weight.grad = head.bias.grad = None
    expected = F.cross_entropy(
        head(hidden).double().transpose(1, 2), targets, reduction="none"
    ).sum(1)
    expected.sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    for name, a, b in zip(
        ["hidden", "weight", "bias"],
        got_grads,
        [hidden.grad, head.weight.grad, head.bias.grad],
        strict=True,
    ):
        assert a.shape == b.shape
        assert_close_relative(a, b, name)


def test_chunk_size_by_device() -> None:
    """256 positions per chunk on the CPU; on a GPU about 2^27 logits a chunk, whole 256s."""
    assert domainlm.model.loss.chunk_tokens_for(torch.device("cpu"), 50257) == 256
    gpu = domainlm.model.loss.chunk_tokens_for(torch.device("cuda", 0), 50304)
    assert gpu == 2560 and gpu * 50304 <= 2**27
    assert domainlm.model.loss.chunk_tokens_for(torch.device("cuda", 0), 10**9) == 256


def test_fused_kernel_math_equals_float64_reference() -> None:
    """fused_nll_and_grad (compiled on a GPU; its eager form here): float32 log-sum-exp to 1e-5
    of float64, gradient = softmax - onehot, padding columns and rows without target zero."""
    g = torch.Generator().manual_seed(9)
    vocab, padded = 1000, 1024
    logits = torch.randn(6, padded, generator=g) * torch.tensor([1.0, 5, 20, 1, 3, 8])[:, None]
    logits[:, vocab:] = 7.0  # padding columns hold anything; they must not count
    targets = torch.randint(0, vocab, (6,), generator=g)
    targets[4] = IGNORE_INDEX
    nll, grad = domainlm.model.loss.fused_nll_and_grad(logits, targets, vocab)
    log_probs = torch.log_softmax(logits[:, :vocab].double(), dim=1)
    expected = -log_probs.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    expected[4] = 0.0
    assert (nll.double() - expected).abs().max().item() < 1e-5
    expected_grad = torch.zeros(6, padded, dtype=torch.float64)
    expected_grad[:, :vocab] = log_probs.exp()
    expected_grad[torch.arange(6), targets.clamp(min=0)] -= 1.0
    expected_grad[4] = 0.0
    assert (grad.double() - expected_grad).abs().max().item() < 1e-6
    assert grad[:, vocab:].abs().sum().item() == 0.0


def test_fused_path_equals_full_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The training path a GPU takes (fused kernel, padded head, one group per chunk), run on
    the CPU with the kernel uncompiled: values and gradients equal the reference."""
    monkeypatch.setattr(
        domainlm.model.loss, "_fused_kernel", lambda device: domainlm.model.loss.fused_nll_and_grad
    )
    model = tiny_gpt2()
    inputs, targets = batch(seed=10)
    expected = reference_row_sums(model, inputs, targets)
    expected.sum().backward()
    expected_grads = grads(model)
    model.zero_grad(set_to_none=True)
    got = CausalLMLoss(model, chunk_tokens=16, vocab_multiple=64)(inputs, targets)
    got.sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    for name, g in expected_grads.items():
        assert_close_relative(grads(model)[name], g, name)


def test_fused_kernel_compiler_failure_falls_back_once_and_oom_propagates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A compiler that fails on the first call: one warning, that call's result computed anyway,
    and the unfused path (None) from then on. An out-of-memory error is not a compiler failure:
    it reaches the OOM back-off, and the kernel stays in use."""
    logits = torch.randn(3, 64)
    targets = torch.tensor([1, 2, IGNORE_INDEX])
    cuda = torch.device("cuda", 0)  # only its type is read; nothing runs on a GPU here

    def failing_compile(fn, **kwargs):  # type: ignore[no-untyped-def]
        def run(*args):  # type: ignore[no-untyped-def]
            raise RuntimeError("no Triton here")

        return run

    monkeypatch.setattr(domainlm.model.loss, "_FUSED", {})
    monkeypatch.setattr(torch, "compile", failing_compile)
    kernel = domainlm.model.loss._fused_kernel(cuda)
    with pytest.warns(UserWarning, match="no Triton here"):
        nll, grad = kernel(logits, targets, 60)
    expected = domainlm.model.loss.fused_nll_and_grad(logits, targets, 60)
    torch.testing.assert_close(nll, expected[0])
    torch.testing.assert_close(grad, expected[1])
    assert domainlm.model.loss._fused_kernel(cuda) is None

    def oom_compile(fn, **kwargs):  # type: ignore[no-untyped-def]
        def run(*args):  # type: ignore[no-untyped-def]
            raise torch.OutOfMemoryError("CUDA out of memory")

        return run

    monkeypatch.setattr(domainlm.model.loss, "_FUSED", {})
    monkeypatch.setattr(torch, "compile", oom_compile)
    with pytest.raises(torch.OutOfMemoryError):
        domainlm.model.loss._fused_kernel(cuda)(logits, targets, 60)
    assert domainlm.model.loss._fused_kernel(cuda) is not None


def wide_head_case(seed: int = 7) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    """A head whose softmax spans 1 down to ~1e-13 (bias from 0 to -30): like a trained 50k-vocab
    LM, most probabilities lie below fp16's smallest subnormal (6e-8) yet have real gradients."""
    g = torch.Generator().manual_seed(seed)
    vocab, width = 3000, 32
    head = torch.nn.Linear(width, vocab, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, width, generator=g) * 0.05)
        head.bias.copy_(torch.linspace(0.0, -30.0, vocab))
    hidden = torch.randn(2, 12, width, generator=g)
    targets = torch.randint(0, 200, (2, 12), generator=g)  # likely tokens, as in training
    targets[1, -3:] = IGNORE_INDEX
    return head, hidden, targets


def head_case_gradients(
    head: torch.nn.Linear,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    dtype: torch.dtype | None,
    row_weights: tuple[float, float] = (1.0, 1.0),
    vocab_multiple: int = 1,
) -> dict[str, torch.Tensor]:
    """Gradients of hidden, head weight and bias of (sum NLL) * 2^16 / tokens, the training
    step's upstream scale under fp16 (GradScaler's initial 65,536 over the token count), each
    row's NLL weighted by `row_weights` (unequal: the head's gradients are recomputed).
    dtype None: the float32 reference, token_nll_sums of the plain full logits."""
    head.zero_grad(set_to_none=True)
    hidden = hidden.clone().requires_grad_(True)
    scale = 2.0**16 / int((targets != IGNORE_INDEX).sum())
    if dtype is None:
        nll = domainlm.model.loss.token_nll_sums(head(hidden), targets)
    else:
        with torch.autocast("cpu", dtype=dtype):
            nll = chunked_nll_sums(hidden, head, targets, 8, vocab_multiple)
    (nll * torch.tensor(row_weights, dtype=nll.dtype) * scale).sum().backward()
    return {"hidden": hidden.grad, "weight": head.weight.grad, "bias": head.bias.grad}


def worst_row_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest relative L2 error over the rows (one row per vocabulary entry for the head)."""
    expected, got = (
        expected.double().reshape(expected.shape[0], -1),
        got.double().reshape(expected.shape[0], -1),
    )
    return float(((got - expected).norm(dim=1) / expected.norm(dim=1)).max())


@pytest.mark.parametrize("row_weights", [(1.0, 1.0), (1.0, 0.5)], ids=["uniform", "weighted"])
@pytest.mark.parametrize("vocab_multiple", [1, 64], ids=["plain", "padded"])
def test_fp16_head_gradients_keep_tiny_probabilities(
    row_weights: tuple[float, float], vocab_multiple: int
) -> None:
    """Under fp16 the head's gradient (softmax - onehot) must not be stored in fp16 before the
    loss scale reaches it: probabilities below 6e-8 would flush to zero and the rows of unlikely
    tokens get no gradient at all. Every row must match the float32 reference to 10%: the fp16
    logits themselves round at 2^-11 relative, i.e. up to ~0.015 at |logit| 30, which moves each
    probability by up to ~1.5%; a flushed row is 100% off. Padded: the head's rows padded to a
    multiple of 64 inside the loss, as on a GPU."""
    head, hidden, targets = wide_head_case()
    expected = head_case_gradients(head, hidden, targets, None, row_weights)
    got = head_case_gradients(head, hidden, targets, torch.float16, row_weights, vocab_multiple)
    assert got["weight"].dtype == got["bias"].dtype == torch.float32
    for name in ("weight", "bias"):
        assert worst_row_error(got[name], expected[name]) < 0.1, name
    assert worst_row_error(got["hidden"], expected["hidden"]) < 1e-2


@pytest.mark.parametrize("row_weights", [(1.0, 1.0), (1.0, 0.5)], ids=["uniform", "weighted"])
def test_bf16_head_gradients_stay_close_to_float32(row_weights: tuple[float, float]) -> None:
    """bf16 has float32's exponent range (nothing underflows) but 8 significant bits. Tolerances:
    a logit near -30 rounds by up to 2^-4 (its bias, then the sum with w.x), and exp() turns
    that into up to ~13% on every probability of that vocabulary row: 20% per row. The
    tensors as a whole are dominated by likely tokens, whose logits near 0 round finely, and by
    the target's -1: 1% in relative L2 (measured: 0.25%)."""
    head, hidden, targets = wide_head_case()
    expected = head_case_gradients(head, hidden, targets, None, row_weights)
    got = head_case_gradients(head, hidden, targets, torch.bfloat16, row_weights)
    for name in ("hidden", "weight", "bias"):
        error = float((got[name] - expected[name]).norm() / expected[name].norm())
        assert error < 1e-2, name
        assert worst_row_error(got[name], expected[name]) < 0.2, name
