"""The command line: a thin map from subcommands to library functions.

`domainlm train` flags are generated from TrainConfig's fields (their help texts become --help),
in kebab-case and snake_case, plus the spelling of transformers' run_clm.py used by the seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from domainlm.config import TrainConfig, convert_option
from domainlm.errors import TrainingAborted, UserError, say_line
from domainlm.model.malloc import reuse_freed_host_memory

# run_clm.py / HF TrainingArguments spelling -> TrainConfig field.
SEED_ALIASES: dict[str, str] = {
    "model_name_or_path": "model",
    "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
    "num_train_epochs": "epochs",
    "learning_rate": "lr",
    "gradient_accumulation_steps": "grad_accum",
    "lr_scheduler_type": "scheduler",
    "max_grad_norm": "max_grad_norm",
}
# generate takes run_clm.py's spelling of the model; its --batch-size is not a training batch
GENERATE_ALIASES = {"model_name_or_path": "model"}
# run_clm.py / TrainingArguments flags with no equivalent of the same meaning: what to use instead.
# The one table for both the command line (`unrecognized`) and a --config file's keys.
NO_SEPARATE_TOKENIZER = "not supported: --model a folder holding both the model and its tokenizer"
SEED_FLAGS_INSTEAD: dict[str, str] = {
    "warmup_ratio": "--warmup-steps (a number of steps)",
    "evaluation_strategy": "--eval-steps",
    "eval_strategy": "--eval-steps",
    "save_strategy": "--save-steps",
    "logging_strategy": "--logging-steps",
    "logging_dir": "--report-to tensorboard (it writes into --output-dir)",
    "do_predict": "domainlm perplexity --model <output-dir> --file <test file>",
    "validation_split_percentage": "--validation-split 0.05 (a fraction, not a percent)",
    "resume_from_checkpoint": "--resume PATH (the default, auto, resumes the newest checkpoint)",
    "fsdp": "--strategy fsdp (under torchrun)",
    "no_cuda": "--device cpu",
    "use_cpu": "--device cpu",
    "torch_dtype": "--load-dtype",
    "tokenizer_name": NO_SEPARATE_TOKENIZER,
    "config_name": NO_SEPARATE_TOKENIZER,
    "model_type": "not supported: --model a folder, a hub id, or scratch:NAME for random weights",
    "dataset_name": "files only: --train-file (.txt, .jsonl, .parquet, .csv, a save_to_disk folder)",
    "max_train_samples": "--max-steps (or a shorter --train-file)",
    "preprocessing_num_workers": "nothing: the tokens are cached after the first read (--cache-dir)",
    "overwrite_cache": "nothing: the token cache is keyed on the files' content, so an edited "
    "file is read again (or remove the --cache-dir folder)",
    "keep_linebreaks": "--doc-sep blank (texts are paragraphs, their line breaks kept; line: one "
    "text per line)",
}
# Flags that HF accepts and that mean nothing different here (we always train and evaluate).
ACCEPTED_NO_OP_FLAGS = ("do_train", "do_eval")
PRECISION_FLAGS = {"bf16": "bf16", "fp16": "fp16"}


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(scalar type, is_list) of a field annotation such as `int | None` or `list[str] | None`."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = args[0]
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


class NegatableFlag(argparse.Action):
    """A boolean flag with its negation in each spelling: --no-merge-x for --merge-x, --no_merge_x
    for --merge_x (argparse's BooleanOptionalAction makes --no-merge_x, and refuses --no_merge_x)."""

    def __init__(
        self,
        option_strings: Sequence[str],
        dest: str,
        default: Any = None,
        required: bool = False,
        help: str | None = None,
    ) -> None:
        strings = []
        for option in option_strings:
            strings.append(option)
            if option.startswith("--"):
                strings.append(("--no_" if "_" in option else "--no-") + option[2:])
        super().__init__(strings, dest, nargs=0, default=default, required=required, help=help)

    def __call__(
        self, parser: Any, namespace: Any, values: Any, option_string: str | None = None
    ) -> None:
        setattr(namespace, self.dest, not (option_string or "").startswith(("--no-", "--no_")))

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def add_dataclass_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    aliases: Mapping[str, str] | None = None,
    enforce_required: bool = False,
) -> None:
    """One flag per field, in --kebab-case and --snake_case, help from the field's metadata.

    `aliases` maps other spellings (run_clm.py's) to field names. A list field is given as
    `--flag a b` (given again, its values are added: `--flag a --flag b` is the same), or, when
    its metadata says `repeatable`, as `--flag a --flag b` only. Fields left
    out stay out of the namespace, so the dataclass's own defaults (or a --config file) apply;
    `enforce_required` has argparse refuse a missing required field instead.
    """
    hints = _field_types(cls)
    spellings: dict[str, list[str]] = {}
    for alias, target in (aliases or {}).items():
        spellings.setdefault(target, []).append(alias)
    for f in dataclasses.fields(cls):
        names = {f"--{f.name.replace('_', '-')}", f"--{f.name}"}
        names.update(f"--{a}" for a in spellings.get(f.name, []))
        flags = sorted(names, key=lambda n: ("_" in n, len(n)))
        help_text = f.metadata.get("help", "")
        kind, is_list = _base_type(hints[f.name])
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if kind is bool:  # on by default (or set by a --config file): off with --no-FLAG
            negatable = f.default or f.metadata.get("negatable")
            kwargs["action"] = NegatableFlag if negatable else "store_true"
        else:
            kwargs["type"] = kind
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            if is_list and f.metadata.get("repeatable"):
                kwargs.update(action="append", metavar=f.name.upper())
            elif is_list:  # repeated, the lists join: `--prompts a --prompts b` is a and b
                kwargs.update(nargs="+", action="extend")
        if enforce_required and f.metadata.get("required"):
            kwargs["required"] = True
        if f.default is not dataclasses.MISSING and f.default is not None and kind is not bool:
            kwargs["help"] = f"{help_text} (default: {f.default})"
        parser.add_argument(*flags, **kwargs)


