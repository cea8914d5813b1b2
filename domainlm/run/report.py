"""Run reports: plots of loss, perplexity and learning rate; a summary table; the model card;
report.html (the trackers of --report-to: run/trackers.py).

Everything is read back from what a run writes (metrics.jsonl, eval_results.json,
run_config.json, samples.jsonl, the model card's front matter), so `domainlm report RUN_DIR ...`
gives the same report later, for several runs overlaid on one page. matplotlib is a dependency.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domainlm.config import (
    RUN_FILE,
    TRAINING_SETTINGS,
    check_writable_folder,
    setting_shown,
    valid_history,
)
from domainlm.errors import UserError
from domainlm.run.checkpoint import (
    EVAL_RESULTS_FILE,
    MARKER,
    REPORT_FILE,
    SUMMARY_FILE,
    written_by_a_report,
)
from domainlm.run.metrics import initial_perplexity, read_events, scored

# file -> what it shows (the model card and report.html list them in this order)
PLOTS = {
    "training_loss.png": "training and validation loss",
    "validation_perplexity.png": "validation perplexity",
    "learning_rate.png": "learning rate",
}
PLOT_SIZE_IN, PLOT_DPI = (8.0, 5.0), 100  # 800 x 500 pixels
CARD_FILE = "README.md"
CARD_MARKER = "<!-- model card written by domainlm"  # how a card of ours starts its marker line
# The marker line of a card: the digest of the rest of the file tells an edited card (kept).
CARD_SIGNED = re.compile(r"<!-- model card written by domainlm \(sha256 ([0-9a-f]{16}) .*-->")
CARD_MARKER_LINE = (
    CARD_MARKER + " (sha256 {digest} of the rest of this file); `domainlm report` rewrites it "
    "until it is edited, then keeps it -->"
)


# ----------------------------------------------------------------------------- reading runs


@dataclass
class RunData:
    """What a run folder says about itself."""

    path: Path
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]  # the compared series (cut by --max-eval-tokens, if given)
    config: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # settings changed on resume
    finished: bool = False  # run_config.json records the final model written
    lora: dict[str, Any] | None = None  # the LoRA settings of a LoRA run (its identity's)
    precision: str | None = None  # what --precision resolved to (run files since 2026-12-07)
    block_size: int | None = None  # the block size the run trained at (its identity's)
    whole_evals: list[dict[str, Any]] = field(default_factory=list)  # beside a cut evaluation
    label: str = ""  # the name among other runs of a report, where folder names repeat

    @property
    def name(self) -> str:
        return self.label or self.path.resolve().name

    def ended(self) -> bool:
        """The run finished (an older run: its results file says so)."""
        return self.finished or "perplexity" in self.results

    def latest_validation(self) -> str | None:
        """The fingerprint of the data the latest evaluation scored (None: not recorded)."""
        return self.evals[-1].get("validation") if self.evals else None

    def comparable_evals(self) -> list[dict[str, Any]]:
        """The evaluations that scored the latest one's validation data (a run resumed on an
        edited file has figures of two data sets: the earlier ones compare with none of these;
        an evaluation from before events recorded their data counts)."""
        return [e for e in self.evals if scored(e, self.latest_validation())]

    def step_reached(self) -> int:
        """The last step trained: the last one logged, or a newer checkpoint's (a run stopped
        between logging steps saves one at the step it stopped after)."""
        from domainlm.run.checkpoint import list_checkpoints

        logged = self.train[-1]["step"] if self.train else 0
        return max([logged, *(c.step for c in list_checkpoints(self.path))])

    def initial_perplexity(self) -> float | None:
        """The figure before training that `final_perplexity` compares with: a finished run's
        whole-set one, else the first of the evaluations the latest is one of (with
        --max-eval-tokens, both cut; none where the step-0 one scored other validation data
        or another cut of it)."""
        if "perplexity" in self.results:
            logged = initial_perplexity(self.whole_evals + self.evals)
            return self.results.get("initial_perplexity", logged)
        if not self.evals:
            return None
        tokens = self.evals[-1]["eval_tokens"]
        first = [
            e for e in self.comparable_evals() if e["step"] == 0 and e["eval_tokens"] == tokens
        ]
        return first[0]["eval_ppl"] if first else None

    def final_perplexity(self) -> float | None:
        """The finished run's figure, else the latest validation after some training (a run
        stopped early); None when only the step-0 validation is there (nothing trained yet)."""
        if "perplexity" in self.results:
            return self.results["perplexity"]
        trained = [e for e in self.evals if e["step"] > 0]
        return trained[-1]["eval_ppl"] if trained else None


def read_run(path: Path) -> RunData:
    """Metrics, configuration and results of a run folder; a clear error if it is not one."""
    metrics = path / "metrics.jsonl"
    if not path.exists():
        raise UserError(f"{path}: no such folder; give a run's --output-dir")
    if not path.is_dir():
        raise UserError(f"{path}: a file, not a folder; give the run's --output-dir")
    if not metrics.is_file():
        if (path.parent / metrics.name).is_file() and (path / MARKER).is_file():
            raise UserError(
                f"{path}: a checkpoint of the run in {path.parent}; give the run's folder"
            )
        if (path / RUN_FILE).is_file():
            raise UserError(
                f"{path}: a training run without its metrics.jsonl (moved or deleted?), which "
                "the report is drawn from; put it back, or leave this run out"
            )
        raise UserError(f"{path}: not a training run (no metrics.jsonl in it)")
    events = read_events(metrics)
    run = RunData(
        path,
        train=[e for e in events if "loss" in e],
        evals=[e for e in events if "eval_ppl" in e],
        whole_evals=[e for e in events if "eval_whole_ppl" in e],
    )
    for name, attr in (("run_config.json", "config"), (EVAL_RESULTS_FILE, "results")):
        try:
            payload = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(payload, dict):  # not a file domainlm wrote
            continue
        setattr(run, attr, payload.get("config", {}) if attr == "config" else payload)
        if attr == "config":
            run.history = valid_history(payload.get("history"))
            run.finished = bool(payload.get("finished"))
            identity = payload.get("identity")
            lora = identity.get("lora") if isinstance(identity, dict) else None
            run.lora = lora if isinstance(lora, dict) else None
            block = identity.get("block_size") if isinstance(identity, dict) else None
            run.block_size = block if isinstance(block, int) else None
            precision = payload.get("precision")
            run.precision = precision if isinstance(precision, str) else None
    return run


# ----------------------------------------------------------------------------- plots and table


def plot_runs(runs: list[RunData], output_dir: Path) -> list[Path]:
    """One PNG per entry of PLOTS (see plot_figure), runs overlaid; [] with a note when
    matplotlib cannot be imported."""
    from domainlm.data.tokens import default_cache_dir

    # matplotlib's font cache goes beside the token cache, not into the user's home
    os.environ.setdefault("MPLCONFIGDIR", str(default_cache_dir() / "matplotlib"))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # a dependency since issue 16; only a broken install gets here
        print(
            "note: matplotlib cannot be imported, no plots (pip install matplotlib)",
            file=sys.stderr,
        )
        return []
    written = []
    output_dir.mkdir(parents=True, exist_ok=True)
    for filename in PLOTS:
        fig = plot_figure(filename, runs)
        target = output_dir / filename
        tmp = target.with_name(f".{filename}.tmp")  # replaced at once: a kill leaves no half PNG
        fig.savefig(tmp, dpi=PLOT_DPI, format="png")
        os.replace(tmp, target)
        plt.close(fig)
        written.append(target)
    return written


def run_colours(count: int) -> list[Any]:
    """A colour per run: matplotlib's 10 for up to 10 runs, tab20's 20 beyond (with 11 runs the
    first and the eleventh were one blue), repeating only past 20."""
    import matplotlib.pyplot as plt

    palette = list(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    if count > len(palette):
        palette = list(plt.get_cmap("tab20").colors)
    return [palette[index % len(palette)] for index in range(count)]


def plot_figure(filename: str, runs: list[RunData]) -> Any:
    """The matplotlib Figure of one entry of PLOTS, runs overlaid (one colour per run, in order).

    Loss in nats/token with the validation points marked (dots); validation perplexity, dots
    joined, on a log scale when it spans more than a decade; the learning rate. x is the
    optimizer step; for a single run whose token count is known, a top axis gives the training
    tokens (mean per step x step). A legend only when two or more curves are drawn (runs, or
    training and validation); a plot with nothing to draw says so instead.
    """
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=PLOT_SIZE_IN, dpi=PLOT_DPI)
    colours = run_colours(len(runs))
    drew = 0
    for index, run in enumerate(runs):
        colour = colours[index]
        prefix = f"{run.name}: " if len(runs) > 1 else ""
        if filename == "training_loss.png":
            drew += _line(ax, run.train, "loss", colour, prefix + "training")
            drew += _points(ax, run.evals, "eval_loss", colour, prefix + "validation")
        elif filename == "validation_perplexity.png":
            drew += _points(ax, run.evals, "eval_ppl", colour, run.name, joined=True)
        else:
            drew += _line(ax, run.train, "lr", colour, run.name)
    ylabel = {
        "training_loss.png": "loss (nats/token)",
        "validation_perplexity.png": "perplexity",
        "learning_rate.png": "learning rate",
    }[filename]
    ax.set_title(PLOTS[filename].capitalize() + (f" ({runs[0].name})" if len(runs) == 1 else ""))
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if filename == "validation_perplexity.png" and _spans_decades(runs):
        ax.set_yscale("log")
        ax.set_ylabel("perplexity (log scale)")
    if not drew:
        ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes)
    elif len(ax.get_legend_handles_labels()[0]) > 1:  # a legend only to tell curves apart
        ax.legend(loc="best")
    if len(runs) == 1 and drew:
        _tokens_axis(ax, runs[0])
    fig.tight_layout()
    return fig


def _line(ax: Any, events: list[dict[str, Any]], key: str, colour: str, label: str) -> int:
    """A line of the finite `key` values by step; 1 if anything was drawn."""
    points = [(e["step"], e[key]) for e in events if _finite(e.get(key))]
    if not points:
        return 0
    steps, values = zip(*points, strict=True)
    ax.plot(steps, values, color=colour, marker="." if len(points) < 30 else None, label=label)
    return 1


def _points(
    ax: Any, events: list[dict[str, Any]], key: str, colour: str, label: str, joined: bool = False
) -> int:
    """Validation points, marked (white-edged dots), optionally joined by a thin line."""
    points = [(e["step"], e[key]) for e in events if _finite(e.get(key))]
    if not points:
        return 0
    steps, values = zip(*points, strict=True)
    ax.plot(
        steps,
        values,
        color=colour,
        linestyle="-" if joined else "none",
        linewidth=1.2,
        marker="o",
        markersize=7,
        markeredgecolor="white",
        label=label,
        zorder=3,
    )
    return 1


def _spans_decades(runs: list[RunData]) -> bool:
    """Whether the validation perplexities span more than a factor of 10 (then: log scale)."""
    values = [e["eval_ppl"] for run in runs for e in run.evals if _finite(e.get("eval_ppl"))]
    values = [v for v in values if v > 0]
    return bool(values) and max(values) > 10 * min(values)


def _tokens_axis(ax: Any, run: RunData) -> None:
    """A top axis in training tokens: the run's token count spread evenly over its steps."""
    tokens, steps = run.results.get("train_tokens"), run.train[-1]["step"] if run.train else 0
    if not (isinstance(tokens, int | float) and tokens > 0 and steps > 0):
        return
    from matplotlib.ticker import EngFormatter

    per_step = tokens / steps
    top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda t: t / per_step))
    top.set_xlabel("training tokens (mean per step \u00d7 step)")
    top.xaxis.set_major_formatter(EngFormatter(sep=""))  # 7k, 1.2M: not 1e8 offsets
    ax.set_title(ax.get_title(), pad=12)  # above the top axis's label, not on it


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


