"""Run reports: plots of loss, perplexity and learning rate; a summary table; the model card;
TensorBoard / MLflow / W&B loggers.

Everything is read back from what a run writes (metrics.jsonl, eval_results.json,
run_config.json), so `domainlm report RUN_DIR ...` gives the same report later, for several runs
overlaid. matplotlib, tensorboard, mlflow and wandb are optional: without them that part is
skipped with a one-line note.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domainlm.errors import UserError
from domainlm.run.metrics import read_events

PLOTS = {
    "training_loss.png": ("loss", "training loss (nats/token)", False),
    "validation_perplexity.png": ("eval_ppl", "validation perplexity", True),
    "learning_rate.png": ("lr", "learning rate", False),
}
PLOT_SIZE_IN, PLOT_DPI = (8.0, 5.0), 100  # 800 x 500 pixels
CARD_FILE, SUMMARY_FILE = "README.md", "summary.md"
CARD_MARKER = "<!-- model card written by domainlm; edit freely, `domainlm report` rewrites it -->"
LOGGERS = ("tensorboard", "mlflow", "wandb")
TENSORBOARD_DIR = "tensorboard"


# ----------------------------------------------------------------------------- reading runs


@dataclass
class RunData:
    """What a run folder says about itself."""

    path: Path
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.resolve().name

    def initial_perplexity(self) -> float | None:
        first = [e for e in self.evals if e["step"] == 0]
        return first[0]["eval_ppl"] if first else self.results.get("initial_perplexity")

    def final_perplexity(self) -> float | None:
        if "perplexity" in self.results:
            return self.results["perplexity"]
        return self.evals[-1]["eval_ppl"] if self.evals else None


def read_run(path: Path) -> RunData:
    """Metrics, configuration and results of a run folder; a clear error if it is not one."""
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{path}: not a training run (no metrics.jsonl in it)")
    events = read_events(metrics)
    run = RunData(
        path,
        train=[e for e in events if "loss" in e],
        evals=[e for e in events if "eval_ppl" in e],
    )
    for name, attr in (("run_config.json", "config"), ("eval_results.json", "results")):
        try:
            payload = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        setattr(run, attr, payload.get("config", {}) if attr == "config" else payload)
    return run


# ----------------------------------------------------------------------------- plots and table


def plot_runs(runs: list[RunData], output_dir: Path) -> list[Path]:
    """One PNG per curve (training loss, validation perplexity, learning rate), runs overlaid."""
    from domainlm.data.tokens import default_cache_dir

    # matplotlib's font cache goes beside the token cache, not into the user's home
    os.environ.setdefault("MPLCONFIGDIR", str(default_cache_dir() / "matplotlib"))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "note: matplotlib is not installed, no plots (pip install 'domainlm[plots]')",
            file=sys.stderr,
        )
        return []
    written = []
    output_dir.mkdir(parents=True, exist_ok=True)
    for filename, (key, label, log_scale) in PLOTS.items():
        fig, ax = plt.subplots(figsize=PLOT_SIZE_IN, dpi=PLOT_DPI)
        for run in runs:
            events = run.evals if key == "eval_ppl" else run.train
            points = [(e["step"], e[key]) for e in events if _finite(e.get(key))]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker="o" if len(points) < 30 else None, label=run.name)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(label + " by step")
        if log_scale:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a run whose values are all NaN draws nothing
            ax.legend()
        fig.tight_layout()
        target = output_dir / filename
        fig.savefig(target, dpi=PLOT_DPI)
        plt.close(fig)
        written.append(target)
    return written


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def summary_table(runs: list[RunData]) -> str:
    """A Markdown table: one row per run."""
    head = (
        "| run | model | steps | train tokens | last loss | perplexity before | perplexity after "
        "| best perplexity (step) | runtime |"
    )
    rows = [head, "|" + "---|" * 9]
    for run in runs:
        best = min(run.evals, key=lambda e: e["eval_ppl"], default=None)
        runtime = run.results.get("train_runtime")
        rows.append(
            "| "
            + " | ".join(
                [
                    run.name,
                    str(run.config.get("model", "?")),
                    str(run.train[-1]["step"] if run.train else 0),
                    f"{run.results['train_tokens']:,}" if "train_tokens" in run.results else "?",
                    f"{run.train[-1]['loss']:.4f}" if run.train else "?",
                    _fmt(run.initial_perplexity()),
                    _fmt(run.final_perplexity()),
                    f"{best['eval_ppl']:.3f} ({best['step']})" if best else "?",
                    f"{runtime:.0f}s" if runtime is not None else "?",
                ]
            )
            + " |"
        )
    return "\n".join(rows) + "\n"


def _fmt(value: float | None) -> str:
    return "?" if value is None else f"{value:.3f}"


# ----------------------------------------------------------------------------- model card


def data_summary(train_stream: Any, valid_stream: Any) -> dict[str, int]:
    """Document and token counts of the training and validation streams (for the model card)."""
    return {
        "train_documents": int(train_stream.num_documents),
        "train_tokens": int(train_stream.num_predicted),
        "validation_documents": int(valid_stream.num_documents),
        "validation_tokens": int(valid_stream.num_predicted),
    }


def model_card(run: RunData, data: dict[str, Any] | None = None) -> str:
    """README.md of a model folder (Hugging Face convention: YAML front matter, then Markdown)."""
    import yaml

    base = str(run.config.get("model", "unknown"))
    meta = card_front_matter(run, base, data)
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", CARD_MARKER, ""]
    lines += [f"# {run.name}", ""]
    lines += [f"A causal language model fine-tuned from `{base}` with domainlm.", ""]
    lines += card_data_section(run, data)
    lines += card_training_section(run.config)
    lines += card_results_section(run)
    lines += [
        "",
        "## Use",
        "",
        "```",
        f'domainlm generate --model {run.path} --prompt "..."',
        "# does it recite its training data?",
        f'domainlm generate --model {run.path} --prompt "..." --check-memorization',
        "```",
        "",
    ]
    return "\n".join(lines)


def card_front_matter(run: RunData, base: str, data: dict[str, Any] | None) -> dict[str, Any]:
    """The card's YAML metadata: tags, the hub base model, the perplexity as a model-index."""
    config, after = run.config, run.final_perplexity()
    hub_base = not base.startswith(("scratch:", "/", ".", "~")) and not Path(base).exists()
    meta: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["domainlm", "causal-lm", "fine-tuned"],
    }
    if hub_base:
        meta["base_model"] = base
    if after is not None:
        dataset = Path(str(config.get("validation_file") or config.get("train_file", "data")))
        meta["model-index"] = [
            {
                "name": run.name,
                "results": [
                    {
                        "task": {"type": "text-generation", "name": "Causal language modeling"},
                        "dataset": {"name": dataset.name, "type": "text"},
                        "metrics": [
                            {
                                "type": "perplexity",
                                "value": round(after, 4),
                                "name": "Validation perplexity",
                            }
                        ],
                    }
                ],
            }
        ]
    if data:
        meta["domainlm_data"] = data
    return meta


