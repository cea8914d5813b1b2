"""Memory: the dtype weights load in, gradient checkpointing, and the memory plan of a run.

`load_dtype_for` decides the dtype of the weights (`--load-dtype`); `plan_memory` estimates the
peak training memory of a model from its config alone (the model is built on the meta device:
no weights are read or allocated), for full fine-tuning and for LoRA, with and without gradient
checkpointing. The estimate counts what a training step keeps alive, term by term:

- weights: every parameter in its load dtype; under bf16/fp16 autocast with float32 weights, the
  half-precision copies of the layers' matrices that autocast makes and the backward keeps
  (2 bytes per matrix parameter; none under FSDP, which gathers the layers in the half dtype);
- gradients (trainable parameters, their dtype) and AdamW's two moments (PyTorch keeps them in
  the parameter's dtype: 8 B/param for float32 weights);
- activations per micro-batch: the tensors the backward keeps, counted per transformer layer from
  its shape (tokens n = batch x block, hidden h, MLP width f, heads a) and the layer's kind
  (`BlockKind`: LayerNorm + GELU MLP as GPT-2, or RMSNorm + gated MLP as Llama), plus the loss's
  own buffers: domainlm's chunked loss (model/loss.py) never holds the full logits; it keeps the
  final hidden states, their gradient, and the head's weight gradient (V x h, compute dtype),
  and holds one chunk's logits and softmax at a time (256 positions on the CPU);
- with gradient checkpointing a layer keeps only its input; its full activations exist again,
  for one layer at a time, while the backward recomputes it;
- with LoRA the base is frozen: a frozen linear map keeps no input (its weight needs no
  gradient), a frozen RMSNorm keeps only its float32 input, and the residual stream is in the
  base's dtype (bf16 by default); each adapter keeps its own copy of its input (compute dtype),
  its dropout mask and lora_A's output (`Adapters`), and autocast keeps the half-precision
  copies of the float32 adapters (and, for a float32 base, of its matrices, which the backward
  needs for the inputs' gradients).

The peak is the largest of three moments of a step: the end of the forward (all activations and
the loss's buffers), the end of the backward (all gradients, the first layer recomputed when
checkpointing) and the optimizer update (gradients and moments); a head tied to the embedding
adds, at the end of the backward, its two gradients and their sum. Under `--strategy fsdp` the
plan is one rank's (`sharded_terms`): weights, gradients and AdamW state sharded, the root unit
and a few layers whole. docs/memory.md compares the plan with measured peaks
(benchmarks/memory_peak.py, with and without --fsdp).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from domainlm.config import LOAD_DTYPES
from domainlm.errors import UserError
from domainlm.model.lora import adapted_layers, linear_features, rank_above_width, target_modules
from domainlm.model.loss import linear_head

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GIB = 1024**3
# model/loss.py's CPU chunk (DEFAULT_CHUNK_TOKENS); on a GPU ~2^27 logits per chunk.
LOSS_CHUNK_TOKENS = 256
CUDA_CHUNK_LOGITS = 2**27
# Model types whose layers are RMSNorm (computed in float32) + gated MLP (gate, up, down).
GATED_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "mixtral"}
)
# The linear layers of the attention and MLP blocks, by the names transformers gives them.
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "c_proj", "qkv_proj")


def load_dtype_for(load_dtype: str, precision: str, lora: bool) -> torch.dtype:
    """The dtype weights load in for `--load-dtype` (auto, float32, bfloat16, float16) when
    training at `precision` (resolved: fp32, bf16, fp16), with LoRA or full fine-tuning.

    auto: the training precision's dtype with LoRA (the base is frozen: it is only read, and
    autocast would cast it to that dtype anyway); float32 for full fine-tuning, because the
    optimizer adds updates of ~lr x weight to the weights, which bfloat16's 8-bit mantissa rounds
    away (mixed precision: float32 master weights, half-precision compute). An explicit half dtype
    must be the training precision's, and float16 weights cannot be fully fine-tuned (fp16 needs
    the loss scaler, which refuses float16 gradients). bfloat16 full fine-tuning is allowed when
    asked for: "pure bf16" training, half the memory of weights, gradients and moments, at the
    cost of small updates lost to rounding (`pure_half_warning`)."""
    if load_dtype not in LOAD_DTYPES:
        raise UserError(f"--load-dtype must be one of {', '.join(LOAD_DTYPES)}, got {load_dtype!r}")
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"precision must be resolved (fp32, bf16 or fp16), got {precision!r}")
    if load_dtype == "auto":
        return PRECISION_DTYPES[precision] if lora else torch.float32
    dtype = DTYPES[load_dtype]
    if dtype != torch.float32 and dtype != PRECISION_DTYPES[precision]:
        raise UserError(
            f"--load-dtype {load_dtype} with --precision {precision}: half-precision weights "
            f"compute in their own dtype; use --precision {_precision_of(dtype)} or "
            "--load-dtype float32"
        )
    if dtype == torch.float16 and not lora:
        raise UserError(
            "--load-dtype float16 cannot be fully fine-tuned (fp16 training needs float32 "
            "weights for its loss scaler); use --load-dtype float32, or --lora"
        )
    return dtype


def _precision_of(dtype: torch.dtype) -> str:
    return {v: k for k, v in PRECISION_DTYPES.items()}[dtype]


def pure_half_warning(dtype: torch.dtype, lora: bool) -> str | None:
    """The warning for full fine-tuning with half-precision weights, else None."""
    if lora or dtype == torch.float32:
        return None
    return (
        "--load-dtype bfloat16 without --lora: pure bf16 training (weights, gradients and AdamW "
        "moments in bfloat16, half the memory); updates smaller than 1/256 of a weight are "
        "rounded away, so a small --lr may barely move the model (docs/memory.md)"
    )


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """transformers' gradient checkpointing, non-reentrant (works with frozen inputs and with
    the loss calling `model.base_model` directly); a model without it is a UserError."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(
            f"--gradient-checkpointing: {type(model).__name__} does not support gradient "
            "checkpointing"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name, no warning
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(model.config, "use_cache", False):
        model.config.use_cache = False