SUMMARY_COLUMNS = [
    "run",
    "model",
    "steps",
    "train tokens",
    "last loss",
    "perplexity before",
    "perplexity after",
    "best perplexity (step)",
    "runtime",
]


def summary_rows(runs: list[RunData]) -> list[list[str]]:
    """One row of SUMMARY_COLUMNS per run, as text ("?" where the run does not say)."""
    rows = []
    for run in runs:
        evals = run.comparable_evals()
        trained = any(e["step"] > 0 for e in evals)  # step 0 alone is no best of a run
        best = min(evals, key=lambda e: e["eval_ppl"], default=None) if trained else None
        runtime = run.results.get("train_runtime")
        done = run.ended()
        steps = str(run.step_reached()) + ("" if done else " (not finished)")
        rows.append(
            [
                run.name,
                str(run.config.get("model", "?")),
                steps,
                f"{run.results['train_tokens']:,}" if "train_tokens" in run.results else "?",
                f"{run.train[-1]['loss']:.4f}" if run.train else "?",
                _fmt(run.initial_perplexity()),
                _fmt(run.final_perplexity()),
                best_shown(run, best),
                f"{runtime:.0f}s" if runtime is not None else "?",
            ]
        )
    return rows


def best_shown(run: RunData, best: dict[str, Any] | None) -> str:
    """The best evaluation of the run's series and its step; with the tokens it scored where
    --max-eval-tokens cut the series (then not the set "perplexity after" scores)."""
    if best is None:
        return "?"
    cut = run.config.get("max_eval_tokens") and isinstance(best.get("eval_tokens"), int)
    return f"{best['eval_ppl']:.3f} ({best['step']}" + (
        f", {best['eval_tokens']:,} tokens)" if cut else ")"
    )


