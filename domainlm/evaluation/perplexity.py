"""`domainlm perplexity`: one number per model, defined in docs/perplexity.md, computed exactly.

The scoring itself is `windows.py`'s (the same windows that validation during training uses);
this module builds the token streams, adds the tokenizer-independent figures (bits per byte and
per character), scores each line on its own when asked, and formats the side-by-side table.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from domainlm.config import (
    DEFAULT_SEED,
    DEVICES,
    DOC_SEPARATORS,
    ENCODING_ERRORS,
    PRECISIONS,
    TEXT_COLUMN_HELP,
    check_device,
    check_seed,
    check_writable_folder,
    checkpoint_step,
    opt,
    read_run_settings,
    valid_history,
)
from domainlm.data.corpus import chunk_numbered_documents, iter_numbered_documents
from domainlm.data.tokens import token_dtype, tokenize_documents
from domainlm.errors import UserError
from domainlm.evaluation.windows import (
    NLLSum,
    Window,
    all_window_sums,
    check_window,
    make_windows,
    score_windows,
    stream_nll,
)
from domainlm.model.device import pick_device, resolve_precision
from domainlm.model.distributed import DistContext, setup_distributed, teardown_distributed
from domainlm.model.loading import LoadedModel
from domainlm.model.lora import load_any_model
from domainlm.model.loss import CausalLMLoss

CONVENTIONS = ("eos", "plain")
PER_LINE_SUFFIXES = (".jsonl", ".csv")
TEXT_SOURCE = "--text"


def is_within(path: Path, source: Path) -> bool:
    """Whether `path` is `source`, or a file inside the folder `source` (symbolic links
    followed): a file the scores must not overwrite."""
    target, source = path.resolve(), source.resolve()
    return target == source or (source.is_dir() and source in target.parents)


@dataclass
class PerplexityConfig:
    """Everything `domainlm perplexity` needs; `evaluate_perplexity(PerplexityConfig(...))` runs it."""

    model: list[str] = opt(
        None,
        "Model to score: hub id, local folder or scratch:NAME. Repeat for a side-by-side table.",
        required=True,
        repeatable=True,
    )
    file: str | None = opt(
        None,
        "Texts to score: .txt (one per line), .jsonl, .parquet or .csv (one per row, the "
        "--text-column), a datasets.save_to_disk folder, or a folder of files.",
    )
    text_column: str = opt("text", TEXT_COLUMN_HELP)
    text: str | None = opt(None, "A text to score instead of --file (each non-blank line a text).")
    doc_sep: str = opt(
        "line",
        "Texts are lines (line) or paragraphs separated by empty lines (blank), as in train.",
        choices=DOC_SEPARATORS,
    )
    block_size: int | None = opt(
        None, "Window length L in tokens fed to the model. Default: the model's context."
    )
    stride: int | None = opt(
        None, "Tokens S newly predicted per window, 1 <= S <= L-1. Default: L-1 (cheapest)."
    )
    batch_size: int = opt(8, "Windows per forward pass.")
    precision: str = opt(
        "fp32", "Compute precision (NLL is summed in float64 anyway).", choices=PRECISIONS
    )
    device: str | None = opt(
        None,
        "Where to compute: auto (this rank's GPU when PyTorch sees one, else the CPU), cpu, or "
        "cuda (an error without a GPU). Default: $DOMAINLM_DEVICE or auto.",
        choices=DEVICES,
    )
    convention: str = opt(
        "eos",
        "eos: every line ends with EOS and all its tokens are scored; plain: the text as the "
        "tokenizer encodes it with its own special tokens (a BOS; [CLS] ... [SEP] for a "
        "BERT-style one, whose [SEP] is then scored) and no EOS added, first token not scored "
        "(what model(ids, labels=ids) does).",
        choices=CONVENTIONS,
    )
    per_line: str | None = opt(
        None, "Also score each line on its own and write the scores to this .jsonl or .csv file."
    )
    worst: int | None = opt(None, "Print the K least likely lines (highest per-line perplexity).")
    seed: int = opt(
        DEFAULT_SEED,
        "Seed of a scratch:NAME preset's random weights; the default is train's, so "
        "`--model scratch:NAME` scores what a run with the default --seed starts from.",
    )
    encoding_errors: str = opt(
        "strict",
        "strict refuses invalid UTF-8 (with line numbers); replace goes on.",
        choices=ENCODING_ERRORS,
    )
    eos_token: str | None = opt(None, "Token that ends every line when the tokenizer has no EOS.")
    trust_remote_code: bool = opt(False, "Allow model code from the hub (only if you trust it).")
    quiet: bool = opt(False, "No progress bar.")

    def __post_init__(self) -> None:
        if isinstance(self.model, str):
            self.model = [self.model]
        if not self.model:
            raise UserError("--model is required")
        if (self.file is None) == (self.text is None):
            raise UserError("give exactly one of --file or --text")
        if self.text is not None and not self.text.strip():
            raise UserError("--text is empty")
        for name in ("block_size", "stride", "batch_size", "worst"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(
                    f"--{name.replace('_', '-')} must be a positive number, got {value}"
                )
        check_device(self.device)
        check_seed(self.seed)
        if self.block_size is not None:
            check_window(self.block_size, self.stride or self.block_size - 1)
        for name, choices in (
            ("precision", PRECISIONS),
            ("convention", CONVENTIONS),
            ("doc_sep", DOC_SEPARATORS),
            ("encoding_errors", ENCODING_ERRORS),
        ):
            if getattr(self, name) not in choices:
                raise UserError(
                    f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, "
                    f"got {getattr(self, name)!r}"
                )
        if self.per_line is not None:
            out = Path(self.per_line)
            if out.suffix not in PER_LINE_SUFFIXES:
                raise UserError(f"--per-line {out}: name a .jsonl or .csv file")
            if out.parent.is_file():
                raise UserError(
                    f"--per-line {out}: {out.parent} is a file, not a folder; name a file in a "
                    "folder"
                )
            if not out.parent.is_dir():
                raise UserError(f"--per-line {out}: the folder {out.parent} does not exist")
            if out.is_dir():
                raise UserError(f"--per-line {out}: is a folder, name a file")
            check_writable_folder(out.parent, f"--per-line {out}")
            if self.file is not None and is_within(out, Path(self.file)):
                raise UserError(
                    f"--per-line {out} is the text being scored (--file {self.file}): writing "
                    "the scores there would overwrite it; name another file"
                )
            if out.is_file() and not is_line_scores_file(out):
                raise UserError(
                    f"--per-line {out} exists and is not a per-line scores file written by "
                    "perplexity: it would be overwritten; name another file"
                )

    @property
    def scores_lines(self) -> bool:
        return self.per_line is not None or self.worst is not None


@dataclass
class LineScore(NLLSum):
    """One line scored on its own: `[EOS] tokens(d) EOS` or `BOS tokens(d) EOS`, the EOS or BOS
    in front unscored (plain: `tokens(d)`, first unscored)."""

    file: str = ""
    line: int = 0
    text: str = field(default="", repr=False)

    def record(self, model: str) -> dict[str, Any]:
        nll = self.nll if self.tokens else None
        ppl = self.perplexity if self.tokens else None
        return {"model": model, "file": self.file, "line": self.line, "tokens": self.tokens,
                "nll": nll, "perplexity": ppl}  # fmt: skip


@dataclass
class PerplexityReport:
    """The figures of one model on one text (`--json` prints `to_dict()`)."""

    model: str
    perplexity: float
    nll: float
    tokens: int
    bytes: int
    bits_per_byte: float
    bits_per_char: float
    block_size: int
    stride: int
    convention: str
    precision: str
    lines: list[LineScore] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "lines"
        }


@dataclass
class Corpus:
    """The texts to score, each with the file and line it came from."""

    documents: list[str]
    origins: list[tuple[str, int]]

    def plain_text(self) -> str:
        return "\n".join(self.documents)

    def size(self, convention: str) -> tuple[int, int]:
        """(UTF-8 bytes, Unicode characters): each line plus one for its end (eos), or the joined text."""
        if convention == "plain":
            text = self.plain_text()
            return len(text.encode("utf-8")), len(text)
        return (
            sum(len(d.encode("utf-8")) + 1 for d in self.documents),
            sum(len(d) + 1 for d in self.documents),
        )


# ----------------------------------------------------------------------------- the function


def evaluate_perplexity(config: PerplexityConfig) -> list[PerplexityReport]:
    """Score the text under each model in turn; under torchrun every rank scores its share.

    Everything is checked before anything is written; the per-line file (rank 0) comes last.
    """
    joined_here = not dist.is_initialized()
    ctx = setup_distributed(device=config.device)
    try:
        corpus = read_corpus(config)
        if len(config.model) > 1:
            check_models(config)
        device = pick_device(ctx.local_rank if ctx.enabled else None, config.device)
        precision = resolve_precision(config.precision, device)
        reports = [
            score_model(spec, corpus, config, ctx=ctx, device=device, precision=precision)
            for spec in config.model
        ]
        if config.per_line is not None and ctx.is_main:
            write_line_scores(Path(config.per_line), reports)
        return reports
    finally:
        if joined_here:
            teardown_distributed(ctx)


def check_models(config: PerplexityConfig) -> None:
    """Refuse any model's problem (no such folder or model, no config or tokenizer, a sharded
    checkpoint, a context shorter than --block-size) before the first model is scored: each
    read as its config and tokenizer, its shapes on the meta device, no weights read."""
    for spec in config.model:
        shapes = load_any_model(
            spec,
            seed=config.seed,
            eos_token=config.eos_token,
            trust_remote_code=config.trust_remote_code,
            weights=False,
        )
        block_size = shapes.block_size(config.block_size)
        check_window(block_size, config.stride or block_size - 1)


def settings_at_checkpoint(run: dict[str, Any], spec: str) -> tuple[dict[str, Any], Any]:
    """The settings (and resolved precision, where known) a run's checkpoint `spec` was trained
    and validated with: the run file's last ones, with the changes its history records from
    that checkpoint's step on undone (a resume changes what the steps after it use). For the run
    folder itself, its last ones."""
    settings, precision = dict(run.get("config") or {}), run.get("precision")
    step = checkpoint_step(Path(spec).expanduser().name)
    if step is None:
        return settings, precision
    for entry in reversed(valid_history(run.get("history"))):
        if entry["step"] >= step:
            for key, (before, _) in entry["changed"].items():
                settings[key] = before
                if key == "precision":  # the run file resolves only the last command's auto
                    precision = before if before in ("fp32", "bf16", "fp16") else None
    return settings, precision


def other_validation_note(spec: str, block_size: int, stride: int, precision: str) -> str | None:
    """A note when `spec` is a domainlm run (or one of its checkpoints) whose validation used
    another window, or a half precision (bf16/fp16: training's kernels and these round
    differently, so only fp32 figures agree exactly; run files record it since it was added):
    its eval_results.json figure is then not the one printed here."""
    found = read_run_settings(spec)
    try:
        run = found[1] if found else {}
        run_block = int(run["identity"]["block_size"])
        settings, run_precision = settings_at_checkpoint(run, spec)
        run_stride = int(settings.get("eval_stride") or run_block - 1)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None  # not a domainlm run
    reasons = []
    if (run_block, run_stride) != (block_size, stride):
        reasons.append(
            f"the run validated with --block-size {run_block} --stride {run_stride}, this scores "
            f"with --block-size {block_size} --stride {stride} (pass those to compare)"
        )
    if isinstance(run_precision, str) and (run_precision, precision) != ("fp32", "fp32"):
        reasons.append(
            f"the run validated in {run_precision}, this scores in {precision} (a half "
            "precision's rounding differs from one computation to another: the figures agree "
            "exactly when both are fp32, a run trained with --precision fp32)"
        )
    if not reasons:
        return None
    return f"note: {spec}: this figure is not the run's own: {'; '.join(reasons)}"


def read_corpus(config: PerplexityConfig) -> Corpus:
    """The texts of --file (or --text), each with where it starts, split as training splits them.

    The reader is training's (`corpus.iter_numbered_documents`: the same chunks, decoding and
    `--doc-sep` rules), so a file scored here is the documents that training read from it.
    """
    if config.text is not None:
        text = config.text.removeprefix("\ufeff")  # a byte-order mark, as a file's is dropped
        numbered = chunk_numbered_documents(Path(TEXT_SOURCE), 1, text, config.doc_sep)
        if not numbered:
            raise UserError("--text is empty")
        return Corpus([t for _, t in numbered], [(TEXT_SOURCE, n) for n, _ in numbered])
    documents: list[str] = []
    origins: list[tuple[str, int]] = []
    for file, number, doc in iter_numbered_documents(
        config.file, config.doc_sep, config.encoding_errors, config.text_column
    ):
        documents.append(doc)
        origins.append((str(file), number))
    if not documents:
        raise UserError(
            f"{config.file}: no text in it (the file is empty or holds only blank lines)"
        )
    return Corpus(documents, origins)


def score_model(
    spec: str,
    corpus: Corpus,
    config: PerplexityConfig,
    *,
    ctx: DistContext,
    device: torch.device,
    precision: str,
) -> PerplexityReport:
    """Load one model, check the window against its context, and score the stream (and lines)."""
    loaded = load_any_model(
        spec,
        seed=config.seed,
        eos_token=config.eos_token,
        trust_remote_code=config.trust_remote_code,
    )
    block_size = loaded.block_size(config.block_size)
    stride = config.stride or block_size - 1
    check_window(block_size, stride)
    if ctx.is_main:  # --quiet hides the progress bar, not this
        note = other_validation_note(spec, block_size, stride, precision)
        if note:
            print(note, file=sys.stderr)
    loss_module = CausalLMLoss(loaded.model.to(device))
    progress = ctx.is_main and not config.quiet
    tokens, unscored = stream_tokens(corpus, loaded, config.convention)
    if len(tokens) < 2:
        raise UserError("the text is a single token: there is nothing to predict")
    total = stream_nll(
        loss_module,
        tokens,
        block_size=block_size,
        stride=stride,
        batch_size=config.batch_size,
        device=device,
        precision=precision,
        ctx=ctx,
        progress=progress,
        unscored=unscored,
    )
    lines = None
    if config.scores_lines:
        lines = score_lines(
            loss_module, corpus, loaded, config.convention,
            block_size=block_size, stride=stride, batch_size=config.batch_size,
            device=device, precision=precision, ctx=ctx, progress=progress,
        )  # fmt: skip
    num_bytes, num_chars = corpus.size(config.convention)
    bits = total.nll_sum / math.log(2)
    report = PerplexityReport(
        model=spec,
        perplexity=total.perplexity,
        nll=total.nll,
        tokens=total.tokens,
        bytes=num_bytes,
        bits_per_byte=bits / num_bytes,
        bits_per_char=bits / num_chars,
        block_size=block_size,
        stride=stride,
        convention=config.convention,
        precision=precision,
        lines=lines,
    )
    del loss_module, loaded
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return report


def stream_tokens(
    corpus: Corpus, loaded: LoadedModel, convention: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """(tokens, context-only positions). eos: `[EOS] d1 EOS d2 EOS ...`, or `BOS d1 EOS BOS d2 EOS
    ...` for tokenizers that put a BOS before a text (its positions are returned: never scored);
    plain: the tokenizer's ids of the lines joined by newlines."""
    if convention == "plain":
        # Special tokens of the model's own convention (a BOS) are added; text stays text.
        ids = loaded.tokenizer(corpus.plain_text(), split_special_tokens=True)["input_ids"]
        return np.asarray(ids, dtype=np.int64), None
    dtype = token_dtype(len(loaded.tokenizer))
    stream = tokenize_documents(
        corpus.documents, loaded.tokenizer, loaded.eos_id, dtype, loaded.document_prefix
    )
    return stream.tokens, stream.unscored_positions()