def card_data_section(run: RunData, data: dict[str, Any] | None) -> list[str]:
    config = run.config
    lines = ["## Data", ""]
    lines.append(f"- training file: `{config.get('train_file', '?')}`")
    if config.get("validation_file"):
        lines.append(f"- validation file: `{config['validation_file']}`")
    elif config:
        share = config.get("validation_split", 0.05)
        lines.append(f"- validation: {share:.0%} of the training documents held out (seeded)")
    if data:
        lines.append(
            f"- {data['train_documents']:,} training documents ({data['train_tokens']:,} tokens), "
            f"{data['validation_documents']:,} validation documents "
            f"({data['validation_tokens']:,} tokens)"
        )
    if "train_tokens" in run.results:
        lines.append(f"- tokens trained on (all epochs): {run.results['train_tokens']:,}")
    return lines


CARD_SETTINGS = (
    "block_size",
    "batch_size",
    "grad_accum",
    "epochs",
    "max_steps",
    "lr",
    "scheduler",
    "warmup_steps",
    "min_lr_ratio",
    "weight_decay",
    "max_grad_norm",
    "precision",
    "packing",
    "seed",
)


def card_training_section(config: dict[str, Any]) -> list[str]:
    lines = ["", "## Training hyperparameters", "", "| setting | value |", "|---|---|"]
    lines += [f"| {key} | {config[key]} |" for key in CARD_SETTINGS if key in config]
    return lines


def card_results_section(run: RunData) -> list[str]:
    before, after = run.initial_perplexity(), run.final_perplexity()
    lines = ["", "## Results", ""]
    if after is not None:
        change = f"{before:.3f} before training, {after:.3f} after" if before else f"{after:.3f}"
        tokens = run.results.get("eval_tokens")
        lines.append(
            f"Validation perplexity: {change}"
            + (f" ({tokens:,} tokens, every token scored once)." if tokens else ".")
        )
    lines += ["", summary_table([run]).rstrip(), ""]
    for filename in PLOTS:
        if (run.path / filename).is_file():
            lines.append(f"![{filename[:-4].replace('_', ' ')}]({filename})")
    return lines


def card_data(folder: Path) -> dict[str, Any] | None:
    """The data summary saved in an earlier model card of `folder` (front matter), if any."""
    import yaml

    path = folder / CARD_FILE
    if not path.is_file():
        return None
    parts = path.read_text(encoding="utf-8").split("---\n")
    if len(parts) < 3:
        return None
    try:
        meta = yaml.safe_load(parts[1]) or {}
    except yaml.YAMLError:
        return None
    return meta.get("domainlm_data") if isinstance(meta, dict) else None