def summary_table(runs: list[RunData]) -> str:
    """A Markdown table: one row per run."""
    rows = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    rows += ["| " + " | ".join(row) + " |" for row in summary_rows(runs)]
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
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---"]
    marker_at = len(lines)
    lines += [""]
    lines += [f"# {run.name}", ""]
    lines += [card_opening(run, base), ""]
    lines += card_data_section(run, data)
    stride = run.block_size - 1 if run.block_size else None  # --eval-stride's default
    resolved = {"precision": run.precision, "block_size": run.block_size, "eval_stride": stride}
    lines += card_training_section(run.config, run.history, resolved)
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
    digest = card_digest("\n".join(lines))
    return "\n".join(
        [*lines[:marker_at], CARD_MARKER_LINE.format(digest=digest), *lines[marker_at:]]
    )


def card_digest(rest: str) -> str:
    """The digest a card's marker line holds: of the file without that line."""
    return hashlib.sha256(rest.encode("utf-8")).hexdigest()[:16]


def card_edited(text: str) -> bool:
    """A card of ours whose text is no longer what its marker line's digest says (edited by
    hand); False for a card without a digest (written by domainlm before 2026-12-07)."""
    lines = text.split("\n")
    for index, line in enumerate(lines):
        signed = CARD_SIGNED.fullmatch(line)
        if signed:
            return card_digest("\n".join(lines[:index] + lines[index + 1 :])) != signed.group(1)
    return False


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