def line_token_lists(corpus: Corpus, loaded: LoadedModel, convention: str) -> list[np.ndarray]:
    """Each line as its own stream: `[EOS] tokens(d) EOS` (`BOS tokens(d) EOS` for tokenizers
    with a BOS), or plain `tokens(d)`; the first `first_scored(loaded, convention)` are context."""
    if convention == "plain":
        ids = loaded.tokenizer(list(corpus.documents), split_special_tokens=True)["input_ids"]
        return [np.asarray(line, dtype=np.int64) for line in ids]
    dtype = token_dtype(len(loaded.tokenizer))
    stream = tokenize_documents(
        corpus.documents, loaded.tokenizer, loaded.eos_id, dtype, loaded.document_prefix
    )
    lead = stream.tokens[: stream.lead]
    starts = stream.doc_starts
    return [
        np.concatenate([lead, stream.tokens[starts[i] : starts[i + 1]]]).astype(np.int64)
        for i in range(stream.num_documents)
    ]


def first_scored(loaded: LoadedModel, convention: str) -> int:
    """Index of the first scored token of a line's own stream: after its EOS or BOS prefix."""
    return 1 if convention == "plain" else max(1, len(loaded.document_prefix))


def score_lines(
    loss_module: torch.nn.Module,
    corpus: Corpus,
    loaded: LoadedModel,
    convention: str,
    *,
    block_size: int,
    stride: int,
    batch_size: int,
    device: torch.device,
    precision: str,
    ctx: DistContext,
    progress: bool,
) -> list[LineScore]:
    """Every line scored on its own with the same windows, all lines' windows batched together.

    The lines are laid end to end in one array; each line's windows never reach into another.
    Windows are sorted by width so that a batch holds windows of similar length (less padding).
    """
    streams = line_token_lists(corpus, loaded, convention)
    first = first_scored(loaded, convention)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in streams])]).astype(np.int64)
    tokens = np.concatenate(streams) if streams else np.zeros(0, dtype=np.int64)
    windows: list[Window] = []
    owners: list[int] = []
    for i, line in enumerate(streams):
        o = int(offsets[i])
        for w in make_windows(len(line), block_size, stride, first):
            windows.append(Window(w.context_start + o, w.target_start + o, w.target_end + o))
            owners.append(i)
    order = sorted(
        range(len(windows)), key=lambda k: windows[k].target_end - windows[k].context_start
    )
    sums = score_windows(
        loss_module,
        tokens,
        [windows[k] for k in order],
        batch_size=batch_size,
        device=device,
        precision=precision,
        ctx=ctx,
        progress=progress,
    )
    sums = all_window_sums(sums, ctx, device)
    line_sums = np.bincount(
        np.asarray([owners[k] for k in order], dtype=np.int64),
        weights=sums,
        minlength=len(streams),
    )
    return [
        LineScore(float(line_sums[i]), max(0, len(s) - first), file=file, line=number, text=text)
        for i, (s, (file, number), text) in enumerate(
            zip(streams, corpus.origins, corpus.documents, strict=True)
        )
    ]