def _add_train_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a causal LM on one-text-per-line files",
        description="Fine-tune a causal LM. Flags may also come from --config run.yaml.",
        allow_abbrev=False,
    )
    p.add_argument(
        "--config",
        dest="config_file",
        action="append",  # to refuse a second one: argparse would keep the last, unread
        help="YAML file of options (key: value, any flag's spelling); flags override it. Each "
        "value must have the flag's type; numbers may be written 5e-5. Its paths are read as "
        "on the command line: relative to the folder the command runs in, ~ for your home.",
    )
    add_dataclass_arguments(p, TrainConfig, aliases=SEED_ALIASES)
    for flag in ACCEPTED_NO_OP_FLAGS:
        p.add_argument(f"--{flag}", action="store_true", help=argparse.SUPPRESS)
    for flag in PRECISION_FLAGS:
        p.add_argument(f"--{flag}", action="store_true", help=f"same as --precision {flag}")
    p.add_argument("--local-rank", "--local_rank", type=int, help=argparse.SUPPRESS)
    p.set_defaults(handler=_run_train)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < YAML file < command-line flags."""
    values: dict[str, Any] = {}
    config_files = getattr(args, "config_file", None) or []
    if len(config_files) > 1:
        raise UserError(
            f"--config given {len(config_files)} times ({', '.join(config_files)}); give one "
            "file (the options of the others would not be read)"
        )
    if config_files:
        values.update(load_yaml_options(Path(config_files[0])))
    field_names = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in field_names})
    requests = [
        (f"--{flag}", p) for flag, p in PRECISION_FLAGS.items() if getattr(args, flag, False)
    ]
    if "precision" in vars(args):
        requests.insert(0, (f"--precision {args.precision}", args.precision))
    precision = agreed_precision(requests, where="")
    if precision is not None:
        values["precision"] = precision
    return TrainConfig(**values)


def agreed_precision(requests: list[tuple[str, str]], where: str) -> str | None:
    """The one precision that (flag as given, precision) pairs ask for: --bf16 is --precision bf16.

    None when there are none; a UserError naming both flags when two disagree.
    """
    for flag, precision in requests[1:]:
        first_flag, first = requests[0]
        if precision != first:
            raise UserError(
                f"{where}{first_flag} and {flag} ask for different precisions ({first} vs "
                f"{precision}); keep one of them"
            )
    return requests[0][1] if requests else None


def unique_keys_loader() -> type:
    """PyYAML's SafeLoader refusing a key given twice in one mapping (PyYAML keeps the last one
    silently: `lr: 5e-5` then `lr: 1e-4` would train at 1e-4 without a word)."""
    import yaml

    class UniqueKeysLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            if isinstance(node, yaml.MappingNode):
                self.flatten_mapping(node)  # `<<: {lr: 1e-4}` merge keys, as SafeLoader does
            seen: list[Any] = []
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, str | int | float | bool) and key is not None:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"a key must be a name, not a {type(key).__name__}",
                        key_node.start_mark,
                    )
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"{key!r} is given twice, again on line {key_node.start_mark.line + 1}",
                    )
                seen.append(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeysLoader


# The options that name a file or folder: a --config file's `~/data/train.txt` is the home
# folder's, as on the command line, where the shell expands it (not a folder named "~").
PATH_OPTIONS = ("model", "train_file", "validation_file", "output_dir", "cache_dir", "resume")


def load_yaml_options(path: Path) -> dict[str, Any]:
    """Options of a YAML file, in any spelling the command line accepts, as their fields' types.

    Values are converted by `convert_option` (so `lr: 5e-5`, a string to YAML, is 5e-05);
    `bf16: true` / `fp16: true` are `precision: bf16` / `fp16`, and must agree with it.
    """
    import yaml

    if not path.is_file():
        problem = "a folder, not a YAML file" if path.is_dir() else "no such file"
        raise UserError(f"--config {path}: {problem}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=unique_keys_loader()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    except UnicodeDecodeError as exc:
        raise UserError(
            f"--config {path}: not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from None
    if not isinstance(raw, dict):
        raise UserError(f"--config {path}: expected a mapping of option: value")
    field_names = {f.name for f in dataclasses.fields(TrainConfig)}
    options: dict[str, Any] = {}
    spelled: dict[str, str] = {}  # field -> the key that set it
    requests: list[tuple[str, str]] = []
    for key, value in raw.items():
        name = str(key).lstrip("-").replace("-", "_")
        name = SEED_ALIASES.get(name, name)
        if name in PRECISION_FLAGS:
            if not isinstance(value, bool):
                raise UserError(f"--config {path}: {key} must be true or false, got {value!r}")
            if value:
                requests.append((str(key), PRECISION_FLAGS[name]))
            continue
        if name in ACCEPTED_NO_OP_FLAGS:
            continue
        if name in SEED_FLAGS_INSTEAD:
            raise UserError(
                f"--config {path}: unknown option {key!r} (run_clm.py's; here use: "
                f"{SEED_FLAGS_INSTEAD[name]})"
            )
        if name not in field_names:
            raise UserError(f"--config {path}: unknown option {key!r}; see domainlm train --help")
        if name in spelled:
            raise UserError(
                f"--config {path}: {spelled[name]!r} and {key!r} both set {name}; keep one"
            )
        spelled[name] = str(key)
        options[name] = convert_option(name, value, label=f"--config {path}: {key}")
        if name in PATH_OPTIONS and isinstance(options[name], str):
            options[name] = os.path.expanduser(options[name])  # as a shell expands a flag's ~
        if name == "precision":
            requests.insert(0, (f"{key} {options[name]}", options[name]))
    precision = agreed_precision(requests, where=f"--config {path}: ")
    if precision is not None:
        options["precision"] = precision
    return options


def _run_train(args: argparse.Namespace) -> int:
    from domainlm.run.train import train

    local_rank = getattr(args, "local_rank", None)
    if local_rank is None:
        local_rank = getattr(args, "launcher_local_rank", None)
    if local_rank is not None:
        # torch.distributed.launch (the seed's launcher) passes --local-rank=N to each process.
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    train(train_config_from_args(args))
    return 0


def _add_demo_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="train a scratch model on Python's own docstrings, offline")
    p.add_argument("--output-dir", default="demo-run", help="folder for the demo's data and model")
    p.add_argument("--max-steps", type=int, default=None, help="override the demo's step count")
    p.add_argument("--preset", default="scratch:mini", help="model to train (default scratch:mini)")
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from domainlm.demo import run_demo

    if not args.output_dir.strip():  # Path("") is the working folder: the demo would fill it
        raise UserError("--output-dir is empty; give a folder for the demo's data and model")
    run_demo(Path(args.output_dir), max_steps=args.max_steps, model=args.preset)
    return 0


def _add_perplexity_parser(sub: Any) -> None:
    """`domainlm perplexity`: flags from PerplexityConfig's fields; --model is repeatable."""
    from domainlm.evaluation.perplexity import PerplexityConfig

    p = sub.add_parser(
        "perplexity",
        help="perplexity and bits per byte of one or more models on a text (docs/perplexity.md)",
        description="Score a text exactly (every token once, NLL summed in float64). Several "
        "--model give one side-by-side table.",
        allow_abbrev=False,
    )
    add_dataclass_arguments(p, PerplexityConfig, enforce_required=True)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=_run_perplexity)