def card_opening(run: RunData, base: str) -> str:
    """What the folder is: a fine-tuned model, or a LoRA adapter (its settings, how it loads,
    where its merged model is)."""
    if run.lora is None:
        return f"A causal language model fine-tuned from `{base}` with domainlm."
    from domainlm.model.lora import MERGED_DIR

    lora = run.lora
    targets = ", ".join(f"`{t}`" for t in lora.get("targets") or [])
    merged = (
        "`merged/` holds it merged into its base: a plain model folder"
        if (run.path / MERGED_DIR / "config.json").is_file()
        else f"`domainlm export {run.path} OUT` merges it into its base"
    )
    return (
        f"A LoRA adapter for `{base}` trained with domainlm (r={lora.get('r')}, "
        f"alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, on {targets}): this folder "
        f"is the adapter in PEFT's format (`PeftModel.from_pretrained`); {merged}."
    )


def card_training_section(
    config: dict[str, Any], history: list[dict[str, Any]], resolved: dict[str, Any] | None = None
) -> list[str]:
    """The settings table (the last command's values; beside one left to domainlm, what it
    resolved to: `resolved`, e.g. precision auto (bf16), block_size auto (1024)), then the
    changes made on resume."""
    lines = ["", "## Training hyperparameters", "", "| setting | value |", "|---|---|"]
    for key in TRAINING_SETTINGS:
        if key in config:
            value, took = config[key], (resolved or {}).get(key)
            shown = "auto" if value is None and took is not None else value
            lines.append(
                f"| {key} | {shown} ({took}) |"
                if took and took != value
                else f"| {key} | {value} |"
            )
    if history:
        lines += [
            "",
            "The run was resumed with other settings (the table shows the last ones):",
            "",
        ]
        lines += [f"- {line}" for line in history_lines(history)]
    return lines