# ----------------------------------------------------------------------------- output


LINE_FIELDS = ["model", "file", "line", "tokens", "nll", "perplexity"]


def is_line_scores_file(path: Path) -> bool:
    """Whether `path` holds nothing, or per-line scores as `write_line_scores` writes them (a
    later run may replace those; any other file is the user's)."""
    with open(path, "rb") as file:
        first = file.readline(1 << 16).decode("utf-8", errors="replace").strip()
    if not first:
        return not path.read_bytes().strip()  # empty or blank
    if path.suffix == ".csv":
        return first == ",".join(LINE_FIELDS)
    try:
        record = json.loads(first)
    except ValueError:
        return False
    return isinstance(record, dict) and sorted(record) == sorted(LINE_FIELDS)


def write_line_scores(path: Path, reports: list[PerplexityReport]) -> None:
    """All models' per-line scores as .jsonl or .csv, written whole then moved into place."""
    records = [s.record(r.model) for r in reports for s in (r.lines or [])]
    if path.suffix == ".csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=LINE_FIELDS)
        writer.writeheader()
        writer.writerows(records)
        content = buffer.getvalue()
    else:
        content = "".join(json.dumps(r) + "\n" for r in records)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(content, encoding="utf-8")
    os.replace(tmp, path)


ROWS = (
    ("perplexity", "perplexity", "{:.4f}"),
    ("nll (nats/token)", "nll", "{:.5f}"),
    ("bits per byte", "bits_per_byte", "{:.5f}"),
    ("bits per char", "bits_per_char", "{:.5f}"),
    ("tokens", "tokens", "{:,}"),
    ("bytes", "bytes", "{:,}"),
    ("window L / stride S", None, ""),
)


