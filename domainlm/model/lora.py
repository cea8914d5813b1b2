"""LoRA adapters with peft: which layers get them, attaching them, saving, merging, loading.

A LoRA run trains low-rank adapters on the linear layers of the attention and MLP blocks while
the base weights stay frozen (in bf16 when the run computes in bf16). The layers are found by
walking the model: every `nn.Linear` (and GPT-2's `Conv1D`) inside the repeated transformer
blocks (`distributed.transformer_blocks`), never the LM head or the embeddings. The run folder
holds the adapter in peft's format (`PeftModel.from_pretrained(base, folder)` loads it) and, with
--merge, `merged/`: base + adapter folded into plain weights, a folder transformers loads alone.

An adapter folder given as a model (`domainlm perplexity --model run`) is recognised by its
`adapter_config.json`: the base it names is loaded, then the adapter on top (`load_any_model`).
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from domainlm.config import read_run_settings
from domainlm.errors import TrainingAborted, UserError, say_line
from domainlm.model.distributed import transformer_blocks
from domainlm.model.loading import (
    ADAPTER_CONFIG,
    SCRATCH_PREFIX,
    LoadedModel,
    load_model,
    weights_fingerprint,
    weights_read_from,
)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGED_DIR = "merged"  # inside the run folder: the merged model (--merge)
# --lora-quantization values. QLoRA's 4-bit base needs bitsandbytes on a CUDA GPU; it would load
# the base quantized in `quantized_base` and is refused until then.
QUANTIZATIONS = ("4bit",)
INSTALL_HINT = "pip install 'domainlm[lora]'"


@dataclass(frozen=True)
class LoraSettings:
    """--lora-r, --lora-alpha, --lora-dropout and the target layers' names (None: the default)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] | None = None
    quantization: str | None = None

    @classmethod
    def from_config(cls, config: Any) -> LoraSettings | None:
        """The settings of a TrainConfig (None without --lora)."""
        if not config.lora:
            return None
        targets = tuple(config.lora_targets) if config.lora_targets else None
        return cls(
            config.lora_r, config.lora_alpha, config.lora_dropout, targets, config.lora_quantization
        )

    def identity(self, model: torch.nn.Module) -> dict[str, Any]:
        """What a resumed run must share: rank, alpha, dropout and the layers adapted."""
        return {
            "r": self.r,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "targets": sorted(target_modules(model, self.targets)),
        }


def require_peft() -> Any:
    """The peft package, or a one-line error naming the extra that installs it."""
    try:
        import peft
    except ImportError as exc:
        raise UserError(f"--lora needs the peft package: {INSTALL_HINT}") from exc
    quiet_peft()
    return peft


def quiet_peft() -> None:
    """No advisory warnings from peft about what domainlm does on purpose: the base named in
    the adapter config (a scratch: preset or a folder, not a hub id it can look up), and
    transformers' deprecation of an attribute peft reads."""
    for message in (
        "The PEFT config's `base_model_name_or_path` was renamed",
        "Could not find a config file in",
        "`is_gradient_checkpointing` is deprecated",
    ):
        warnings.filterwarnings("ignore", message=message)


def check_quantization(quantization: str | None) -> None:
    """QLoRA (a 4-bit base) is not supported: refused with one line, before anything is loaded."""
    if quantization is None:
        return
    if quantization not in QUANTIZATIONS:
        raise UserError(
            f"--lora-quantization {quantization!r} is not a quantization domainlm knows, and "
            f"none is supported yet ({', '.join(QUANTIZATIONS)}: QLoRA, planned); train --lora "
            "on a bf16 base instead (drop the flag)"
        )
    raise UserError(
        f"--lora-quantization {quantization} (QLoRA) is not supported: a quantized base needs "
        "bitsandbytes on a CUDA GPU; train --lora on a bf16 base instead (drop the flag)"
    )


# ----------------------------------------------------------------------------- target layers


def linear_features(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a linear map: an nn.Linear, or transformers' Conv1D (GPT-2's
    transposed linear, its weight stored (in, out)); None for any other module."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        rows, cols = module.weight.shape
        return int(rows), int(cols)
    return None


def adaptable(module: torch.nn.Module) -> bool:
    """A layer LoRA can adapt: a linear map (`linear_features`)."""
    return linear_features(module) is not None