def write_model_card(run: RunData, data: dict[str, Any] | None = None) -> Path | None:
    """Write README.md in the run folder, unless a README.md that domainlm did not write is there."""
    target = run.path / CARD_FILE
    if target.is_file() and CARD_MARKER not in target.read_text(encoding="utf-8"):
        print(
            f"note: {target} was not written by domainlm; the model card is not written",
            file=sys.stderr,
        )
        return None
    target.write_text(model_card(run, data or card_data(run.path)), encoding="utf-8")
    return target


# ----------------------------------------------------------------------------- entry points


def write_run_report(output_dir: Path, data: dict[str, Any] | None = None) -> list[Path]:
    """End of training (rank 0): the plots and the model card in the run folder."""
    run = read_run(output_dir)
    written = plot_runs([run], output_dir)
    card = write_model_card(run, data)
    return written + ([card] if card else [])


def run_report(run_dirs: list[Path], output: Path | None = None) -> list[Path]:
    """`domainlm report`: plots and summary of one or more runs; a single run's card refreshed."""
    runs = [read_run(path) for path in run_dirs]  # all checked before anything is written
    if output is None:
        output = run_dirs[0] if len(run_dirs) == 1 else Path("report")
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; give a folder")
    output.mkdir(parents=True, exist_ok=True)
    written = plot_runs(runs, output)
    table = summary_table(runs)
    (output / SUMMARY_FILE).write_text("# Runs\n\n" + table, encoding="utf-8")
    written.append(output / SUMMARY_FILE)
    if len(runs) == 1 and output.resolve() == runs[0].path.resolve():
        card = write_model_card(runs[0])
        written += [card] if card else []
    print(table, end="")
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return written


# ----------------------------------------------------------------------------- loggers


def check_report_to(names: list[str] | None) -> None:
    """--report-to: known names, each installed; checked before a run writes anything."""
    for name in names or []:
        if name not in LOGGERS:
            raise UserError(f"--report-to {name}: choose from {', '.join(LOGGERS)}")
        if not _installed(name):
            raise UserError(f"--report-to {name}: {name} is not installed (pip install {name})")


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def tensorboard_enabled(names: list[str] | None) -> bool:
    """TensorBoard event files are written whenever tensorboard is installed."""
    return _installed("tensorboard")


def owned_outputs(config: Any) -> list[str]:
    """Names in the output folder written by sampling and loggers (run_config.json `written`)."""
    from domainlm.text.generate import SAMPLES_FILE

    names = [SAMPLES_FILE] if config.sample_prompts else []
    if tensorboard_enabled(config.report_to):
        names.append(TENSORBOARD_DIR)
    if "wandb" in (config.report_to or []):
        names.append("wandb")
    return names


class EventLoggers:
    """Forwards metrics.jsonl events to TensorBoard, MLflow and W&B (rank 0; opened on first use)."""

    def __init__(
        self, names: list[str] | None, output_dir: Path, config: dict[str, Any], start_step: int
    ) -> None:
        self.names = list(names or [])
        if tensorboard_enabled(self.names) and "tensorboard" not in self.names:
            self.names.append("tensorboard")
        self.output_dir, self.config, self.start_step = output_dir, config, start_step
        self._tb: Any = None
        self._mlflow: Any = None
        self._wandb: Any = None
        self._opened = False

    def _open(self) -> None:
        self._opened = True
        name = self.output_dir.resolve().name
        if "tensorboard" in self.names:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a crashed run wrote after the checkpoint it resumes from
            self._tb = SummaryWriter(
                str(self.output_dir / TENSORBOARD_DIR),
                purge_step=self.start_step + 1 if self.start_step else None,
            )
        if "mlflow" in self.names:
            import mlflow

            self._mlflow = mlflow
            mlflow.start_run(run_name=name)
            mlflow.log_params({k: str(v)[:250] for k, v in self.config.items()})
        if "wandb" in self.names:
            import wandb

            self._wandb = wandb.init(
                project="domainlm", name=name, config=self.config, dir=str(self.output_dir)
            )

    def log(self, event: dict[str, Any]) -> None:
        """One metrics event: {step, loss, lr, tokens_per_s} or {step, eval_loss, eval_ppl, ...}."""
        if not self.names:
            return
        if not self._opened:
            self._open()
        step = int(event["step"])
        values = {
            f"{'eval' if 'eval_ppl' in event else 'train'}/{k}": float(v)
            for k, v in event.items()
            if k not in ("step", "epoch") and _finite(v)
        }
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._mlflow is not None:
            self._mlflow.log_metrics({k.replace("/", "_"): v for k, v in values.items()}, step=step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._mlflow is not None:
            self._mlflow.end_run()
        if self._wandb is not None:
            self._wandb.finish()
        self._tb = self._mlflow = self._wandb = None