def format_table(reports: list[PerplexityReport]) -> str:
    """Models side by side; from the second model on, a column with its change against the first."""
    base = reports[0]
    header = ["", *(r.model for r in reports[:1])]
    for r in reports[1:]:
        header += [r.model, "change"]
    rows = [header]
    for label, key, fmt in ROWS:
        row = [label]
        for i, r in enumerate(reports):
            if key is None:
                row.append(f"{r.block_size} / {r.stride}")
            else:
                row.append(fmt.format(getattr(r, key)))
            if i > 0:
                row.append(_change(getattr(base, key), getattr(r, key), key) if key else "")
        rows.append(row)
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if c == 0 else cell.rjust(w)
            for c, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    if len({r.tokens for r in reports}) > 1:
        lines.append(
            "token counts differ (different tokenizers): compare bits per byte, not perplexity"
        )
    return "\n".join(lines)


def _change(before: float, after: float, key: str) -> str:
    if key in ("tokens", "bytes"):
        return f"{after - before:+,}"
    relative = f" ({(after - before) / before:+.1%})" if before else ""
    return f"{after - before:+.4f}{relative}"


def shown_on_one_line(text: str) -> str:
    """A line's text for the terminal: line breaks (a --doc-sep blank paragraph's), tabs and
    other control characters as escapes (\\n, \\t, \\x1b), so a line holding an ANSI escape
    sequence shows it instead of recolouring the terminal; every other character as it is."""
    named = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}

    def shown(ch: str) -> str:
        code = ord(ch)
        if code < 0x20 or 0x7F <= code <= 0x9F:
            return named.get(ch, f"\\x{code:02x}")
        return ch

    return "".join(shown(ch) for ch in text)