def block_linear_names(model: torch.nn.Module) -> list[str]:
    """Full names of the adaptable layers inside the model's transformer blocks."""
    blocks = {id(b) for b in transformer_blocks(model)}
    if not blocks:
        raise UserError(
            "could not find the transformer blocks of this model; name the layers with "
            "--lora-targets"
        )
    block_names = [n for n, m in model.named_modules() if id(m) in blocks]
    return [
        name
        for name, module in model.named_modules()
        if adaptable(module) and any(name.startswith(b + ".") for b in block_names)
    ]


def excluded_names(model: torch.nn.Module) -> set[str]:
    """Names of the input embeddings and the output head (never adapted)."""
    excluded = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        layer = getattr(model, getter, lambda: None)()
        for name, module in model.named_modules():
            if layer is not None and module is layer:
                excluded.add(name)
    return excluded


def target_modules(model: torch.nn.Module, requested: tuple[str, ...] | None) -> list[str]:
    """The layer names given to peft: leaf names (c_attn, q_proj, ...) that match only the
    adaptable layers meant; the full names where a leaf name would also match another layer."""
    adaptable_names = [n for n, m in model.named_modules() if adaptable(m)]
    excluded = excluded_names(model)
    if requested is None:
        chosen = block_linear_names(model)
    else:
        chosen = []
        for target in requested:
            matches = [n for n in adaptable_names if n == target or n.endswith("." + target)]
            if not matches:
                allowed = [n for n in adaptable_names if n not in excluded]
                leaves = sorted({n.rsplit(".", 1)[-1] for n in allowed})
                raise UserError(
                    f"--lora-targets {target} matches no linear layer of the model; the layers "
                    f"LoRA can adapt are named {', '.join(leaves)}"
                )
            if any(m in excluded for m in matches):
                raise UserError(
                    f"--lora-targets {target} names the LM head or the embeddings, which LoRA "
                    "here leaves alone; name layers of the attention and MLP blocks"
                )
            chosen += matches
    if not chosen:
        raise UserError("the model's blocks have no linear layers for LoRA to adapt")
    leaves = sorted({n.rsplit(".", 1)[-1] for n in chosen})
    other = [n for n in adaptable_names if n not in chosen and n.rsplit(".", 1)[-1] in leaves]
    return sorted(set(chosen)) if other else leaves


def adapted_layers(model: torch.nn.Module, targets: list[str]) -> dict[str, tuple[int, int]]:
    """The layers peft adapts for `targets` (as `target_modules` names them: a layer whose full
    name is a target or ends with "." + one), full name -> (in, out) features."""
    found: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        features = linear_features(module)
        if features and any(name == t or name.endswith("." + t) for t in targets):
            found[name] = features
    return found


def rank_above_width(model: torch.nn.Module, targets: list[str], r: int) -> str | None:
    """What to say when --lora-r is more than the width of a layer it adapts (its smaller
    feature count): that layer's update B @ A has rank at most its width, so the rank above it
    adds parameters and time, not capacity. None when every adapted layer is wide enough."""
    widths = [min(features) for features in adapted_layers(model, targets).values()]
    if not widths or r <= min(widths):
        return None
    return (
        f"--lora-r {r} is more than the width of the narrowest layer it adapts ({min(widths)}): "
        f"a layer's update has rank at most its width, so the rank above {min(widths)} adds "
        "parameters and time, not capacity"
    )


# ----------------------------------------------------------------------------- training


def attach_lora(
    model: torch.nn.Module,
    settings: LoraSettings,
    *,
    seed: int,
    base_name: str,
    resume_from: Path | None = None,
) -> Any:
    """The model with LoRA adapters (a peft PeftModel), base frozen, adapters in float32.

    The adapters' initialisation is seeded; on resume their weights are the checkpoint's.
    """
    peft = require_peft()
    check_quantization(settings.quantization)
    targets = target_modules(model, settings.targets)
    conv1d = any(
        type(m).__name__ == "Conv1D"
        for n, m in model.named_modules()
        if n in targets or n.rsplit(".", 1)[-1] in targets
    )
    lora_config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        fan_in_fan_out=conv1d,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_name,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = peft.get_peft_model(model, lora_config)
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    if resume_from is not None:
        load_adapter_weights(peft_model, resume_from)
    return peft_model


