"""The one place where token losses are computed: summed negative log-likelihood per row.

Training divides these sums by the number of target tokens in the whole accumulation window
(over all ranks), and evaluation adds them up in float64, so neither ever averages averages.

Why not `model(...).logits`: for GPT-2 124M a (4, 256) batch has 50,257 logits per position, so
the full logits are 206 MB in float32, plus their log-softmax and its gradient, each as large. For
models whose head is a plain linear layer over the backbone's last hidden state (GPT-2, Llama,
Mistral, Qwen, GPT-NeoX...), `CausalLMLoss` instead runs the backbone, keeps only the positions
that have a target, and computes head + cross-entropy chunk by chunk; the gradients of the head
are formed during that pass (softmax - onehot, kept in bf16 (float32 under fp16, whose range
would flush small probabilities to zero) for up to 2,048 positions, then
multiplied into them), so no float32 logits outlive their chunk and none is recomputed. The
result is the same summed NLL (tests/test_loss.py compares it, and its gradients, with
full-logits cross-entropy). Other architectures, and models that transform their
logits after the head (`LOGIT_TRANSFORMS`: soft-capping, scaling), fall back to the full logits.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F

from domainlm.data.blocks import IGNORE_INDEX
from domainlm.model.faults import maybe_inject_oom

# Architectures whose logits are `get_output_embeddings()(base_model(...)[0])`, no final
# projection outside the base model (Gemma's embedding scaling is inside its base model), unless
# one of LOGIT_TRANSFORMS is set (tests/test_architectures.py checks each against the model's own
# loss).
CHUNKED_HEAD_MODEL_TYPES = frozenset(
    {
        "gpt2", "gpt_neo", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "opt", "phi3",
        "gemma", "gemma2", "bloom", "gemma3_text", "olmo2", "smollm3", "phi", "starcoder2",
        "granite",
    }
)  # fmt: skip
# Config fields that, when set (not None), make a model transform its logits after the head
# (Gemma 2's final soft-capping tanh(x / c) * c; Cohere's logit_scale; Granite's logits_scaling;
# Falcon-H1's lm_head_multiplier): the chunked head would skip that, so such a model takes the
# full-logits path (tests/test_architectures.py::test_softcapped_logits_take_the_full_logits_path).
LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "lm_head_multiplier",
)
# Positions per head chunk on the CPU: 256 x 50,257 float32 softmax = 51 MB alive at a time for
# GPT-2. On a GPU, fewer and larger chunks (each chunk is a dozen kernel launches the host must
# issue): about CUDA_CHUNK_LOGITS logits per chunk (GPT-2: 2,560 positions, 256 MiB in bf16).
DEFAULT_CHUNK_TOKENS = 256
CUDA_CHUNK_LOGITS = 2**27
# `chunk_tokens=BY_DEVICE`: DEFAULT_CHUNK_TOKENS on the CPU, CUDA_CHUNK_LOGITS' worth on a GPU.
BY_DEVICE = 0
# On a GPU the head's vocabulary is padded to a multiple of this inside the loss: GPT-2's 50,257
# rows make every logits row 2-byte aligned, and cuBLAS then falls back to Turing-era kernels for
# the head's three matmuls (~18% of an H200's bf16 rate); 50,304 rows run on Hopper's. The padded
# logits are set to -inf, so the softmax, the NLL and every gradient are unchanged; the model's
# own weight keeps its 50,257 rows.
CUDA_VOCAB_MULTIPLE = 64
# On a GPU while training, the head's softmax, NLL and gradient are one compiled kernel per chunk
# (fused_nll_and_grad); False keeps the unfused float64-exact path there too.
USE_FUSED_KERNEL = True
# Positions whose d nll / d logits are kept (in the compute dtype) for one pair of gradient
# matmuls: 2,048 x 50,257 bf16 = 206 MB for GPT-2; a (4, 256) CPU batch is one group.
GRAD_GROUP_TOKENS = 2048


class CausalLMLoss(torch.nn.Module):
    """Wraps a causal LM. forward(...) -> (b,) float64 sums of the NLL of each row's targets.

    It is the module that DDP/FSDP wrap, so that gradients synchronise through its forward.
    `chunk_tokens=None` forces the plain full-logits path (the reference); BY_DEVICE sizes the
    chunks for the device. `vocab_multiple` pads the head's rows inside the loss (None: by device).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        chunk_tokens: int | None = BY_DEVICE,
        vocab_multiple: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.vocab_multiple = vocab_multiple

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        maybe_inject_oom(input_ids.shape[0])  # fault injection for tests (domainlm/model/faults.py)
        extra = {}
        if position_ids is not None:
            extra["position_ids"] = position_ids
        head = linear_head(self.model) if self.chunk_tokens is not None else None
        if head is None:
            logits = self.model(input_ids=input_ids, use_cache=False, **extra).logits  # (b, T, V)
            return token_nll_sums(logits, targets)
        hidden = self.model.base_model(input_ids=input_ids, use_cache=False, **extra)[
            0
        ]  # (b, T, H)
        return chunked_nll_sums(hidden, head, targets, self.chunk_tokens, self.vocab_multiple)