# ----------------------------------------------------------------------------- the plan


@dataclass
class ModelShape:
    """What the plan needs to know about a model, read from its config (built on meta)."""

    model_type: str
    params: int  # unique parameters
    matrix_params: int  # parameters of the layers' linear maps (what autocast copies)
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    head_params: int  # the output layer's weight (tied to the embedding or not)
    tied_head: bool
    dropout: bool  # any dropout in the blocks (GPT-2: on CPU the eager attention keeps a mask)
    gated: bool  # RMSNorm + gated MLP (Llama-style) rather than LayerNorm + GELU MLP
    linears: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (in, out) per layer
    layer_params: int = 0  # parameters of one transformer layer (FSDP's unit)
    # model/loss.py takes the full (tokens, vocabulary) logits, not its chunked head (a model
    # outside CHUNKED_HEAD_MODEL_TYPES, or one transforming its logits: `linear_head` is None);
    # `soft_capped`: Gemma 2's tanh keeps one more copy of them for the backward
    full_logits: bool = False
    soft_capped: bool = False

    @property
    def root_params(self) -> int:
        """Parameters outside the transformer layers: embeddings, final norm, an untied head
        (what FSDP's root unit holds)."""
        return self.params - self.layers * self.layer_params


@dataclass
class Terms:
    """Bytes of one scenario's parts."""

    weights: int
    weight_copies: int  # autocast's half-precision copies of float32 matrices
    gradients: int
    optimizer: int
    activations: int  # kept for the backward (per micro-batch)
    loss_buffers: int  # the chunked loss's hidden states, their gradient, the head's gradient
    peak: int  # of live tensor bytes (CUDA's max_memory_allocated)
    fit_bytes: int  # what must be free: the peak on a GPU, host_bound(...) on the CPU
    gathered: int = 0  # under FSDP: the root unit's whole parameters (forward to end of backward)