def format_worst(reports: list[PerplexityReport], k: int) -> str:
    """The k lines of highest per-line perplexity under each model, with where they are: one
    line each (a paragraph's line breaks shown as \\n)."""
    out = []
    for r in reports:
        scored = [s for s in (r.lines or []) if s.tokens]
        scored.sort(key=lambda s: (-s.nll, s.file, s.line))
        out.append(f"least likely lines under {r.model}:")
        for s in scored[:k]:
            text = shown_on_one_line(s.text)
            snippet = text if len(text) <= 70 else text[:67] + "..."
            where = f"line {s.line}" if s.file == TEXT_SOURCE else f"{s.file}:{s.line}"
            out.append(f"  {where}  perplexity {s.perplexity:.2f}  ({s.tokens} tokens)  {snippet}")
    return "\n".join(out)


def render(reports: list[PerplexityReport], config: PerplexityConfig, as_json: bool) -> None:
    """Print the result: the table (or JSON) on stdout; with --json the worst lines go to stderr."""
    if as_json:
        data = [r.to_dict() for r in reports]
        print(json.dumps(data[0] if len(data) == 1 else data, indent=2))
    else:
        print(format_table(reports))
    if config.worst:
        print(format_worst(reports, config.worst), file=sys.stderr if as_json else sys.stdout)