def linear_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's output layer when logits are exactly head(base_model(...)[0]), else None."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in CHUNKED_HEAD_MODEL_TYPES:
        return None
    if any(getattr(config, field, None) is not None for field in LOGIT_TRANSFORMS):
        return None  # logits transformed after the head: only the full logits are right
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    base = getattr(model, "base_model", None)
    if not isinstance(head, torch.nn.Linear) or base is None or base is model:
        return None
    return head


def token_nll_sums(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(b, T, V) logits and (b, T) targets -> (b,) NLL sums in float64, padding ignored."""
    b, t, v = logits.shape
    nll = F.cross_entropy(
        logits.reshape(b * t, v).float(),
        targets.reshape(b * t),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return nll.view(b, t).sum(dim=1, dtype=torch.float64)


def chunk_tokens_for(device: torch.device, vocab_size: int) -> int:
    """Positions per head chunk on `device` (see DEFAULT_CHUNK_TOKENS, CUDA_CHUNK_LOGITS)."""
    if device.type != "cuda":
        return DEFAULT_CHUNK_TOKENS
    return max(DEFAULT_CHUNK_TOKENS, CUDA_CHUNK_LOGITS // vocab_size // 256 * 256)


def chunked_nll_sums(
    hidden: torch.Tensor,
    head: torch.nn.Linear,
    targets: torch.Tensor,
    chunk_tokens: int = BY_DEVICE,
    vocab_multiple: int | None = None,
) -> torch.Tensor:
    """(b, T, H) hidden states -> (b,) NLL sums in float64, never holding more than one chunk of
    logits. Equal to token_nll_sums(head(hidden), targets), gradients included."""
    b, t, h = hidden.shape
    if chunk_tokens == BY_DEVICE:
        chunk_tokens = chunk_tokens_for(hidden.device, head.weight.shape[0])
    if vocab_multiple is None:
        vocab_multiple = CUDA_VOCAB_MULTIPLE if hidden.device.type == "cuda" else 1
    flat_targets = targets.reshape(b * t)
    flat_hidden = hidden.reshape(b * t, h)
    rows = torch.arange(b, device=hidden.device).repeat_interleave(t)
    if hidden.device.type == "cpu" or not torch.is_grad_enabled():
        # Only the positions with a target (evaluation windows with a short stride score few).
        # On a GPU in training this would be a host sync per step, and nearly all positions
        # are targets there anyway.
        keep = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
        flat_hidden, flat_targets, rows = flat_hidden[keep], flat_targets[keep], rows[keep]
    if flat_targets.shape[0] == 0:
        # An all-padding micro-batch (the short end of an epoch): zero loss, still in the graph
        # so that its backward() runs like any other (and DDP's gradient sync stays in step).
        # Every parameter must be in it: an untied head is not reached through `hidden`.
        touched = hidden.sum() + head.weight.sum()
        if head.bias is not None:
            touched = touched + head.bias.sum()
        return torch.zeros(b, dtype=torch.float64, device=hidden.device) + 0.0 * touched
    compute_dtype = (
        torch.get_autocast_dtype(hidden.device.type)
        if torch.is_autocast_enabled(hidden.device.type)
        else hidden.dtype
    )
    with torch.autocast(hidden.device.type, enabled=False):
        nll = _LinearCrossEntropy.apply(
            flat_hidden,
            head.weight,
            head.bias,
            flat_targets,
            chunk_tokens,
            compute_dtype,
            torch.is_grad_enabled(),  # evaluation: no gradient work at all
            vocab_multiple,
        )
    return torch.zeros(b, dtype=torch.float64, device=hidden.device).index_add(0, rows, nll)


class _LinearCrossEntropy(torch.autograd.Function):
    """(n, H) hidden, (V, H) weight -> (n,) float64 NLL, chunk by chunk over the n positions.

    Forward computes each chunk's logits once and their softmax in float32 (one fused kernel),
    reads the NLL off it, and, when gradients are needed, turns it into d nll / d logits =
    softmax - onehot, stored in the compute dtype for a group of chunks; each group's
    gradients of hidden and weight are then two large matmuls (a weight-gradient matmul per
    256-row chunk ran at half the speed on CPU). Backward only scales them by the incoming
    gradient. The incoming gradient is per position; when it is not the same for all positions
    (training always has one scale: the summed loss over the token count), backward recomputes
    the weight gradient with it.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens, compute_dtype, grad_enabled,  # type: ignore[override]
                vocab_multiple):  # fmt: skip
        needs = [grad_enabled and n for n in ctx.needs_input_grad]
        want_grads = any(needs[:3])
        vocab = weight.shape[0]
        w, b = _padded_head(weight, bias, compute_dtype, vocab_multiple)
        x = hidden.to(compute_dtype)
        # The gradients wait for backward's loss scale: fp16 would flush probabilities below its
        # smallest subnormal (6e-8; most of a 50k-vocab softmax) to zero, so they stay float32.
        grad_dtype = _grad_dtype(compute_dtype)
        gw, gx = (w, x)
        if grad_dtype != compute_dtype:
            gw, gx = _padded_head(weight, None, grad_dtype, vocab_multiple)[0], hidden.float()
        n = targets.shape[0]
        nll = torch.empty(n, dtype=torch.float64, device=hidden.device)
        grad_hidden = (
            torch.empty_like(hidden, dtype=torch.promote_types(hidden.dtype, grad_dtype))
            if needs[0]
            else None
        )
        grad_weight = grad_bias = None
        # On a GPU while training, one compiled kernel per chunk (fused_nll_and_grad); each chunk
        # is then a group of its own, its gradient used as it comes out.
        fused = want_grads and compute_dtype != torch.float16 and _fused_kernel(hidden.device)
        group_tokens = chunk_tokens if fused else max(chunk_tokens, GRAD_GROUP_TOKENS)
        for group_start in range(0, n, group_tokens):
            group_end = min(group_start + group_tokens, n)
            if fused:
                logits = F.linear(x[group_start:group_end], w, b)  # (c, V padded)
                nll32, grad_logits = fused(logits, targets[group_start:group_end], vocab)
                nll[group_start:group_end] = nll32
            else:
                grad_logits = _nll_and_grad_chunks(
                    x, w, b, targets, nll, vocab, group_start, group_end, chunk_tokens,
                    grad_dtype if want_grads else None,
                )  # fmt: skip
            if grad_logits is None:
                continue
            rows = slice(group_start, group_end)
            if grad_hidden is not None:
                grad_hidden[rows] = grad_logits @ gw
            if needs[1]:
                # one group (a CPU batch): kept in the compute dtype, made float32 by backward's
                # scaling; several: summed in float32
                part = grad_logits.t() @ gx[rows]
                grad_weight = part if grad_weight is None else grad_weight.float().add_(part)
            if needs[2]:
                part = grad_logits.sum(0, dtype=torch.float32)
                grad_bias = part if grad_bias is None else grad_bias.add_(part)
        if grad_weight is not None and grad_weight.shape[0] > vocab:
            grad_weight = grad_weight[:vocab]  # the padding rows' gradient is zero; drop them
        if grad_bias is not None and grad_bias.shape[0] > vocab:
            grad_bias = grad_bias[:vocab]
        ctx.save_for_backward(hidden, weight, bias, targets, grad_hidden, grad_weight, grad_bias)
        ctx.chunk_tokens, ctx.compute_dtype = chunk_tokens, compute_dtype
        return nll

    @staticmethod
    def backward(ctx, grad_nll):  # type: ignore[override]
        hidden, weight, bias, targets, grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        grad_nll = grad_nll.float()
        scale = grad_nll[:1]
        uniform = bool((grad_nll == scale).all())
        if not uniform and (grad_weight is not None or grad_bias is not None):
            grad_weight, grad_bias = _weighted_head_grads(
                hidden, weight, bias, targets, grad_nll, ctx.chunk_tokens, ctx.compute_dtype,
                grad_weight is not None, grad_bias is not None,
            )  # fmt: skip
            scale = torch.ones_like(scale)
        if grad_hidden is not None:
            grad_hidden = (
                grad_hidden * (scale if uniform else grad_nll.unsqueeze(1).to(grad_hidden.dtype))
            ).to(hidden.dtype)
        if grad_weight is not None:  # scale is a float32 (1,) tensor: the product is float32
            grad_weight = _scaled_float32(grad_weight, scale).to(weight.dtype)
        if grad_bias is not None:
            grad_bias = (grad_bias * scale).to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def _scaled_float32(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad * scale in float32, the same rounding as the mixed-dtype product: a bf16 grad is cast
    first (a bf16 x float32 product takes the CPU's slow mixed-dtype path: 33 vs 25 ms for
    GPT-2's 50,257 x 768 head, benchmarks/cpu_kernels.py)."""
    if grad.dtype == scale.dtype:
        return grad * scale
    return grad.to(scale.dtype).mul_(scale)


def _nll_and_grad_chunks(x, w, b, targets, nll, vocab, group_start, group_end, chunk_tokens,
                         grad_dtype):  # type: ignore[no-untyped-def]  # fmt: skip
    """One group of positions, chunk by chunk: fills `nll` (float64, exact); returns the group's
    d nll / d logits in `grad_dtype`, or None when that is None (no gradients wanted)."""
    grad_logits = (
        torch.empty(group_end - group_start, w.shape[0], dtype=grad_dtype, device=x.device)
        if grad_dtype is not None
        else None
    )
    for start in range(group_start, group_end, chunk_tokens):
        end = min(start + chunk_tokens, group_end)
        logits = F.linear(x[start:end], w, b)  # (c, V padded), compute dtype
        if w.shape[0] > vocab:
            logits[:, vocab:] = float("-inf")  # padding rows: probability exactly 0
        # training sums the softmax in float32 (as the GPU's fused kernel does); evaluation in
        # float64, where the perplexity's exactness is promised (docs/perplexity.md)
        nll[start:end], probs = _nll_and_softmax(
            logits, targets[start:end], exact_sum=grad_dtype is None
        )
        if grad_logits is not None:
            grad_logits[start - group_start : end - group_start] = probs
    return grad_logits


def fused_nll_and_grad(
    logits: torch.Tensor, targets: torch.Tensor, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, V padded) logits -> (c,) float32 NLL and (c, V padded) softmax - onehot in the logits'
    dtype; columns from `vocab` on (padding) and rows without a target are excluded (zero).

    The same quantities as `_nll_and_softmax`, written as one expression so that torch.compile
    makes it one pass over the logits (max and sum of exponentials) and one write of the gradient,
    instead of seven full-size passes. The log-sum-exp is float32 (relative error ~1e-7): this is
    the training loss on a GPU; evaluation always takes the float64-exact path.
    """
    x = logits.float()
    columns = torch.arange(x.shape[1], device=x.device)
    x = torch.where(columns < vocab, x, float("-inf"))
    valid = targets != IGNORE_INDEX
    safe = targets.clamp(min=0)
    row_max = x.amax(dim=1, keepdim=True)
    exp = torch.exp(x - row_max)
    total = exp.sum(dim=1, keepdim=True)
    target_logit = x.gather(1, safe.unsqueeze(1))
    nll = (row_max + torch.log(total) - target_logit).squeeze(1) * valid
    onehot = columns == safe.unsqueeze(1)
    grad = (exp / total - onehot.float()) * valid.unsqueeze(1)
    return nll, grad.to(logits.dtype)


_FUSED: dict[str, Any] = {}


def _fused_kernel(device: torch.device) -> Any:
    """The compiled `fused_nll_and_grad` on CUDA when `USE_FUSED_KERNEL`, else None. A compiler
    that fails on the first call (no Triton, an unsupported GPU) is reported once and the unfused
    path used from then on; an out-of-memory error is the caller's (the OOM back-off)."""
    if device.type != "cuda" or not USE_FUSED_KERNEL or _FUSED.get("broken"):
        return None
    if "kernel" not in _FUSED:
        _FUSED["kernel"] = torch.compile(fused_nll_and_grad, dynamic=None)
    if _FUSED.get("checked"):
        return _FUSED["kernel"]

    def first_call(logits: torch.Tensor, targets: torch.Tensor, vocab: int) -> Any:
        try:
            result = _FUSED["kernel"](logits, targets, vocab)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back, say so once
            warnings.warn(
                f"compiling the fused loss kernel failed ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); using the unfused path",
                stacklevel=2,
            )
            _FUSED["broken"] = True
            result = fused_nll_and_grad(logits, targets, vocab)  # this once, uncompiled
        _FUSED["checked"] = True
        return result

    return first_call


def _padded_head(
    weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, multiple: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's weight and bias in `dtype`, rows padded with zeros to a multiple of `multiple`
    (one copy, the same cast `weight.to(dtype)` does anyway)."""
    vocab = weight.shape[0]
    padded = -(-vocab // multiple) * multiple
    if padded == vocab:
        return weight.to(dtype), None if bias is None else bias.to(dtype)
    w = weight.new_zeros((padded, weight.shape[1]), dtype=dtype)
    w[:vocab] = weight
    b = None
    if bias is not None:
        b = bias.new_zeros(padded, dtype=dtype)
        b[:vocab] = bias
    return w, b


def _grad_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype d nll / d logits is kept in: the compute dtype, except float32 for fp16."""
    return torch.float32 if compute_dtype == torch.float16 else compute_dtype


def _nll_and_softmax(
    logits: torch.Tensor, targets: torch.Tensor, exact_sum: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, V) logits, (c,) targets -> (c,) float64 NLL, and softmax - onehot in float32 (rows
    without a target zeroed): d nll / d logits.

    NLL = logsumexp - target logit, with logsumexp = max - log(p_max) + log(sum p), p the float32
    softmax: p_max = exp(0) / s is the softmax's own normalisation and the float64 sum of p
    corrects its rounding, so the result has the precision of a float64 sum of the V
    exponentials (a float32 one rounds at ~1e-6 relative, straight into the perplexity) at the
    cost of one fused softmax. The target's logit and the subtraction are float64 too.
    `exact_sum=False` sums p in float32 instead (the training loss on the CPU: ~7x faster, each
    NLL within 1e-6 of the float64 one; tests/test_loss.py::test_training_nll_sums_the_softmax_in_float32).
    """
    probs = torch.softmax(logits, dim=1, dtype=torch.float32)
    valid = targets != IGNORE_INDEX
    safe = targets.clamp(min=0).unsqueeze(1)
    row_max = logits.amax(dim=1).double()
    log_sum_exp = (
        row_max
        - torch.log(probs.amax(dim=1).double())
        + torch.log(probs.sum(dim=1, dtype=torch.float64 if exact_sum else None).double())
    )
    nll = (log_sum_exp - logits.gather(1, safe).squeeze(1).double()) * valid
    probs.scatter_add_(1, safe, -torch.ones_like(safe, dtype=probs.dtype))
    if probs.device.type != "cpu" or not bool(valid.all()):  # no host sync on a GPU
        probs.mul_(valid.unsqueeze(1))
    return nll, probs


def _weighted_head_grads(hidden, weight, bias, targets, weights, chunk_tokens, compute_dtype,
                         want_weight, want_bias):  # type: ignore[no-untyped-def]  # fmt: skip
    """Weight and bias gradients of sum_i weights[i] * nll_i, recomputing each chunk's logits."""
    w = weight.to(compute_dtype)
    b = None if bias is None else bias.to(compute_dtype)
    x = hidden.to(compute_dtype)
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
    grad_bias = torch.zeros_like(bias, dtype=torch.float32) if want_bias else None
    for start in range(0, targets.shape[0], chunk_tokens):
        end = min(start + chunk_tokens, targets.shape[0])
        logits = F.linear(x[start:end], w, b).float()
        tgt = targets[start:end]
        safe = tgt.clamp(min=0).unsqueeze(1)
        logits = torch.softmax(logits, dim=1)
        logits.scatter_add_(1, safe, -torch.ones_like(safe, dtype=logits.dtype))
        logits.mul_(((tgt != IGNORE_INDEX) * weights[start:end]).unsqueeze(1))
        if grad_weight is not None:  # float32 under fp16, as in forward
            grad_dtype = _grad_dtype(compute_dtype)
            rows = x[start:end] if grad_dtype == compute_dtype else hidden[start:end].float()
            grad_weight.add_(logits.to(grad_dtype).t() @ rows)
        if grad_bias is not None:
            grad_bias.add_(logits.sum(0))
    return grad_weight, grad_bias