def load_adapter_weights(peft_model: Any, folder: Path) -> None:
    """Put a saved adapter's weights into `peft_model`; every adapter tensor must be there."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not (folder / ADAPTER_WEIGHTS).is_file():  # e.g. a LoRA run's sharded checkpoint
        raise UserError(
            f"{folder} holds no adapter ({ADAPTER_WEIGHTS}): not a checkpoint of a LoRA run that "
            "this version can continue; resume from another checkpoint (--resume) or start "
            "afresh (--overwrite-output-dir)"
        )
    with weights_read_from(folder / ADAPTER_WEIGHTS):
        state = load_file(str(folder / ADAPTER_WEIGHTS))
    result = set_peft_model_state_dict(peft_model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise UserError(
            f"{folder} does not hold this run's adapter (missing {missing[:2]}, unexpected "
            f"{list(result.unexpected_keys)[:2]})"
        )


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def base_record(spec: str) -> str:
    """The base as the adapter config names it: a local folder's absolute path, else the spec."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if not spec.startswith(SCRATCH_PREFIX) and path.is_dir() else spec


def save_adapter(peft_model: Any, folder: Path) -> None:
    """adapter_config.json and adapter_model.safetensors into `folder` (peft's own model card
    left out: the run folder's README.md is domainlm's)."""
    staging = folder / ".adapter.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    peft_model.save_pretrained(str(staging))
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        (staging / name).replace(folder / name)
    shutil.rmtree(staging)


def load_merged(
    folder: Path,
    *,
    seed: int | None = None,
    eos_token: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """The adapter saved in `folder` merged into a fresh float32 copy of its base: a plain
    transformers model (W + alpha / r * B @ A in float32, so an update smaller than a bf16 step
    of W is not rounded away), with the base's tokenizer. Needs the base's parameters x 4 bytes
    of memory."""
    loaded = load_adapter(
        folder, seed=seed, eos_token=eos_token, trust_remote_code=trust_remote_code, peft=True
    )
    loaded.model = loaded.model.merge_and_unload()
    return loaded


def save_merged(
    folder: Path, tokenizer: Any, *, seed: int, eos_token: str | None, trust_remote_code: bool
) -> Path:
    """`folder/merged`: `load_merged(folder)` saved as a plain model folder with the tokenizer.

    Out of memory while merging: a TrainingAborted naming what it needs and the way out (the
    adapter in `folder` is saved already; `domainlm export` merges it later)."""
    target = folder / MERGED_DIR
    try:
        merged = load_merged(
            folder, seed=seed, eos_token=eos_token, trust_remote_code=trust_remote_code
        ).model
    except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if not is_out_of_memory(exc):
            raise
        raise TrainingAborted(
            f"out of memory while merging the adapter into a float32 copy of its base for "
            f"{target}: the adapter itself is saved in {folder}; merge it where more memory is "
            f"free with `domainlm export {folder} OUT`, or train with --no-merge"
        ) from None
    merged.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed: MemoryError, torch's OutOfMemoryError, or the RuntimeError of a
    failed CPU allocation or memory map ("Cannot allocate memory", "DefaultCPUAllocator")."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return any(s in text for s in ("Cannot allocate memory", "DefaultCPUAllocator: can't allocate",
                                   "out of memory"))  # fmt: skip


# ----------------------------------------------------------------------------- adapter folders


def is_adapter_folder(spec: str | Path) -> bool:
    return (Path(spec).expanduser() / ADAPTER_CONFIG).is_file()


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    """An adapter folder's adapter_config.json, or a UserError saying why it cannot be read."""
    path = Path(folder).expanduser() / ADAPTER_CONFIG
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        problem = "cannot be read" if isinstance(exc, OSError) else "is not valid JSON"
        raise UserError(f"{path} {problem} ({exc}); copy the adapter again") from None
    if not isinstance(settings, dict):
        raise UserError(f"{path} is not a JSON object of adapter settings")
    return settings


def adapter_base(folder: str | Path) -> str:
    """The base model an adapter folder names (`base_model_name_or_path`)."""
    base = read_adapter_config(folder).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise UserError(f"{Path(folder).expanduser() / ADAPTER_CONFIG} names no base model")
    return base


def adapter_lora_settings(folder: str | Path) -> dict[str, Any]:
    """An adapter folder's LoRA settings as a run's identity keeps them (r, dropout, targets);
    those it does not say, or says as peft's regex of targets, left out."""
    settings = read_adapter_config(folder)
    found = {"r": settings.get("r"), "dropout": settings.get("lora_dropout")}
    r, dropout = found["r"], found["dropout"]
    where = Path(folder).expanduser() / ADAPTER_CONFIG
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
        raise UserError(f"{where}: r is {r!r}, not a whole number of at least 1")
    if dropout is not None and (
        isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1
    ):
        raise UserError(f"{where}: lora_dropout is {dropout!r}, not a number in [0, 1)")
    targets = settings.get("target_modules")
    if isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        found["targets"] = sorted(targets)
    return {k: v for k, v in found.items() if v is not None}


