"""Run configuration: typed dataclasses with one help text per field, checked in __post_init__.

The help texts are what `domainlm train --help` prints, so the docs and the code cannot drift.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domainlm.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULERS = ("cosine", "linear", "constant")
STRATEGIES = ("auto", "ddp", "fsdp")
REPORT_TO = ("tensorboard", "mlflow", "wandb", "none")  # --report-to (run/trackers.py)
PACKING_MODES = ("concat", "docs")
DOC_SEPARATORS = ("line", "blank")
ENCODING_ERRORS = ("strict", "replace")
TEXT_COLUMN_HELP = (
    "Column of .parquet/.csv/dataset-folder rows (and field of .jsonl lines) that holds the text."
)
CHECKPOINT_FORMATS = ("auto", "full", "sharded")
LOAD_DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_SEED = 42  # train's --seed; perplexity's builds a scratch:NAME preset the same way
RUN_FILE = "run_config.json"  # a run folder's identity, settings and owned files (run/train.py)
CHECKPOINT_PREFIX = "checkpoint-"  # a run's checkpoint-<step> folders (run/checkpoint.py)


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint folder's name (`checkpoint-500` -> 500); None for another name."""
    suffix = name.removeprefix(CHECKPOINT_PREFIX)
    return int(suffix) if suffix != name and suffix.isdigit() else None


# Where a run's final model and tokenizer are written before they are moved into its folder
# (run/checkpoint.py `publish_final_files`); there, the final save was cut short.
FINAL_STAGING = ".final.tmp"
# The run file's entry for the training data: {"path": absolute} (its tokens: identity's).
TRAIN_DATA_FILE = "train_data_file"
# The settings that shape the updates a run makes: the model card's table, and what a resumed
# run records when it changes them (run_config.json's "history", run/resume.py)
TRAINING_SETTINGS = (
    "block_size", "batch_size", "grad_accum", "epochs", "max_steps", "early_stopping_patience",
    "load_best_model_at_end", "lr", "scheduler", "warmup_steps", "min_lr_ratio", "weight_decay",
    "adam_beta1", "adam_beta2", "max_grad_norm", "precision", "load_dtype", "packing", "seed",
    "eval_steps", "max_eval_tokens", "eval_stride",  # what early stopping and the best compare
    "strategy",  # ddp or fsdp: the same updates up to float rounding, said when it changes
)  # fmt: skip
# The settings of a command, not of its run: how it shows its progress, how long it waits, where
# its token cache is. A finished run started again with only these changed has nothing to do.
COMMAND_SETTINGS = ("quiet", "strict", "dist_timeout", "cache_dir", "preempt_grace")


# Settings that name files, compared by what is in them: --output-dir is the folder whose run
# file is read, the data's tokens are the identity's train_data and the finish marker's
# validation, a local --model folder is `same_model_spelled`'s.
SETTINGS_NAMING_FILES = ("output_dir", "train_file", "validation_file", "model")


def run_settings(settings: Any) -> Any:
    """A run file's settings, as a finished run is recognised by them: less the command's own
    (config.COMMAND_SETTINGS: --quiet, ...) and those naming files (SETTINGS_NAMING_FILES), so
    that `./out/`, `out` and a copy of the folder elsewhere, or the data spelled another way,
    are the same run."""
    if not isinstance(settings, dict):
        return settings
    skipped = (*COMMAND_SETTINGS, *SETTINGS_NAMING_FILES)
    return {key: value for key, value in settings.items() if key not in skipped}


def setting_shown(value: Any) -> Any:
    """A setting's value in a message or the model card: None (not given) as "(unset)"."""
    return "(unset)" if value is None else value