def history_lines(history: list[dict[str, Any]]) -> list[str]:
    """One line per resume that changed settings (run_config.json's history): "from step 500:
    lr 5e-05 -> 0.0001"."""
    lines = []
    for entry in history:
        changed = entry["changed"]
        order = {key: index for index, key in enumerate(TRAINING_SETTINGS)}
        keys = sorted(changed, key=lambda key: order.get(key, len(order)))  # the table's order
        pairs = ", ".join(
            f"{key} {setting_shown(changed[key][0])} -> {setting_shown(changed[key][1])}"
            for key in keys
        )
        lines.append(f"from step {entry['step']}: {pairs}")
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
    notes = result_notes(run)
    if notes:
        lines += ["", *notes]
    lines += ["", summary_table([run]).rstrip(), ""]
    for filename in PLOTS:
        if (run.path / filename).is_file():
            lines.append(f"![{filename[:-4].replace('_', ' ')}]({filename})")
    return lines


def result_notes(run: RunData) -> list[str]:
    """What eval_results.json says about where the run stopped and whose weights the model
    holds, as sentences (the card and report.html show them)."""
    notes = []
    stopped, chosen = run.results.get("stopped_early"), run.results.get("model_checkpoint")
    if isinstance(stopped, dict):
        notes.append(
            f"Training stopped early at step {stopped.get('step')} of {stopped.get('of_steps')}: "
            "the validation perplexity had stopped falling (--early-stopping-patience)."
        )
    if isinstance(chosen, dict):
        notes.append(
            f"The model is checkpoint-{chosen.get('step')}'s, the lowest validation perplexity "
            f"of the run (--load-best-model-at-end; the last step's was "
            f"{_fmt(chosen.get('last_step_perplexity'))})."
        )
    return notes


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
    """Write README.md in the run folder, unless a README.md that domainlm did not write, or one
    of ours edited since (`card_edited`), is there: those are kept."""
    target = run.path / CARD_FILE
    text = target.read_text(encoding="utf-8") if target.is_file() else None
    if text is not None and CARD_MARKER not in text:
        print(
            f"note: {target} was not written by domainlm; the model card is not written",
            file=sys.stderr,
        )
        return None
    if text is not None and card_edited(text):
        print(
            f"note: {target} was edited since domainlm wrote it; kept as it is (move it away to "
            "have the card written again)",
            file=sys.stderr,
        )
        return None
    tmp = target.with_name(f".{CARD_FILE}.tmp")  # replaced at once: a kill leaves no empty card
    tmp.write_text(model_card(run, data or card_data(run.path)), encoding="utf-8")
    os.replace(tmp, target)
    return target


# ----------------------------------------------------------------------------- report.html