@dataclass
class MemoryPlan:
    """The memory plan of one model at one batch shape: full fine-tuning and LoRA, each with and
    without gradient checkpointing (`scenarios`), in bytes."""

    model: str
    shape: ModelShape
    batch_size: int
    block_size: int
    precision: str
    lora_r: int
    lora_targets: list[str]
    trainable_full: int
    trainable_lora: int
    scenarios: dict[str, Terms]  # "full", "full+ckpt", "lora", "lora+ckpt"
    available: int | None = None  # bytes on the device at hand
    device: str = "cpu"
    # A LoRA run's --merge (the default), after training: a float32 copy of the base in system
    # RAM (lora.load_merged), beside the run's weights when those are in system RAM too (CPU).
    merge_bytes: int = 0
    host_available: int | None = None  # system RAM free (the merge's; = available on the CPU)
    # --strategy fsdp over this many ranks: full fine-tuning's rows are one rank's (LoRA's are
    # unsharded: LoRA runs under DDP, `--strategy fsdp --lora` is refused).
    fsdp_ranks: int = 1
    # What train warns of too: a --lora-r above the width of a layer it adapts (lora.rank_above_width).
    lora_rank_warning: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def meta_model(model_config: Any) -> torch.nn.Module:
    """The model of `model_config` on the meta device: shapes only, no memory, no weights read."""
    from domainlm.model.loading import meta_model_of

    return meta_model_of(model_config)