def read_run_settings(spec: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The run_config.json of a domainlm run folder, or of the run a checkpoint or adapter folder
    sits in (its parent's), with its path; None for any other model (hub id, scratch:NAME, a
    plain folder) and for a file that is not a JSON object."""
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        return None
    for candidate in (folder / RUN_FILE, folder.parent / RUN_FILE):
        try:
            run = json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(run, dict):
            return candidate, run
    return None


def valid_history(value: Any) -> list[dict[str, Any]]:
    """The well-formed entries of a run file's "history" (run/resume.py's `resume_history`:
    `{"step": int, "changed": {setting: [before, after]}}`, by step); others are left out."""
    entries = value if isinstance(value, list) else []
    return [
        entry
        for entry in entries
        if isinstance(entry, dict)
        and isinstance(entry.get("step"), int)
        and isinstance(entry.get("changed"), dict)
        and all(isinstance(pair, list) and len(pair) == 2 for pair in entry["changed"].values())
    ]


def opt(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field whose `help` becomes the command-line help."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Everything `domainlm train` needs. `domainlm.run.train(TrainConfig(...))` runs it."""

    model: str = opt(
        None,
        "Hub id (gpt2), local Hugging Face model folder, or offline preset scratch:NAME "
        "(tiny, mini, gpt2, gpt2-medium, gpt2-large, gpt2-xl).",
        required=True,
    )
    train_file: str = opt(
        None,
        "Training texts: .txt (one per line), .jsonl, .parquet or .csv (one per row, the "
        "--text-column), a datasets.save_to_disk folder, or a folder of files.",
        required=True,
    )
    output_dir: str = opt(
        None, "Folder for checkpoints, metrics and the final model.", required=True
    )
    validation_file: str | None = opt(
        None, "Validation texts. Without one, a seeded random share of the training documents."
    )
    validation_split: float = opt(
        0.05, "Share of training documents held out when no validation file is given."
    )
    text_column: str = opt("text", TEXT_COLUMN_HELP)
    block_size: int | None = opt(
        None, "Tokens per training block. Default: the model's context, at most 1024."
    )
    batch_size: int = opt(8, "Blocks per micro-batch on each device.")
    eval_batch_size: int | None = opt(None, "Windows per evaluation batch. Default: --batch-size.")
    grad_accum: int = opt(1, "Micro-batches accumulated per optimizer step.")
    epochs: float = opt(3.0, "Passes over the training blocks (ignored when --max-steps is set).")
    max_steps: int | None = opt(None, "Optimizer steps to run; overrides --epochs.")
    lr: float = opt(5e-5, "Peak learning rate (AdamW).")
    warmup_steps: int = opt(0, "Steps of linear warmup from 0 to --lr.")
    scheduler: str = opt("linear", "Learning-rate schedule after warmup.", choices=SCHEDULERS)
    min_lr_ratio: float = opt(
        0.0,
        "The rate the decay ends at, as a share of --lr (cosine, linear): reached after the last "
        "step, whose update uses one decay step above it, as transformers' schedules do.",
    )
    weight_decay: float = opt(0.0, "AdamW weight decay on matrices (not biases or norms).")
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.999, "AdamW beta2.")
    max_grad_norm: float = opt(1.0, "Clip the global gradient norm to this (0 disables).")
    precision: str = opt(
        "auto", "Compute precision; auto picks bf16 where supported.", choices=PRECISIONS
    )
    device: str | None = opt(
        None,
        "Where to compute: auto (this rank's GPU when PyTorch sees one, else the CPU), cpu, or "
        "cuda (an error without a GPU). Default: $DOMAINLM_DEVICE or auto.",
        choices=DEVICES,
    )
    eval_steps: int | None = opt(
        None,
        "Validate every N steps (and before the first and after the last). Default: --save-steps.",
    )
    eval_stride: int | None = opt(
        None, "Validation stride S (tokens predicted per window). Default: block size - 1."
    )
    max_eval_tokens: int | None = opt(
        None,
        "Score about this many validation tokens (whole windows) at every evaluation, the last "
        "step's too: the figures checkpoints and early stopping compare. The perplexity before "
        "and after training is the whole set's, scored as well.",
    )
    early_stopping_patience: int | None = opt(
        None,
        "Stop once N evaluations in a row (every --eval-steps) score no lower validation "
        "perplexity than the best before them; the run ends at that step as at its last "
        "(checkpoint, full evaluation, model folder) and names its best checkpoint.",
    )
    load_best_model_at_end: bool = opt(
        False,
        "Save as the model the best checkpoint's weights (lowest validation perplexity), "
        "scored on the whole validation set, instead of the last step's.",
    )
    save_steps: int = opt(500, "Write a checkpoint every N steps.")
    async_save: bool = opt(
        False,
        "Write checkpoints from a host copy in a background thread while training goes on "
        "(at most one in flight; sharded checkpoints are written synchronously).",
    )
    checkpoint_format: str = opt(
        "auto",
        "full: one Hugging Face folder written by rank 0; sharded: each rank writes its shards "
        "(torch.distributed.checkpoint); auto: sharded under --strategy fsdp, else full.",
        choices=CHECKPOINT_FORMATS,
    )
    save_total_limit: int | None = opt(
        None, "Keep only the newest K checkpoints (plus the best, which is never deleted)."
    )
    logging_steps: int = opt(10, "Log loss, learning rate and tokens/s every N steps.")
    seed: int = opt(
        DEFAULT_SEED, "Seed for initialisation, data order, dropout and the validation split."
    )
    overwrite_output_dir: bool = opt(
        False,
        "Start afresh in a folder of an earlier run (removes only files domainlm wrote); "
        "--no-overwrite-output-dir turns off a --config file's.",
        negatable=True,
    )
    resume: str = opt("auto", "auto (newest matching checkpoint), never, or a checkpoint path.")
    eos_token: str | None = opt(
        None,
        "Token appended after every document when the tokenizer has no EOS (or to override it).",
    )
    doc_sep: str = opt(
        "line",
        "Documents are lines (line) or paragraphs separated by empty lines (blank).",
        choices=DOC_SEPARATORS,
    )
    packing: str = opt(
        "concat",
        "concat: documents share blocks and attend to each other (run_clm.py); docs: they do not.",
        choices=PACKING_MODES,
    )
    encoding_errors: str = opt(
        "strict",
        "strict refuses invalid UTF-8 (with line numbers); replace goes on.",
        choices=ENCODING_ERRORS,
    )
    strategy: str = opt(
        "auto",
        "Under torchrun: ddp (auto) replicates the model on every rank; fsdp shards it.",
        choices=STRATEGIES,
    )
    dist_timeout: float = opt(
        1800.0,
        "Seconds a rank waits for the others (joining, each collective) before the run stops.",
    )
    cache_dir: str | None = opt(
        None, "Token cache folder. Default: $DOMAINLM_CACHE or ~/.cache/domainlm."
    )
    trust_remote_code: bool = opt(False, "Allow model code from the hub (only if you trust it).")
    compile: bool = opt(False, "torch.compile the model (pays off on long GPU runs).")
    gradient_checkpointing: bool = opt(
        False,
        "Recompute each layer's activations in the backward instead of keeping them: less memory "
        "(`domainlm inspect --model M` shows how much), about a third more compute.",
    )
    load_dtype: str = opt(
        "auto",
        "Dtype the weights load in. auto: float32 for full fine-tuning (mixed precision), the "
        "training precision with --lora; bfloat16 without --lora is pure bf16 training "
        "(docs/memory.md).",
        choices=LOAD_DTYPES,
    )
    quiet: bool = opt(False, "No progress bar: one log line per logging step (for log files).")
    max_bad_steps: int = opt(
        3, "Stop after this many consecutive steps with a NaN/Inf loss or gradient."
    )
    strict: bool = opt(
        False,
        "Treat data lint warnings, too little free disk for the checkpoints, and too little "
        "free memory for the memory plan of the run, as errors.",
    )
    preempt_grace: float = opt(
        60.0,
        "Seconds between SIGTERM and SIGKILL (the scheduler's grace period): on SIGTERM a "
        "checkpoint is written if it fits in them, else the last one is kept and preempted.json "
        "notes the step reached.",
    )
    sample_prompts: list[str] | None = opt(
        None, "Prompts to sample from at every --sample-every steps (written to samples.jsonl)."
    )
    sample_every: int | None = opt(None, "Sample from --sample-prompts every N steps.")
    sample_max_new_tokens: int = opt(40, "Tokens generated per training-time sample.")
    report_to: list[str] | None = opt(
        None,
        "Experiment trackers to log metrics and settings to (rank 0, offline-capable; "
        "pip install 'domainlm[NAME]'): one or more of tensorboard, mlflow, wandb, or none. "
        "Default: tensorboard when it is installed, else none.",
        choices=REPORT_TO,
    )
    lora: bool = opt(False, "Train LoRA adapters (peft) on a frozen base instead of every weight.")
    lora_r: int = opt(8, "LoRA rank.")
    lora_alpha: float = opt(16.0, "LoRA alpha (the adapters' output is scaled by alpha / r).")
    lora_dropout: float = opt(0.05, "Dropout on the LoRA adapters' input.")
    lora_targets: list[str] | None = opt(
        None,
        "Layers to adapt, by name (q_proj v_proj). Default: every linear layer of the "
        "attention and MLP blocks (not the LM head or the embeddings).",
    )
    lora_quantization: str | None = opt(
        None, "4bit: QLoRA (needs bitsandbytes on CUDA; not supported yet, refused)."
    )
    merge: bool = opt(
        True, "With --lora: also write merged/, base + adapter as a plain model (--no-merge: not)."
    )

    def __post_init__(self) -> None:
        for name in ("model", "train_file", "output_dir", "text_column"):
            if not getattr(self, name):
                raise UserError(f"--{name.replace('_', '-')} is required")
        for f in dataclasses.fields(self):  # nan slips past every `<= 0` check below
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(
                    f"--{f.name.replace('_', '-')} must be a finite number, got {value}"
                )
        positive = ["batch_size", "grad_accum", "save_steps", "logging_steps", "max_bad_steps"]
        positive += ["dist_timeout", "preempt_grace"]
        optional_positive = [
            "block_size",
            "eval_batch_size",
            "eval_steps",
            "eval_stride",
            "save_total_limit",
            "max_eval_tokens",
            "sample_every",
            "early_stopping_patience",
        ]
        for name in positive:
            require_positive(name, getattr(self, name))
        for name in optional_positive:
            value = getattr(self, name)
            if value is not None:
                require_positive(name, value)
        check_run_length(self.epochs, self.max_steps)
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        for name in ("warmup_steps",):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be 0 or more")
        for name in ("weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise UserError(
                    f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}"
                )
        check_validation_split(self.validation_split)
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError("--min-lr-ratio must be between 0 and 1")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(
                    f"--{name.replace('_', '-')} must be at least 0 and below 1, e.g. 0.9 or "
                    f"0.999, got {getattr(self, name)}"
                )
        check_seed(self.seed)
        require_positive("sample_max_new_tokens", self.sample_max_new_tokens)
        for name in (
            "precision", "scheduler", "strategy", "packing", "doc_sep", "encoding_errors",
            "load_dtype", "checkpoint_format",
        ):  # fmt: skip
            choices = _field_meta(name)["choices"]
            if getattr(self, name) not in choices:
                raise UserError(
                    f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, "
                    f"got {getattr(self, name)!r}"
                )
        check_device(self.device)
        if (
            self.block_size is not None
            and self.eval_stride is not None
            and self.eval_stride > self.block_size - 1
        ):
            raise UserError(f"--eval-stride must be at most block size - 1 = {self.block_size - 1}")
        if self.sample_every is not None and not self.sample_prompts:
            raise UserError("--sample-every needs --sample-prompts")
        check_lora_fields(self)
        if self.eval_steps is None:
            self.eval_steps = self.save_steps
        if self.load_best_model_at_end and self.save_steps % self.eval_steps:
            raise UserError(
                f"--load-best-model-at-end picks among checkpoints by their validation "
                f"perplexity, and --save-steps {self.save_steps} is not a multiple of "
                f"--eval-steps {self.eval_steps} (a checkpoint would have none): make it one"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --seed: a 32-bit word, which every generator seeded from it (numpy, torch) takes
MAX_SEED = 2**32 - 1


def check_seed(seed: int | None) -> None:
    """--seed is a whole number from 0 to MAX_SEED (None: none given)."""
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed must be a whole number from 0 to {MAX_SEED}, got {seed}")


def check_validation_split(share: float) -> None:
    """--validation-split is a share strictly between 0 and 1 (`train` and `inspect` alike)."""
    if not 0 < share < 1:
        raise UserError(f"--validation-split must be between 0 and 1, e.g. 0.05, got {share}")


def check_run_length(epochs: float, max_steps: int | None) -> None:
    """--max-steps, when given, is positive; else --epochs is."""
    if max_steps is not None:
        require_positive("max_steps", max_steps)
    elif not epochs > 0:
        raise UserError("--epochs must be positive (or set --max-steps)")


def check_device(device: str | None) -> None:
    """--device is one of DEVICES, or None ($DOMAINLM_DEVICE or auto, checked when used)."""
    if device is not None and device not in DEVICES:
        raise UserError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")


def check_writable_folder(folder: Path, label: str) -> None:
    """Refuse, in one line starting with `label`, a `folder` (or, when it is still to be made,
    its nearest existing parent) that is a file or where no file can be written. Besides
    os.access (which root passes on a read-only mount), a probe file is made and removed."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{label}: {existing} is a file, not a folder; name a folder")
    problem = None if os.access(existing, os.W_OK | os.X_OK) else "permission denied"
    if problem is None:
        try:
            handle, probe = tempfile.mkstemp(prefix=".domainlm-probe-", dir=existing)
            os.close(handle)
            os.unlink(probe)
        except OSError as exc:
            problem = exc.strerror or str(exc)
    if problem is not None:
        raise UserError(
            f"{label}: cannot write in the folder {existing} ({problem}); name a writable place"
        )


LORA_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "lora_quantization")


def check_lora_fields(config: TrainConfig) -> None:
    """LoRA's numbers in range; LoRA's flags only with --lora."""
    if not config.lora:
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        changed = [n for n in LORA_FIELDS if getattr(config, n) != defaults[n]]
        if changed:
            raise UserError(f"--{changed[0].replace('_', '-')} needs --lora")
        if not config.merge:
            raise UserError("--no-merge needs --lora (only a LoRA run has an adapter to merge)")
        return
    require_positive("lora_r", config.lora_r)
    require_positive("lora_alpha", config.lora_alpha)
    if not 0 <= config.lora_dropout < 1:
        raise UserError(f"--lora-dropout must be at least 0 and below 1, got {config.lora_dropout}")
    if config.strategy == "fsdp":
        raise UserError("--lora with --strategy fsdp is not supported; use ddp (the default)")
    if config.checkpoint_format == "sharded":  # a LoRA checkpoint is its adapter: small, whole
        raise UserError(
            "--lora with --checkpoint-format sharded is not supported (a LoRA checkpoint holds "
            "only the adapter, written whole); leave --checkpoint-format at auto or full"
        )


def _as_int(value: Any) -> int | None:
    """An int, or a string of one ('4'); None for anything else (bools, floats, 'four')."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _as_float(value: Any) -> float | None:
    """A finite number, or a string of one ('5e-5', which YAML reads as a string); else None."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _as_exact(kind: type) -> Callable[[Any], Any]:
    """A converter that keeps values of exactly `kind` (bool, str) and refuses the rest."""
    return lambda value: value if isinstance(value, kind) else None


# Field type -> (converter returning None for a wrong value, what it expects, the same plural).
CONVERTERS: dict[type, tuple[Callable[[Any], Any], str, str]] = {
    int: (_as_int, "an integer", "integers"),
    float: (_as_float, "a number", "numbers"),
    bool: (_as_exact(bool), "true or false", "true/false values"),
    str: (_as_exact(str), "a string", "strings"),
}


def _field_type(name: str) -> tuple[type, bool]:
    """(scalar type, is_list) of a TrainConfig field: `int | None` -> (int, False)."""
    annotation = typing.get_type_hints(TrainConfig)[name]
    if isinstance(annotation, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def convert_option(name: str, value: Any, label: str) -> Any:
    """`value` (from a --config file) as the type of TrainConfig field `name`, or a UserError.

    A float field takes a number or a string that parses as one, so `lr: 5e-5` (a string to
    YAML, which wants a dot: 5.0e-5) means 5e-05; an int field an int or a string of one; a bool
    field only true/false; a str field a string; a list field a list of strings, or one string
    as a list of one. null is kept
    where the field's default is None. `label` starts the error: `--config run.yaml: batch_size`.
    """
    if value is None and _field_default(name) is None:
        return None
    kind, is_list = _field_type(name)
    convert, expected, plural = CONVERTERS[kind]
    if is_list:
        if not isinstance(value, list) and convert(value) is not None:
            value = [value]  # `report_to: tensorboard`, as `--report-to tensorboard`
        if isinstance(value, list) and all(convert(item) is not None for item in value):
            return [convert(item) for item in value]
        raise UserError(f"{label} must be a list of {plural}, got {value!r}")
    converted = convert(value)
    if converted is None:
        raise UserError(f"{label} must be {expected}, got {value!r}")
    choices = _field_meta(name).get("choices")
    if choices and converted not in choices:
        raise UserError(f"{label} must be one of {', '.join(choices)}, got {converted!r}")
    return converted


def _field_default(name: str) -> Any:
    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}[name]


def _field_meta(name: str) -> dict[str, Any]:
    return {f.name: f.metadata for f in dataclasses.fields(TrainConfig)}[name]


def require_positive(name: str, value: float) -> None:
    if value <= 0:
        raise UserError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