MAX_SAMPLES_SHOWN = 200  # samples.jsonl rows on the page (the file keeps them all)
# No scripts, no fetches: only inline styles and data: images may load. The page is
# self-contained, and text that slipped past escaping still could not run.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
       max-width: 1100px; margin: 1.5em auto; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ccc;
        padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.differs td { background: #fff6d5; }
.plots img { width: 100%; max-width: 800px; display: block; margin: .6em 0; border: 1px solid #eee; }
.big { font-size: 1.25em; } .warn li { color: #8a4b00; } .muted { color: #777; }
pre { white-space: pre-wrap; word-break: break-word; margin: 0; font-size: .92em; }
"""


def _e(value: Any) -> str:
    """Any value as HTML-escaped text (quotes too): every user string on the page goes here."""
    return html.escape(str(value), quote=True)


def _table(
    head: list[str] | None, rows: list[list[str]], row_classes: list[str] | None = None
) -> str:
    """An HTML table of plain-text cells (escaped here); no header row when `head` is None."""
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>")
    for index, row in enumerate(rows):
        cls = f' class="{row_classes[index]}"' if row_classes and row_classes[index] else ""
        cells = "".join(f"<td><pre>{_e(cell)}</pre></td>" for cell in row)
        out.append(f"<tr{cls}>{cells}</tr>")
    return "\n".join(out + ["</table>"])


def _list(items: list[str]) -> str:
    """An HTML bullet list of plain-text items (escaped here)."""
    return "<ul>" + "".join(f"<li>{_e(item)}</li>" for item in items) + "</ul>"


def _plot_images(plots: list[Path]) -> str:
    """The PNGs inline as data: URLs (the page needs no other file)."""
    parts = ['<div class="plots">']
    for path in plots:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        alt = PLOTS.get(path.name, path.stem)
        parts.append(f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">')
    if len(parts) == 1:
        parts.append('<p class="muted">No plots (matplotlib could not be imported).</p>')
    return "\n".join(parts + ["</div>"])


def read_samples(run: RunData) -> list[dict[str, Any]]:
    """The run's samples.jsonl records ({step, prompt, text}); [] when it has none."""
    from domainlm.text.generate import SAMPLES_FILE

    path = run.path / SAMPLES_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a crash
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _run_details(
    run: RunData, data: dict[str, Any] | None, heading: str, plots: str = "", settings: bool = True
) -> str:
    """A run's sections: results, best checkpoint, `plots` (HTML), data, lint warnings,
    samples, settings."""
    from domainlm.run.checkpoint import best_checkpoint, list_checkpoints

    out = [heading]
    before, after = run.initial_perplexity(), run.final_perplexity()
    tokens = run.results.get("eval_tokens")
    done = run.ended()
    trained = [e["step"] for e in run.evals if e["step"] > 0]
    where = "after" if done else (f"at step {trained[-1]} (not finished)" if trained else "after")
    figure = f"<b>{_e(_fmt(after))}</b> {_e(where)}"
    out.append(
        '<p class="big">Validation perplexity: '
        + (f"<b>{_e(_fmt(before))}</b> before training &rarr; {figure}" if before else figure)
        + (f" ({_e(f'{tokens:,}')} tokens, every token scored once)" if tokens else "")
        + "</p>"
    )
    best = best_checkpoint(list_checkpoints(run.path), run.latest_validation())
    cut = [e["eval_tokens"] for e in run.evals if best and e["step"] == best.step]
    on = (
        f" on {cut[0]:,} tokens (--max-eval-tokens)"
        if run.config.get("max_eval_tokens") and cut
        else ""
    )
    out.append(
        f"<p>Best checkpoint: <code>{_e(best.path.name)}</code> (step {best.step}, validation "
        f"perplexity {_e(_fmt(best.eval_perplexity))}{_e(on)})</p>"
        if best
        else '<p class="muted">Best checkpoint: none kept with a validation perplexity.</p>'
    )
    out += [f"<p>{_e(note)}</p>" for note in result_notes(run)]
    out.append(plots)
    out.append("<h3>Data</h3>")
    rows = [["training file", str(run.config.get("train_file", "?"))]]
    if run.config.get("validation_file"):
        rows.append(["validation file", str(run.config["validation_file"])])
    elif run.config:
        share = run.config.get("validation_split", 0.05)
        rows.append(["validation", f"{share:.0%} of the training documents held out (seeded)"])
    for key in ("train_documents", "train_tokens", "validation_documents", "validation_tokens"):
        if data and isinstance(data.get(key), int):
            rows.append([key.replace("_", " "), f"{data[key]:,}"])
    if "train_tokens" in run.results:
        rows.append(["tokens trained on (all epochs)", f"{run.results['train_tokens']:,}"])
    out.append(_table(None, rows))
    warnings = (data or {}).get("lint_warnings")
    out.append("<h3>Data lint warnings</h3>")
    if warnings is None:
        out.append('<p class="muted">Not recorded for this run.</p>')
    elif warnings:
        out.append('<ul class="warn">' + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul>")
    else:
        out.append("<p>None.</p>")
    samples = read_samples(run)
    if samples:
        out.append(f"<h3>Samples while training ({len(samples)})</h3>")
        shown = samples[-MAX_SAMPLES_SHOWN:]
        if len(shown) < len(samples):
            out.append(f'<p class="muted">The last {len(shown)}; all in samples.jsonl.</p>')
        rows = [
            [str(r.get("step", "?")), str(r.get("prompt", "")), str(r.get("text", ""))]
            for r in shown
        ]
        out.append(_table(["step", "prompt", "text"], rows))
    if not settings:  # several runs: their settings are in one table, side by side
        return "\n".join(out)
    out.append("<h3>Settings (run_config.json)</h3>")
    if run.config:
        out.append(_table(["setting", "value"], [[k, _setting(v)] for k, v in run.config.items()]))
        if run.history:
            out.append("<p>Resumed with other settings (the table shows the last ones):</p>")
            out.append(_list(history_lines(run.history)))
    else:
        out.append('<p class="muted">No run_config.json.</p>')
    return "\n".join(out)


def _setting(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _settings_compared(runs: list[RunData]) -> str:
    """One row per setting, one column per run; rows whose values differ are highlighted."""
    keys = list(dict.fromkeys(k for run in runs for k in run.config))
    rows, classes = [], []
    for key in keys:
        values = [_setting(run.config[key]) if key in run.config else "" for run in runs]
        rows.append([key, *values])
        classes.append("differs" if len(set(values)) > 1 else "")
    return _table(["setting", *[run.name for run in runs]], rows, classes)


def html_report(
    runs: list[RunData], plots: list[Path], data: list[dict[str, Any] | None] | None = None
) -> str:
    """report.html: one self-contained page (inline CSS, PNGs as data: URLs, no scripts).

    One run: its results, plots, data summary, lint warnings, samples and settings. Several:
    a summary table, the overlaid plots, the settings side by side, then each run's details.
    `data[i]` is run i's data summary (data_summary() plus "lint_warnings"), or None.
    """
    data = data or [None] * len(runs)
    title = runs[0].name if len(runs) == 1 else f"{len(runs)} runs compared"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)} \N{EN DASH} domainlm report</title>",
        f"<style>{STYLE}</style>",
        "</head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="muted">domainlm report of {", ".join(_e(run.path) for run in runs)}</p>',
    ]
    if len(runs) == 1:
        out.append(_run_details(runs[0], data[0], "", _plot_images(plots)))
        out += ["<h2>Summary</h2>", _table(SUMMARY_COLUMNS, summary_rows(runs))]
    else:
        out += ["<h2>Summary</h2>", _table(SUMMARY_COLUMNS, summary_rows(runs))]
        out += ["<h2>Curves</h2>", _plot_images(plots)]
        out += ["<h2>Settings compared</h2>", _settings_compared(runs)]
        for run, summary in zip(runs, data, strict=True):
            heading = f"<h2>Run {_e(run.name)}</h2>"
            out.append(_run_details(run, summary, heading, settings=False))
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_html_report(
    runs: list[RunData],
    plots: list[Path],
    output_dir: Path,
    data: list[dict[str, Any] | None] | None = None,
) -> Path:
    """Write report.html into output_dir (replacing it atomically) and return its path."""
    target = output_dir / REPORT_FILE
    tmp = target.with_name(f".{REPORT_FILE}.tmp")
    tmp.write_text(html_report(runs, plots, data), encoding="utf-8")
    os.replace(tmp, target)
    return target


# ----------------------------------------------------------------------------- entry points


def write_run_report(
    output_dir: Path, data: dict[str, Any] | None = None, lint_warnings: list[str] | None = None
) -> list[Path]:
    """End of training (rank 0): the plots, the model card and report.html in the run folder.

    The lint warnings go into the data summary, which the model card's front matter keeps, so
    a later `domainlm report` of this run shows them too.
    """
    run = read_run(output_dir)
    if data is not None and lint_warnings is not None:
        data = {**data, "lint_warnings": list(lint_warnings)}
    plots = plot_runs([run], output_dir)
    card = write_model_card(run, data)
    page = write_html_report([run], plots, output_dir, [data or card_data(run.path)])
    return plots + ([card] if card else []) + [page]


# The weights of a finished run's folder (a LoRA run's: the adapter).
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


def check_report_output(output: Path, runs: list[RunData]) -> None:
    """Before anything is written: `output` is not another training run's folder (its own
    report would be replaced), and every file the report writes there is absent or one a
    report wrote (a later report may replace those; any other file is the user's); nor a
    run's checkpoint folder, made or to be made (files of another's in it keep it past
    --save-total-limit, and a checkpoint-N folder the run did not write stops its resume)."""
    from domainlm.run.checkpoint import CHECKPOINT_PREFIX

    in_run = (output.parent / "run_config.json").is_file()
    if in_run and output.name.startswith(CHECKPOINT_PREFIX):
        raise UserError(
            f"--output {output} is a checkpoint folder of the run in {output.parent}: files "
            "there would be taken for the user's (kept past --save-total-limit, or refusing the "
            "run's resume); give a folder outside it, or the run's folder itself"
        )
    if not output.is_dir():
        return
    if (output / "run_config.json").is_file() and (
        len(runs) > 1 or output.resolve() != runs[0].path.resolve()
    ):
        whose = "a run's folder" if len(runs) > 1 else "another training run's folder"
        raise UserError(
            f"--output {output} is {whose}: its own report would be replaced"
            + (" by the comparison" if len(runs) > 1 else "")
            + "; give another folder"
        )
    for name in [*PLOTS, SUMMARY_FILE, REPORT_FILE]:
        path = output / name
        if path.exists() and not written_by_a_report(path):
            raise UserError(
                f"--output {output}: {name} there was not written by domainlm and would be "
                "replaced; give another folder"
            )


def label_runs(runs: list[RunData]) -> None:
    """Name each run by its folder's name, and where two runs' folders share it (exp_a/out,
    exp_b/out) by as many of their path's last parts as tell them apart."""
    parts = [run.path.resolve().parts for run in runs]
    depth = [1] * len(runs)
    while True:
        labels = ["/".join(p[-d:]) for p, d in zip(parts, depth, strict=True)]
        longer = False
        for label in set(labels):
            same = [i for i, other in enumerate(labels) if other == label]
            if len({parts[i] for i in same}) > 1:  # one folder given twice is one name
                for i in same:
                    if depth[i] < len(parts[i]):
                        depth[i], longer = depth[i] + 1, True
        if not longer:
            break
    for run, label in zip(runs, labels, strict=True):
        run.label = label


def run_report(run_dirs: list[Path], output: Path | None = None) -> list[Path]:
    """`domainlm report`: plots, summary.md and report.html of one or more runs (one page
    comparing them); a single run's card refreshed when the output is its own folder."""
    # one run named twice (`report a ./a`) is one run, not two rows and curves
    run_dirs = list({path.resolve(): path for path in run_dirs}.values())
    runs = [read_run(path) for path in run_dirs]  # all checked before anything is written
    if len(runs) > 1:
        label_runs(runs)
    if output is None:
        output = run_dirs[0] if len(run_dirs) == 1 else Path("report")
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; give a folder")
    check_report_output(output, runs)
    check_writable_folder(output, f"--output {output}")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"--output {output}: cannot make the folder ({exc.strerror or exc})"
        ) from exc
    plots = plot_runs(runs, output)
    table = summary_table(runs)
    (output / SUMMARY_FILE).write_text("# Runs\n\n" + table, encoding="utf-8")
    written = [*plots, output / SUMMARY_FILE]
    has_model = any((runs[0].path / name).is_file() for name in MODEL_FILES)
    if len(runs) == 1 and output.resolve() == runs[0].path.resolve() and has_model:
        card = write_model_card(runs[0])  # a card describes a model: none for a run stopped early
        written += [card] if card else []
    written.append(write_html_report(runs, plots, output, [card_data(run.path) for run in runs]))
    print(table, end="")
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return written