def load_any_model(
    spec: str,
    *,
    seed: int = 0,
    eos_token: str | None = None,
    trust_remote_code: bool = False,
    weights: bool = True,
) -> LoadedModel:
    """`load_model`, or for an adapter folder its base with the adapter on top (with
    `weights=False`: the base's shapes on the meta device, no adapter)."""
    kwargs: dict[str, Any] = dict(eos_token=eos_token, trust_remote_code=trust_remote_code)
    if is_adapter_folder(spec):
        if not weights:
            return load_model(adapter_base(spec), seed=seed, weights=False, **kwargs)
        return load_adapter(spec, **kwargs)
    return load_model(spec, seed=seed, weights=weights, **kwargs)


def load_adapter(
    folder: str | Path,
    *,
    seed: int | None = None,
    eos_token: str | None = None,
    trust_remote_code: bool = False,
    peft: bool = False,
) -> LoadedModel:
    """The base named in `folder`'s adapter_config.json (float32), with the adapter on top.

    `model` is the transformers model with the adapter's layers in it (it computes and generates
    as any model does); with `peft=True` the PeftModel around it. A scratch base is rebuilt with
    the seed of the run that trained the adapter (its run_config.json, in the folder or above).
    """
    folder = Path(folder).expanduser()
    peft_lib = require_peft()
    base = adapter_base(folder)
    if not (folder / ADAPTER_WEIGHTS).is_file():
        # peft would fall back to a pickled adapter_model.bin (torch.load): never load one
        raise UserError(
            f"{folder} has no {ADAPTER_WEIGHTS}: adapters are read from safetensors only, a "
            "pickled adapter_model.bin is not loaded (save it with peft's save_pretrained, "
            "safe_serialization=True)"
        )
    if seed is None:
        seed = scratch_seed(folder) if base.startswith(SCRATCH_PREFIX) else 0
    changed = base_weights_changed(folder, base)
    if changed:
        say_line(f"warning: {changed}")
    try:
        loaded = load_model(
            base, seed=seed, eos_token=eos_token, trust_remote_code=trust_remote_code
        )
    except UserError as exc:  # say where the base's name came from: the user gave the adapter
        raise UserError(
            f"{folder} is a LoRA adapter whose base model {base!r} (base_model_name_or_path in "
            f"its {ADAPTER_CONFIG}) cannot be loaded: {exc}"
        ) from None
    # safetensors only: the adapter_model.safetensors checked above is the file peft reads first
    with weights_read_from(folder / ADAPTER_WEIGHTS):
        model = peft_lib.PeftModel.from_pretrained(loaded.model.float(), str(folder))
    loaded.model = model if peft else model.get_base_model()
    loaded.model.eval()
    loaded.source = str(folder)
    return loaded


def base_weights_changed(folder: Path, base: str) -> str | None:
    """What to say when the base folder holds other weights than the run that trained the
    adapter in `folder` recorded (its identity's `base_weights`: the base replaced or trained
    further since): the adapter then goes on top of weights it did not learn on. None when they
    are the same, or nothing was recorded (a scratch base, an adapter without its run's files)."""
    found = read_run_settings(folder)
    identity = found[1].get("identity") if found else None
    recorded = identity.get("base_weights") if isinstance(identity, dict) else None
    if not isinstance(recorded, str):
        return None
    now = weights_fingerprint(base)
    if now is None or now == recorded:
        return None
    return (
        f"the base model {base} holds other weights than the run that trained the adapter in "
        f"{folder} was given ({found[0]} records them): the adapter is applied to weights it did "
        "not learn on, and the figures are not the run's; give the base it was trained on"
    )


def scratch_seed(folder: Path) -> int:
    """The seed of the run whose adapter is in `folder` (a scratch base is its seed's weights)."""
    found = read_run_settings(folder)
    settings = found[1].get("config") if found else None
    seed = settings.get("seed") if isinstance(settings, dict) else None
    if not isinstance(seed, int):
        raise UserError(
            f"{folder} is an adapter of a random-init scratch base, and no run_config.json beside "
            "it says the seed that built the base"
        )
    return seed


def lora_identity(config: Any, model: torch.nn.Module) -> dict[str, Any] | None:
    """The run identity's `lora` entry (None without --lora); checks peft, the quantization and
    the target layers first, so that a bad setting stops the run before anything is written."""
    settings = LoraSettings.from_config(config)
    if settings is None:
        return None
    require_peft()
    check_quantization(settings.quantization)
    return settings.identity(model)