def model_shape(model: torch.nn.Module) -> ModelShape:
    """The ModelShape of a model (on meta or real)."""
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    head_weight = head.weight if head is not None else embed.weight
    linears = layer_linears(model)
    first_layer = repeated_layer(model)
    layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers")
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model")
    heads = _first(cfg, "num_attention_heads", "n_head")
    gated = cfg.model_type in GATED_MODEL_TYPES
    drops = [getattr(cfg, k, 0.0) or 0.0 for k in ("resid_pdrop", "attn_pdrop", "dropout")]
    drops += [getattr(cfg, k, 0.0) or 0.0 for k in ("attention_dropout", "hidden_dropout")]
    return ModelShape(
        model_type=cfg.model_type,
        params=params,
        matrix_params=sum(i * o for i, o in linears.values()) * layers,
        layers=layers,
        hidden=hidden,
        intermediate=_first(cfg, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden,
        heads=heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        vocab=int(embed.weight.shape[0]),
        head_params=head_weight.numel(),
        tied_head=head_weight is embed.weight,
        dropout=any(float(d) > 0 for d in drops if isinstance(d, (int, float))),
        gated=gated,
        linears=linears,
        layer_params=sum(p.numel() for p in first_layer.parameters()) if first_layer else 0,
        full_logits=linear_head(model) is None,
        soft_capped=getattr(cfg, "final_logit_softcapping", None) is not None,
    )


def _first(cfg: Any, *names: str) -> int:
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def repeated_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    """The first transformer layer: the first member of the model's largest `ModuleList`."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    return max(lists, key=len)[0] if lists else None


def layer_linears(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """The linear maps of the first transformer layer: short name -> (in, out) features (an
    nn.Linear or transformers' Conv1D: lora.linear_features)."""
    layer = repeated_layer(model)
    if layer is None:
        return {}
    found: dict[str, tuple[int, int]] = {}
    for name, module in layer.named_modules():
        features = linear_features(module)
        if features:
            found[name] = features
    return found


@dataclass
class BatchShape:
    """One micro-batch and the numbers that set its bytes per element."""

    batch: int
    block: int
    compute: int  # bytes of the compute dtype (2 under bf16/fp16, 4 in fp32)
    weight: int  # bytes of the weights' dtype
    autocast: bool  # a half-precision autocast region (norms run in float32 under it)
    eager_scores: bool  # attention keeps its probabilities (CPU eager attention with dropout)
    fp16: bool = False  # float16 compute: the loss keeps d nll/d logits in float32
    cuda: bool = False  # on a GPU: the loss's chunks are larger and fused (model/loss.py)

    @property
    def tokens(self) -> int:
        return self.batch * self.block


@dataclass(frozen=True)
class Adapters:
    """The LoRA adapters of one transformer layer, as the plan needs them."""

    count: int  # adapted linear maps per layer
    inputs: int  # the sum of their input features
    r: int
    dropout: bool  # --lora-dropout > 0: each adapter keeps a mask of its input

    def activations(self, tokens: int, compute: int) -> int:
        """Bytes the adapters of one layer keep: each adapter's own copy of its input (peft casts
        the input to the adapters' float32, drops it out, and autocast casts that to the compute
        dtype for lora_A, which keeps it), its dropout mask (1 byte per element), and lora_A's
        output, which lora_B keeps (r per token)."""
        masks = tokens * self.inputs if self.dropout else 0
        return compute * tokens * self.inputs + masks + self.count * compute * tokens * self.r


def residual_bytes(b: BatchShape) -> int:
    """Bytes per element of the residual stream: the weights' dtype, or float32 under autocast
    with float32 weights (a half-precision layer output added to a float32 stream is float32)."""
    return max(b.weight, b.compute)


def layer_activations(s: ModelShape, b: BatchShape, adapters: Adapters | None = None) -> int:
    """Bytes one transformer layer keeps for the backward (see the module docstring).

    Counted per layer (n tokens, h hidden, f MLP width, c compute bytes, r residual bytes): two
    norms (LayerNorm: its input, r n h; RMSNorm: its input cast to float32, plus, when its weight
    is trained, the float32 normalised input the weight's gradient needs); the inputs of the
    in-projections (one shared input per block in fp32; under autocast each linear casts its own:
    q, k, v and gate, up separately); attention's query, key, value and output (c n each at
    their widths: `attention_width`);
    the MLP (GELU: its input and output, 2 c n f; gated: gate, up, act(gate), their product,
    4 c n f); with dropout the masks (1 byte per element) and, for the eager attention, the
    softmax and the dropped probabilities (2c + 1 bytes per score, b a T^2 scores).

    With LoRA (`adapters`) the base is frozen, and a frozen linear map keeps no input (its
    weight needs no gradient): no in-projection inputs, no MLP product (gated) or GELU output kept for the output projection,
    and the eager attention's output is not kept either; RMSNorm keeps its float32 input only.
    Each adapter keeps its own input instead (`Adapters.activations`)."""
    n, h, f, c = b.tokens, s.hidden, s.intermediate, b.compute
    residual, frozen = residual_bytes(b), adapters is not None
    eager = s.dropout and b.eager_scores
    norm = 4 * n * h + (0 if frozen else residual * n * h) if s.gated else residual * n * h
    separate = b.autocast and b.weight != c  # each linear casts its own input
    attn_in = sum(1 for k in s.linears if k.split(".")[-1] in ("q_proj", "k_proj", "v_proj"))
    attn_in = attn_in if separate and attn_in else 1
    mlp_in = 2 if (s.gated and separate) else 1
    attention = c * n * attention_width(s)  # q, k, v, output (the output projection's input)
    if adapters is None:
        inputs = (attn_in + mlp_in) * c * n * h
        mlp = (4 if s.gated else 2) * c * n * f
    else:
        inputs = adapters.activations(n, c)
        mlp = (3 if s.gated else 1) * c * n * f
        if eager:  # SDPA keeps its output for its backward; the eager attention does not
            attention -= c * n * h
    attention += 4 * b.batch * s.heads * b.block  # the log-sum-exp
    masks = 0
    if s.dropout:
        masks = 2 * n * h  # residual dropouts
        if eager:
            masks += (2 * c + 1) * b.batch * s.heads * b.block**2
    return 2 * norm + inputs + attention + mlp + masks


def attention_width(s: ModelShape) -> int:
    """Elements per token that attention keeps for the backward: the query, key and value at
    their own widths (under grouped-query attention k and v are narrower, and SDPA takes them
    so, without repeating them per query head) and the output, as wide as the query. Fused
    projections (GPT-2's c_attn, GPT-NeoX's query_key_value) keep four hidden-wide tensors."""
    outs = {name.split(".")[-1]: out for name, (_, out) in s.linears.items()}
    if {"q_proj", "k_proj", "v_proj"} <= outs.keys():
        return 2 * outs["q_proj"] + outs["k_proj"] + outs["v_proj"]
    if "qkv_proj" in outs:  # Phi-3: one projection, q as wide as the hidden size
        return outs["qkv_proj"] + s.hidden
    return 4 * s.hidden


def loss_terms(
    s: ModelShape, b: BatchShape, head_trainable: bool, chunk: int, cuda: bool = False
) -> tuple[int, int]:
    """(kept, transient) bytes of model/loss.py's chunked loss: kept are the final hidden
    states, their gradient and the head's weight gradient (compute dtype), from the forward to
    the backward; transient, during the loss's forward only, are the head's weight cast to the
    compute dtype, d nll/d logits of a group of up to 2,048 positions, and one chunk's logits and
    float32 softmax."""
    n, h, v, c = b.tokens, s.hidden, s.vocab, b.compute
    residual = residual_bytes(b)
    grad_bytes = 4 if b.fp16 else c
    kept = 2 * residual * n * h + (v * h * c if head_trainable else 0)
    if s.full_logits:  # `token_nll_sums` over the model's own (b, T, V) logits
        # kept: the float32 log-softmax (and the soft-cap's tanh); transient, the larger of the
        # forward's logits with their float32 copy and the backward's two float32 gradients
        # (and, soft-capped, the gradient through the tanh beside them)
        capped = c if s.soft_capped else 0
        return kept + n * v * (4 + capped), n * v * (max(c + 4, 8) + capped)
    cast = v * h * c if b.weight != c else 0
    if cuda:  # one compiled kernel per chunk: the chunk's logits, its float32 work, its gradient
        return kept, cast + min(n, chunk) * v * (2 * c + 8)
    group = min(n, max(chunk, 2048)) * v * grad_bytes
    # a chunk's logits (c), their float32 softmax (4; under autocast also the float32 copy of
    # the logits it is computed from, 4), and the previous chunk's softmax, still referenced
    # while the next one is computed (4)
    chunk_bytes = c + 4 + (4 if c != 4 else 0) + (4 if n > chunk else 0)
    return kept, cast + group + min(n, chunk) * v * chunk_bytes


def scenario(
    s: ModelShape,
    b: BatchShape,
    trainable: int,
    adapters: Adapters | None,
    checkpointing: bool,
    chunk: int,
    ranks: int = 1,
) -> Terms:
    """The Terms of one way to train: full fine-tuning (`adapters` None; trainable = all
    parameters, in the weight dtype) or LoRA (trainable = the adapters, float32; the base
    frozen), with or without gradient checkpointing. The peak is the largest of the moments in
    the module docstring. Under autocast, the half-precision copies of float32 weights: of the
    layers' matrices (a frozen one's copy too: the backward needs it for the input's gradient)
    and of LoRA's float32 adapters; a bf16 base has none.

    `ranks` > 1: one rank of full fine-tuning under `--strategy fsdp` (`sharded_terms`)."""
    lora = adapters is not None
    weights = s.params * b.weight + (trainable * 4 if lora else 0)
    grad_bytes = 4 if lora else b.weight
    gradients = trainable * grad_bytes
    optimizer = 2 * trainable * grad_bytes  # AdamW's moments, in the parameter's dtype
    sharded = ranks > 1 and not lora
    half_of_float32 = b.autocast and b.weight == 4  # autocast computes in half from float32
    # FSDP gathers such a run's matrices in the half dtype: autocast makes no copies then
    mixed_fsdp = sharded and half_of_float32
    copies = 2 * s.matrix_params if (half_of_float32 and not sharded) else 0
    copies += 2 * trainable if (b.autocast and lora) else 0
    layer_copies = copies // max(s.layers, 1)
    layer = layer_activations(s, b, adapters)
    residual, n = residual_bytes(b), b.tokens
    final_norm = 4 * n * s.hidden + (0 if lora else residual * n * s.hidden)
    outside = (s.hidden * n if s.dropout else 0) + (
        final_norm if s.gated else residual * n * s.hidden
    )  # the embedding's dropout mask, the final norm (as a layer's norm)
    kept_layers = s.layers * (residual * n * s.hidden if checkpointing else layer)
    activations = kept_layers + outside
    kept, transient = loss_terms(s, b, not lora, chunk, cuda=b.cuda)
    head_grad = 0 if lora else s.head_params * b.weight
    # A head tied to the embedding gets two gradients, the head's (at the start of the backward)
    # and the embedding's (at its end); autograd adds them into a third tensor.
    tied_sum = 2 * head_grad if s.tied_head else 0
    recompute = layer + layer_copies if checkpointing else 0
    forward = (0 if checkpointing else copies) + activations + kept  # kept for the backward
    if sharded:
        return sharded_terms(
            s, b, ranks, (weights, copies, gradients, optimizer, activations, kept),
            gathered_bytes=2 if mixed_fsdp else b.weight,
            forward_end=copies + activations + kept + transient,
            backward_start=forward + head_grad,
            backward_end=max(tied_sum, s.root_params * b.weight) + outside,
        )  # fmt: skip
    base = weights + optimizer
    forward_end = base + copies + activations + kept + transient
    backward_start = base + forward + head_grad
    backward_end = base + gradients + max(recompute, tied_sum) + outside
    peak = max(forward_end, backward_start, backward_end, base + gradients)
    fit = peak if b.cuda else host_bound(peak, base)
    return Terms(weights, copies, gradients, optimizer, activations, kept, peak, fit)


def sharded_terms(
    s: ModelShape,
    b: BatchShape,
    ranks: int,
    whole: tuple[int, int, int, int, int, int],
    *,
    gathered_bytes: int,
    forward_end: int,
    backward_start: int,
    backward_end: int,
) -> Terms:
    """One rank's Terms of full fine-tuning under `--strategy fsdp` over `ranks` ranks
    (model/distributed.py's `wrap_model`: each transformer layer a unit, the rest the root).

    `whole` is the unsharded run's (weights, copies, gradients, AdamW, activations, loss
    buffers); the moments' arguments are their bytes beyond the weights, AdamW state and
    gradients. Sharded over the ranks: weights, gradients and AdamW state (each rank holds
    1/ranks of every parameter). Not sharded: the activations and the loss's buffers (each rank
    runs its own micro-batch). A layer is gathered in `gathered_bytes` per parameter: the half
    dtype under mixed precision (`block_mixed_precision`, which leaves autocast no copies to
    make: `whole` has none then), else the weights' dtype. Gathered whole: the root unit's
    parameters (embeddings, final norm, head), from the root's forward to the end of the
    backward; during a layer's backward the layer and the next one prefetched, the layer's whole
    gradients (in the gathered dtype) and the reduce-scatter's copy of them (in the weights'
    dtype: four layers' worth without mixed precision); at the end of the
    backward the root's whole gradients and then their reduce-scatter's copy (`backward_end`
    has the larger of that copy and a tied head's two gradients), beside the layers' gradient
    shares and one layer."""
    weights, copies, gradients, optimizer, activations, kept = whole
    weight_share, optimizer_share = -(-weights // ranks), -(-optimizer // ranks)
    gradient_share = -(-gradients // ranks)
    layer_gradient_share = -(-(s.layers * s.layer_params * b.weight) // ranks)
    root = s.root_params * b.weight
    unit = s.layer_params * gathered_bytes
    layer_backward = 3 * unit + s.layer_params * b.weight  # gathered x2, gradients, their copy
    base = weight_share + optimizer_share + root
    peak = max(
        base + forward_end,
        base + backward_start + layer_backward,
        base + layer_gradient_share + root + unit + backward_end,
        weight_share + optimizer_share + gradient_share,
    )  # fmt: skip
    fit = peak
    if not b.cuda:  # the whole model read on rank 0, the heap's share of gloo's gathers
        fit = host_bound(peak, weight_share + optimizer_share) + FSDP_HOST_MODELS * weights
    return Terms(
        weight_share, copies, gradient_share, optimizer_share, activations, kept, peak, fit, root
    )


# Under FSDP on the CPU, a rank's resident memory is further above its tensors than one
# process's: 3.4 to 5 whole models' weights above them for GPT-2 124M and a small Llama (rank 0
# reads the whole model before sharding it; the heap keeps the space of the layers gathered
# and scattered over gloo). host_bound plus this many models' weights was 1.13 to 1.84 times
# the resident peak on 11 configurations (benchmarks/memory_peak.py --fsdp), host_bound alone
# as low as 0.70.
FSDP_HOST_MODELS = 3


# The CPU process's own needs beyond the plan's tensors: the runtime's buffers and code pages
# touched by the first steps, and kernels' internal temporaries (docs/memory.md).
HOST_RUNTIME = 400 * 2**20


def host_bound(peak: int, base: int) -> int:
    """An upper bound on a CPU run's resident memory (above its imports) from the plan's
    tensor peak and `base` (weights + AdamW state, allocated once). glibc's heap cannot reuse
    every block a step frees for the next step's differently sized blocks: measured on 19
    configurations (benchmarks/memory_peak.py), the resident peak holds up to about two steps'
    worth of the per-step bytes (peak - base), plus HOST_RUNTIME. Not an estimate: it is 1.08
    to 1.87 times the measured resident peak there; the fit check uses it so that what it says
    fits does fit."""
    return peak + (peak - base) + HOST_RUNTIME


def lora_adapters(s: ModelShape, r: int, layer_keys: list[str], dropout: float) -> Adapters:
    """The Adapters of one layer at rank r on its linear maps named `layer_keys` (keys of
    `s.linears`; every layer planned as adapted where any one is: the larger activations)."""
    chosen = [k for k in s.linears if k in layer_keys]
    return Adapters(len(chosen), sum(s.linears[k][0] for k in chosen), r, dropout > 0)


def planned_lora_targets(
    meta: torch.nn.Module, s: ModelShape, requested: list[str] | None, r: int
) -> tuple[list[str], list[str], int]:
    """The LoRA targets as `train` resolves them (lora.target_modules on the meta model: the
    same matching of a leaf name, a dotted suffix such as attn.c_proj or a full name, and the
    same errors), the keys of `s.linears` they adapt in any layer, and the adapter parameters:
    r x (in + out) for every layer adapted."""
    targets = target_modules(meta, tuple(requested) if requested else None)
    adapted = adapted_layers(meta, targets)
    keys = [k for k in s.linears if any(name.endswith("." + k) for name in adapted)]
    return targets, keys, r * sum(i + o for i, o in adapted.values())


def plan_memory(
    model_config: Any,
    *,
    model: str,
    batch_size: int,
    block_size: int,
    precision: str,
    device: str = "cpu",
    load_dtype: str = "auto",
    lora_r: int = 8,
    lora_targets: list[str] | None = None,
    lora_dropout: float = 0.05,
    fsdp_ranks: int = 1,
) -> MemoryPlan:
    """The MemoryPlan of `model_config` (a transformers config) at this batch shape, from the
    config alone (the model is built on the meta device); `fsdp_ranks` > 1: full fine-tuning
    planned per rank under `--strategy fsdp` over that many ranks."""
    meta = meta_model(model_config)
    shape = model_shape(meta)
    targets, adapted_keys, trainable_lora = planned_lora_targets(meta, shape, lora_targets, lora_r)
    chunk = LOSS_CHUNK_TOKENS
    if device == "cuda":
        chunk = max(LOSS_CHUNK_TOKENS, CUDA_CHUNK_LOGITS // max(shape.vocab, 1) // 256 * 256)
    scenarios: dict[str, Terms] = {}
    for lora in (False, True):
        dtype = load_dtype_for(load_dtype if lora else _full_load(load_dtype), precision, lora)
        batch = BatchShape(
            batch=batch_size,
            block=block_size,
            compute=2 if precision in ("bf16", "fp16") else 4,
            weight=torch.finfo(dtype).bits // 8,
            autocast=precision in ("bf16", "fp16"),
            eager_scores=device == "cpu" and shape.kv_heads == shape.heads,
            fp16=precision == "fp16",
            cuda=device == "cuda",
        )
        trainable = trainable_lora if lora else shape.params
        adapters = lora_adapters(shape, lora_r, adapted_keys, lora_dropout) if lora else None
        for ckpt in (False, True):
            name = ("lora" if lora else "full") + ("+ckpt" if ckpt else "")
            scenarios[name] = scenario(
                shape, batch, trainable, adapters, ckpt, chunk, ranks=fsdp_ranks
            )
    merge = 4 * shape.params + (scenarios["lora"].weights if device != "cuda" else 0)
    return MemoryPlan(
        model=model, shape=shape, batch_size=batch_size, block_size=block_size,
        precision=precision, lora_r=lora_r, lora_targets=targets,
        trainable_full=shape.params, trainable_lora=trainable_lora, scenarios=scenarios,
        available=available_bytes(device), device=device, merge_bytes=merge,
        host_available=available_bytes("cpu"), fsdp_ranks=fsdp_ranks,
        lora_rank_warning=rank_above_width(meta, targets, lora_r),
    )  # fmt: skip


def plan_for_settings(
    model_config: Any,
    settings: Any,
    *,
    batch_size: int,
    block_size: int,
    precision: str,
    device: str,
    ranks: int = 1,
) -> MemoryPlan:
    """`plan_memory` with the model name, --load-dtype, LoRA settings and --strategy of a
    command's flags (`settings`: a TrainConfig or an InspectConfig, whose fields have the same
    names), for a run of `ranks` processes: under --strategy fsdp the plan is one rank's."""
    fsdp_ranks = ranks if settings.strategy == "fsdp" else 1
    return plan_memory(
        model_config, model=settings.model, batch_size=batch_size, block_size=block_size,
        precision=precision, device=device, load_dtype=settings.load_dtype,
        lora_r=settings.lora_r, lora_targets=settings.lora_targets,
        lora_dropout=settings.lora_dropout, fsdp_ranks=fsdp_ranks,
    )  # fmt: skip


def _full_load(load_dtype: str) -> str:
    """Full fine-tuning's load dtype in a plan: float16 (LoRA only) is planned as float32."""
    return "float32" if load_dtype == "float16" else load_dtype


def available_bytes(device: str) -> int | None:
    """Memory free on the device at hand: the GPU's free memory, else the machine's available
    memory (MemAvailable), else its physical memory."""
    if device == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[0])  # free on this GPU now
    try:  # what Linux says can be had without swapping
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def model_config_of(spec: str, trust_remote_code: bool = False) -> Any:
    """The transformers config of a model spec (scratch:NAME, folder, hub id): config.json only,
    no weights read."""

    from transformers import AutoConfig

    from domainlm.model.loading import (
        SCRATCH_PREFIX,
        check_local_spec,
        hub_reachable,
        not_a_model_folder,
        scratch_config,
    )

    if spec.startswith(SCRATCH_PREFIX):
        return scratch_config(spec[len(SCRATCH_PREFIX) :])
    path = check_local_spec(spec)  # a local folder not there: one line, the hub not asked
    if path.is_dir() and not (path / "config.json").is_file():
        from domainlm.model.lora import adapter_base, is_adapter_folder

        if is_adapter_folder(path):  # a LoRA run without --merge: the base's shape
            return model_config_of(adapter_base(path), trust_remote_code)
        raise UserError(not_a_model_folder(path, spec))
    source = str(path) if path.is_dir() else spec

    def read(local_only: bool) -> Any:
        return AutoConfig.from_pretrained(
            source, trust_remote_code=trust_remote_code, local_files_only=local_only
        )

    try:
        try:  # a folder, or a hub id in the local cache: no network
            return read(local_only=True)
        except (OSError, ValueError):
            if path.is_dir() or not hub_reachable():
                raise
        return read(local_only=False)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"could not read the config of {spec} (not a folder, not in the local cache, or the "
            f"hub is unreachable): {(str(exc).splitlines() or [''])[0]}"
        ) from exc


# A plan fits when its fit_bytes are at most this share of the free memory (on a GPU the rest
# is for the CUDA context and the caching allocator's slack; docs/memory.md).
HEADROOM = 0.9
SCENARIO_FLAGS = {
    "full": "",
    "full+ckpt": "--gradient-checkpointing",
    "lora": "--lora",
    "lora+ckpt": "--lora --gradient-checkpointing",
}


def fitting_flags(plan: MemoryPlan, replan: Any, grad_accum: int = 1) -> str:
    """The first way to train that fits the device at hand (HEADROOM), as flags: the plan's
    scenarios in order (full, +checkpointing, LoRA, LoRA + checkpointing), then at smaller
    micro-batches with the --grad-accum that keeps the blocks per step (--batch-size x
    `grad_accum`: a micro-batch that divides them, the largest first); `replan(batch_size)`
    gives the plan at another micro-batch size."""
    if plan.available is None:
        return "unknown (the device's memory could not be read)"
    per_step = plan.batch_size * grad_accum
    for batch in (b for b in range(plan.batch_size, 0, -1) if per_step % b == 0):
        current = plan if batch == plan.batch_size else replan(batch)
        for name, flags in SCENARIO_FLAGS.items():
            if name.startswith("lora") and plan.fsdp_ranks > 1:
                flags += " --strategy ddp"  # LoRA replicates its base (FSDP + LoRA is refused)
            if current.scenarios[name].fit_bytes <= HEADROOM * plan.available:
                extra = f"--batch-size {batch} --grad-accum {per_step // batch}"
                found = (flags + " " + extra if batch != plan.batch_size else flags) or "as it is"
                return found + merge_note(plan) if name.startswith("lora") else found
    return f"nothing at block size {plan.block_size}: try a smaller --block-size"


def merge_note(plan: MemoryPlan) -> str:
    """For a LoRA answer: " --no-merge (...)" when the merge at the end would not fit in the
    system RAM free, else nothing."""
    if plan.host_available is None or plan.merge_bytes <= HEADROOM * plan.host_available:
        return ""
    return (
        f" --no-merge (merging at the end needs {plan.merge_bytes / GIB:.1f} GiB of system RAM; "
        "`domainlm export RUN OUT` merges later, where that is free)"
    )