def _run_perplexity(args: argparse.Namespace) -> int:
    from domainlm.evaluation.perplexity import PerplexityConfig, evaluate_perplexity, render
    from domainlm.model.distributed import context_from_env

    names = {f.name for f in dataclasses.fields(PerplexityConfig)}
    config = PerplexityConfig(**{k: v for k, v in vars(args).items() if k in names})
    reports = evaluate_perplexity(config)
    if context_from_env().is_main:
        render(reports, config, as_json=args.json)
    return 0


def _add_generate_parser(sub: Any) -> None:
    """`domainlm generate`: flags from GenerateConfig's fields, plus a repeatable --prompt."""
    from domainlm.text.generate import GenerateConfig

    p = sub.add_parser(
        "generate",
        help="continue prompts with a model; optionally check for copied training data",
        description="Sample text from a model (streamed for one prompt). --check-memorization "
        "reports the longest span of each sample copied verbatim from the training data.",
        allow_abbrev=False,
    )
    add_dataclass_arguments(p, GenerateConfig, aliases=GENERATE_ALIASES)
    p.add_argument(
        "--prompt", dest="prompts", action="append", help="a prompt to continue (repeatable)"
    )
    p.set_defaults(handler=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from domainlm.model.distributed import context_from_env
    from domainlm.text.generate import GenerateConfig, run_generate

    if not context_from_env().is_main:  # under torchrun rank 0 generates; each rank printed all
        return 0
    names = {f.name for f in dataclasses.fields(GenerateConfig)}
    run_generate(GenerateConfig(**{k: v for k, v in vars(args).items() if k in names}))
    return 0


def _add_report_parser(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help="report.html, plots of loss, perplexity and learning rate, a summary table, the card",
        description="Report on one or more training runs: one self-contained report.html "
        "(several runs compared on one page, their curves overlaid), the plots and summary.md.",
        allow_abbrev=False,
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output folders of training runs")
    p.add_argument(
        "--output",
        help="folder for report.html, the plots and summary.md (default: the run's folder, "
        "or ./report)",
    )
    p.set_defaults(handler=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from domainlm.run.report import run_report

    run_report([Path(r) for r in args.runs], Path(args.output) if args.output else None)
    return 0


def _add_inspect_parser(sub: Any) -> None:
    from domainlm.inspect_data import InspectConfig

    p = sub.add_parser(
        "inspect",
        help="count, lint and size a corpus before training (tokens, steps, time, memory)",
        allow_abbrev=False,
    )
    add_dataclass_arguments(p, InspectConfig, aliases=SEED_ALIASES)
    p.set_defaults(handler=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    from domainlm.inspect_data import InspectConfig, run_inspect

    names = {f.name for f in dataclasses.fields(InspectConfig)}
    return run_inspect(InspectConfig(**{k: v for k, v in vars(args).items() if k in names}))


def _add_export_parser(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="turn a checkpoint (full, sharded or LoRA) into a plain Hugging Face model folder",
        allow_abbrev=False,
    )
    p.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="a checkpoint-<step> folder, or a LoRA run's folder (its adapter is merged into a "
        "float32 copy of the base)",
    )
    p.add_argument("out", metavar="OUT", help="the new model folder (absent or empty)")
    p.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from domainlm.run.sharded import export_checkpoint

    out = Path(args.out)
    if out.exists() and not out.is_dir():  # export_checkpoint says "not an empty folder"
        raise UserError(f"{out} is a file, not a folder; give a new folder to export to")
    out = export_checkpoint(Path(args.checkpoint), out)
    print(f"exported {args.checkpoint} to {out}")
    return 0


# Each subcommand: a function adding its parser, whose handler calls the library.
SUBCOMMANDS: list[Callable[[Any], None]] = [
    _add_train_parser,
    _add_inspect_parser,
    _add_demo_parser,
    _add_perplexity_parser,
    _add_generate_parser,
    _add_report_parser,
    _add_export_parser,
]


def version_line() -> str:
    """`domainlm --version`: this package and the libraries a bug report needs, without importing them."""
    from importlib import metadata

    from domainlm import __version__

    parts = [f"python {sys.version.split()[0]}"]
    for name in ("torch", "transformers", "peft"):
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            if name != "peft":  # peft is an extra (--lora); the others are dependencies
                parts.append(f"{name} not installed")
    return f"domainlm {__version__} ({', '.join(parts)})"


class _PrintVersion(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(
            option_strings,
            dest,
            nargs=0,
            help="show the versions of domainlm, Python, torch, transformers (and peft) and exit",
        )

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(version_line())
        parser.exit()


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse's parser whose errors (a value of the wrong type, a missing required option)
    are one line pointing to --help, not the ~40 lines of usage before it."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="domainlm",
        description="Fine-tune GPT-2 or any Hugging Face causal LM on your own text, and measure it.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action=_PrintVersion)
    # torch.distributed.launch puts --local-rank=N right after `-m domainlm`, before the command.
    parser.add_argument(
        "--local-rank", "--local_rank", dest="launcher_local_rank", type=int, help=argparse.SUPPRESS
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def unrecognized(arguments: list[str], command: str = "train") -> str:
    """argparse's message for arguments no option takes, with, for `train` (whose flags the
    table names), what to use instead of a run_clm.py flag that has no equivalent here."""
    message = f"unrecognized arguments: {' '.join(arguments)}"
    flags = [a.split("=")[0].lstrip("-").replace("-", "_") for a in arguments if a.startswith("--")]
    table = SEED_FLAGS_INSTEAD if command == "train" else {}
    instead = [f"--{f} -> {table[f]}" for f in flags if f in table]
    if instead:
        return f"{message} (run_clm.py's; here use: {'; '.join(instead)})"
    return f"{message}; see --help"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, dispatch, and turn user errors into one line and exit code 2."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # one line naming the command (argparse would print the top level's usage)
        say_line(f"domainlm {args.command}: error: {unrecognized(unknown, args.command)}")
        return 2
    reuse_freed_host_memory()  # fewer page faults per step (domainlm/model/malloc.py)
    try:
        return int(args.handler(args) or 0)
    except UserError as exc:
        say_line(f"domainlm: error: {exc}")
        return exc.exit_code
    except TrainingAborted as exc:
        say_line(f"domainlm: stopped: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        say_line("domainlm: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
