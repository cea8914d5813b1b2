"""`domainlm inspect`: what a training run would see, before it runs.

Counts (documents, characters, tokens, tokens per document, blocks, steps, padding), the data
lint (domainlm/data/lint.py), a time estimate from timing a few real optimizer steps of the chosen
model on this machine, and the memory plan (domainlm/model/memory.py: weights, gradients, AdamW
state, activations per micro-batch; full fine-tuning and LoRA, with and without gradient
checkpointing; what fits on the device at hand). Without --train-file, only the memory plan,
from the model's config alone (no weights read).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from domainlm.config import (
    DEVICES,
    DOC_SEPARATORS,
    LOAD_DTYPES,
    PACKING_MODES,
    PRECISIONS,
    STRATEGIES,
    TEXT_COLUMN_HELP,
    TrainConfig,
    check_run_length,
    check_seed,
    check_validation_split,
    read_run_settings,
)
from domainlm.data.blocks import BlockDataset, split_documents
from domainlm.data.lint import (
    count_long_documents,
    lint_corpus,
    unknown_token,
    unknown_token_warnings,
)
from domainlm.data.tokens import TokenStream, load_token_stream
from domainlm.errors import UserError
from domainlm.model.loading import ADAPTER_CONFIG, special_token_texts, tokenizer_fingerprint
from domainlm.model.lora import adapter_lora_settings, is_adapter_folder, load_any_model
from domainlm.model.memory import (
    GIB,
    HEADROOM,
    MemoryPlan,
    fitting_flags,
    model_config_of,
    plan_for_settings,
)
from domainlm.run.schedule import count_steps


def opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


DEFAULT_BATCH = 8  # --batch-size when the model is not a domainlm run folder


@dataclass
class InspectConfig:
    """Everything `domainlm inspect` needs; the same meaning as the `train` flags of that name."""

    train_file: str | None = opt(
        None,
        "Training texts: .txt, .jsonl, .parquet, .csv, a dataset folder or a folder. Without one: "
        "the memory plan only.",
    )
    validation_file: str | None = opt(None, "Validation texts (checked for leakage from train).")
    model: str = opt(
        "scratch:gpt2", "Model whose tokenizer, shape and speed to use (hub id, folder, scratch:)."
    )
    block_size: int | None = opt(
        None,
        "Tokens per block. Default: the run's when --model is a domainlm run folder, else the "
        "model's context, max 1024.",
    )
    batch_size: int | None = opt(
        None,
        "Blocks per micro-batch on each device. Default: the run's when --model is a domainlm "
        f"run folder, else {DEFAULT_BATCH}.",
    )
    grad_accum: int = opt(1, "Micro-batches accumulated per optimizer step.")
    nproc: int = opt(1, "Number of devices (torchrun --nproc-per-node).")
    strategy: str = opt(
        "auto",
        "Distributed strategy to plan for: fsdp plans full fine-tuning per rank, sharded over "
        "--nproc ranks.",
        choices=STRATEGIES,
    )
    epochs: float = opt(3.0, "Passes over the training blocks.")
    max_steps: int | None = opt(None, "Optimizer steps; overrides --epochs.")
    validation_split: float = opt(0.05, "Share held out when no validation file is given.")
    seed: int = opt(42, "Seed of the held-out split.")
    doc_sep: str = opt(
        "line", "Documents are lines or blank-line paragraphs.", choices=DOC_SEPARATORS
    )
    packing: str = opt("concat", "Packing mode of the run to estimate.", choices=PACKING_MODES)
    encoding_errors: str = opt("strict", "strict or replace.", choices=("strict", "replace"))
    text_column: str = opt("text", TEXT_COLUMN_HELP)
    cache_dir: str | None = opt(None, "Token cache folder (shared with train).")
    time_steps: int = opt(2, "Optimizer steps to time for the estimate (0: no timing).")
    precision: str = opt("auto", "Training precision to plan for.", choices=PRECISIONS)
    device: str | None = opt(
        None, "Device to plan for (default: $DOMAINLM_DEVICE or auto).", choices=DEVICES
    )
    load_dtype: str = opt("auto", "--load-dtype of the run to plan.", choices=LOAD_DTYPES)
    lora_r: int | None = opt(
        None, "LoRA rank to plan for. Default: the run's when --model is a LoRA run, else 8."
    )
    lora_targets: list[str] | None = opt(
        None,
        "LoRA target layers to plan for. Default: the run's when --model is a LoRA run, else "
        "every linear layer of the blocks.",
    )
    lora_dropout: float | None = opt(
        None,
        "LoRA dropout to plan for (above 0, each adapter keeps a mask). Default: the run's when "
        "--model is a LoRA run, else 0.05.",
    )
    gradient_checkpointing: bool = opt(
        False, "Use the checkpointed plan for the data report's memory line."
    )
    json: bool = opt(False, "Print one JSON object instead of text.")
    strict: bool = opt(False, "Exit with an error when the lint finds problems.")

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "nproc", "lora_r"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive")
        if self.block_size is not None and self.block_size < 2:
            raise UserError("--block-size must be at least 2")
        if self.lora_dropout is not None and not 0 <= self.lora_dropout < 1:
            raise UserError(
                f"--lora-dropout must be at least 0 and below 1, got {self.lora_dropout}"
            )
        if self.time_steps < 0:
            raise UserError("--time-steps must be 0 or more")
        check_run_length(self.epochs, self.max_steps)
        check_seed(self.seed)
        check_validation_split(self.validation_split)
        for name, choices in (
            ("precision", PRECISIONS), ("load_dtype", LOAD_DTYPES), ("device", (*DEVICES, None)),
            ("strategy", STRATEGIES),
        ):  # fmt: skip
            if getattr(self, name) not in choices:
                raise UserError(
                    f"--{name.replace('_', '-')} must be one of "
                    f"{', '.join(c for c in choices if c)}, got {getattr(self, name)!r}"
                )


def stream_stats(stream: TokenStream, block_size: int) -> dict[str, Any]:
    """Documents, tokens, tokens per document, blocks and padding of one token stream."""
    per_doc = stream.document_lengths() - 1  # without the EOS after each (and any BOS before)
    positions = len(stream.tokens) - 1  # what blocks cover: the targets and any BOS among them
    blocks = -(-positions // block_size)
    return {
        "documents": stream.num_documents,
        "tokens": int(stream.num_predicted),
        "tokens_per_document": {
            "min": int(per_doc.min()),
            "median": float(np.median(per_doc)),
            "p95": float(np.percentile(per_doc, 95)),
            "max": int(per_doc.max()),
        },
        "blocks": int(blocks),
        "tokens_padded": int(blocks * block_size - positions),
    }


def memory_plan(config: InspectConfig, model_config: Any, block: int) -> MemoryPlan:
    """The MemoryPlan of `config.model` for this run's shape on the device at hand (one rank's
    under --strategy fsdp)."""
    from domainlm.model.device import pick_device, resolve_precision

    device = pick_device(None, config.device)
    return plan_for_settings(
        model_config, config, batch_size=config.batch_size, block_size=block,
        precision=resolve_precision(config.precision, device), device=device.type,
        ranks=config.nproc,
    )  # fmt: skip


def memory_estimate(plan: MemoryPlan, gradient_checkpointing: bool) -> dict[str, float]:
    """Full fine-tuning's part of the plan, in GiB (the data report's memory line; one rank's
    under --strategy fsdp: `fsdp_ranks`)."""
    terms = plan.scenarios["full+ckpt" if gradient_checkpointing else "full"]
    return {
        "fsdp_ranks": plan.fsdp_ranks,
        "weights_gib": terms.weights / GIB,
        "gradients_gib": terms.gradients / GIB,
        "optimizer_gib": terms.optimizer / GIB,
        "activations_gib": (terms.activations + terms.loss_buffers) / GIB,
        "total_gib": terms.peak / GIB,
    }


def plan_report(config: InspectConfig) -> dict[str, Any]:
    """`domainlm inspect --model M` without data: the memory plan from the config alone."""
    from domainlm.model.loading import context_length

    config, note = with_run_shape(config)
    model_config = model_config_of(config.model)
    context = context_length(model_config)
    block = config.block_size or min(context, 1024)
    if block > context:
        raise UserError(f"--block-size {block} is larger than the context of {context} tokens")
    try:
        plan = memory_plan(config, model_config, block)
    except UserError as error:  # targets read from the run or adapter, not given as a flag
        if not (note and "--lora-targets" in note and str(error).startswith("--lora-targets")):
            raise
        source = note.removeprefix("note: planned at the ").split("; pass them")[0]
        raise UserError(f"{error} (--lora-targets taken from the {source})") from None

    def replan(batch: int) -> MemoryPlan:
        return plan_for_settings(
            model_config, config, batch_size=batch, block_size=block,
            precision=plan.precision, device=plan.device, ranks=config.nproc,
        )  # fmt: skip

    return {
        "model": config.model,
        "note": note,
        "memory_plan": plan.to_dict(),
        "fits": fitting_flags(plan, replan, config.grad_accum),
    }


def time_steps(model: Any, batch: int, block: int, steps: int) -> float:
    """Median seconds of one micro-batch forward+backward+AdamW step (random tokens, on CPU/GPU)."""
    import torch

    from domainlm.model.device import pick_device
    from domainlm.model.loss import CausalLMLoss

    device = pick_device(None)
    model = model.to(device).train().requires_grad_(True)  # an adapter folder loads frozen
    loss = CausalLMLoss(model)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-5)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    ids = torch.randint(0, vocab, (batch, block + 1), device=device)
    times = []
    for _ in range(steps + 1):  # the first step warms up (allocations, kernels)
        start = time.perf_counter()
        loss(ids[:, :-1], ids[:, 1:]).sum().backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


def time_estimate(config: InspectConfig, plan: MemoryPlan, total_steps: int) -> dict[str, Any]:
    """Seconds per optimizer step from timing real steps of the model here (its weights read
    now), or why not: full fine-tuning's step would not fit in the memory free (`plan`)."""
    block = plan.block_size
    need = plan.scenarios["full"].fit_bytes
    if plan.available is not None and need > HEADROOM * plan.available:
        return {
            "skipped": f"a full fine-tuning step of b={config.batch_size}, T={block} needs about "
            f"{need / GIB:.1f} GiB and {plan.available / GIB:.1f} GiB are free here: not timed "
            f"(`domainlm inspect --model {config.model}` says what fits)"
        }
    model = load_any_model(config.model).model
    micro = time_steps(model, config.batch_size, block, config.time_steps)
    step = micro * config.grad_accum
    return {
        "seconds_per_step": step,
        "total_hours": step * total_steps / 3600,
        "rule": f"median of {config.time_steps} timed steps of b={config.batch_size}, "
        f"T={block} x {config.grad_accum} accum; ranks assumed as fast and in parallel; "
        "evaluation not included",
    }


def inspect_data(config: InspectConfig) -> dict[str, Any]:
    """The full report as a dict (what --json prints)."""
    config, note = with_run_shape(config)
    loaded = load_any_model(config.model, weights=False)  # the tokenizer and the shapes only
    block = loaded.block_size(config.block_size, default_cap=1024)
    fingerprint = tokenizer_fingerprint(loaded.tokenizer, loaded.eos_id, loaded.document_prefix)

    def load(path: str) -> TokenStream:
        return load_token_stream(
            path, loaded.tokenizer, loaded.eos_id, fingerprint, config.cache_dir, config.doc_sep,
            config.encoding_errors, config.text_column, prefix=loaded.document_prefix,
        ).stream  # fmt: skip

    full = load(config.train_file)
    lint = lint_corpus(
        config.train_file,
        config.validation_file,
        config.cache_dir,
        special_token_texts(loaded.tokenizer),
        config.text_column,
    )
    lint.train.long_documents = count_long_documents(full.doc_starts, block, full.prefix_length)
    if config.validation_file:
        train, valid = full, load(config.validation_file)
        lint.validation.long_documents = count_long_documents(
            valid.doc_starts, block, valid.prefix_length
        )
        leaked = lint.validation.leaked_lines
    else:
        train_docs, held_docs = split_documents(
            full.num_documents, config.validation_split, config.seed, config.train_file
        )
        train, valid = full.select(train_docs), full.select(held_docs)
        leaked = held_out_leaks(full, train_docs, held_docs)
    dataset = BlockDataset(train, block, config.packing)
    global_batch = config.batch_size * config.grad_accum * config.nproc
    steps_per_epoch, total_steps = count_steps(config, config.nproc, len(dataset))
    plan = memory_plan(config, loaded.model.config, block)  # the memory line and the timing's
    report: dict[str, Any] = {
        "train_file": config.train_file,
        "model": config.model,
        "note": note,
        "block_size": block,
        "characters": lint.train.characters,  # and duplicate_lines: of the whole file
        "file_counts_include_held_out": not config.validation_file,
        **stream_stats(train, block),
        "global_batch_blocks": global_batch,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "duplicate_lines": lint.train.duplicate_lines,
        "leaked_lines": leaked,
        "validation": {
            "source": config.validation_file or f"held out {config.validation_split:.0%} of train",
            **stream_stats(valid, block),
        },
        "memory": memory_estimate(plan, config.gradient_checkpointing),
        "lint": {
            "train": lint.train.to_dict(),
            "validation": lint.validation.to_dict() if lint.validation else None,
        },
        "warnings": lint.warnings(config.doc_sep, block)
        + unknown_token_warnings(
            [(config.train_file, full)]
            + ([(config.validation_file, valid)] if config.validation_file else []),
            *unknown_token(loaded.tokenizer, loaded.eos_id),
        ),
    }
    if config.time_steps:  # it times unsharded steps here: the unsharded plan says if they fit
        unsharded = replace(config, strategy="auto")
        timed = plan if plan.fsdp_ranks == 1 else memory_plan(unsharded, loaded.model.config, block)
        report["time"] = time_estimate(config, timed, total_steps)
    if config.strict and report["warnings"]:
        raise UserError(
            f"--strict: {len(report['warnings'])} data problem(s): "
            + " | ".join(report["warnings"])
        )
    return report


def held_out_leaks(stream: TokenStream, train_docs: np.ndarray, held_docs: np.ndarray) -> int:
    """Held-out documents whose exact tokens are also a training document (no validation file)."""
    starts, tokens = stream.doc_starts, stream.tokens

    def key(d: int) -> int:
        return hash(np.asarray(tokens[starts[d] : starts[d + 1]]).tobytes())

    seen = {key(int(d)) for d in train_docs}
    return sum(1 for d in held_docs if key(int(d)) in seen)


def format_report(report: dict[str, Any]) -> str:
    """The text form of `inspect_data`'s report."""
    t, v = report["tokens_per_document"], report["validation"]
    whole = " (the whole file's, held-out part included)" if report.get(
        "file_counts_include_held_out"
    ) else ""  # fmt: skip
    lines = [report["note"]] if report["note"] else []
    lines += [
        f"train {report['train_file']} (model {report['model']}, block {report['block_size']})",
        f"  documents {report['documents']:,}, tokens {report['tokens']:,} (one EOS after each "
        f"document counted); characters {report['characters']:,}{whole}",
        f"  tokens/document (its EOS not counted): min {t['min']}, median {t['median']:g}, "
        f"p95 {t['p95']:g}, max {t['max']}",
        f"  blocks {report['blocks']:,}, tokens padded {report['tokens_padded']:,}",
        f"  global batch {report['global_batch_blocks']} blocks: {report['steps_per_epoch']:,} steps/epoch, "
        f"{report['total_steps']:,} steps in total",
        f"validation ({v['source']}): {v['documents']:,} documents, {v['tokens']:,} tokens",
        f"  duplicate lines in train {report['duplicate_lines']:,}{whole}; leaked into "
        f"validation {report['leaked_lines']}",
    ]
    m = report["memory"]
    lines.append(
        f"memory estimate: peak {m['total_gib']:.2f} GiB"
        + (
            f" per rank (--strategy fsdp over {m['fsdp_ranks']} ranks)"
            if m["fsdp_ranks"] > 1
            else ""
        )
        + ", the largest moment of a step (not a "
        f"sum): weights {m['weights_gib']:.2f}, gradients {m['gradients_gib']:.2f}, AdamW "
        f"{m['optimizer_gib']:.2f}, activations {m['activations_gib']:.2f} GiB, and the loss's "
        "and autocast's temporaries (`domainlm inspect --model M` prints the whole plan)"
    )
    tm = report.get("time")
    if tm and "skipped" in tm:
        lines.append(f"time estimate: {tm['skipped']}")
    elif tm:
        lines.append(
            f"time estimate: {tm['seconds_per_step']:.3g} s/step x {report['total_steps']:,} steps "
            f"= {hours_shown(tm['total_hours'])} ({tm['rule']})"
        )
    lines += [f"warning: {w}" for w in report["warnings"]] or ["lint: no problems found"]
    return "\n".join(lines)


def hours_shown(hours: float) -> str:
    """A duration for a person: `42 s`, `12.5 min`, `3.2 h` (it was `0.000178 h`)."""
    if hours * 3600 < 60:
        return f"{hours * 3600:.2g} s"
    if hours < 1:
        return f"{hours * 60:.3g} min"
    return f"{hours:.3g} h"


def format_plan(report: dict[str, Any]) -> str:
    """The text form of `plan_report`: one row per way to train, and what fits."""
    plan = report["memory_plan"]
    shape = plan["shape"]
    avail = plan["available"]
    where = "GPU memory" if plan["device"] == "cuda" else "system RAM"
    ranks = plan["fsdp_ranks"]
    sharded = f", one rank of {ranks} (fsdp)" if ranks > 1 else ""
    names = {
        "full": "full fine-tuning" + sharded,
        "full+ckpt": "full + --gradient-checkpointing" + (" (fsdp)" if ranks > 1 else ""),
        "lora": f"LoRA r={plan['lora_r']} ({plan['trainable_lora'] / 1e6:.2f}M trained)",
        "lora+ckpt": "LoRA + --gradient-checkpointing",
    }
    width = max(34, 2 + max(len(label) for label in names.values()))
    lines = [report["note"]] if report["note"] else []
    lines += [
        f"memory plan for {plan['model']}: {shape['params'] / 1e6:,.1f}M parameters "
        f"({shape['layers']} layers, hidden {shape['hidden']}, vocab {shape['vocab']:,}); "
        f"micro-batch {plan['batch_size']} x {plan['block_size']} tokens, precision "
        f"{plan['precision']}, on {plan['device']}",
        f"  {'GiB':<{width}}{'weights':>9}{'grads':>9}{'AdamW':>9}{'activ.':>9}{'peak':>9}"
        + ("" if plan["device"] == "cuda" else f"{'process':>9}"),
    ]
    for key, label in names.items():
        t = plan["scenarios"][key]
        cells = [
            t["weights"] + t["weight_copies"] + t["gathered"], t["gradients"], t["optimizer"],
            t["activations"] + t["loss_buffers"], t["peak"],
        ] + ([] if plan["device"] == "cuda" else [t["fit_bytes"]])  # fmt: skip
        lines.append(f"  {label:<{width}}" + "".join(f"{c / GIB:>9.2f}" for c in cells))
    if ranks > 1:
        root = plan["scenarios"]["full"]["gathered"]
        lines.append(
            f"  --strategy fsdp over {ranks} ranks: full fine-tuning's weights, gradients and "
            "AdamW state are one rank's share;\n  its weights column adds what every rank holds "
            f"whole: the root unit's parameters (embeddings, final norm, head: {root / GIB:.2f} "
            "GiB)\n  and autocast's half-precision copies of the layers' matrices. LoRA is "
            "planned under ddp (--lora with --strategy fsdp is refused)"
        )
    lines.append(f"  LoRA targets: {', '.join(plan['lora_targets'])}")
    if plan["lora_rank_warning"]:
        lines.append(f"  warning: {plan['lora_rank_warning']}")
    lines.append(
        f"  LoRA --merge (the default), after training: {plan['merge_bytes'] / GIB:.2f} GiB of "
        "system RAM (a float32 copy of the base"
        + (", beside the run's weights)" if plan["device"] != "cuda" else ")")
        + "; --no-merge skips it, `domainlm export RUN OUT` merges later"
    )
    if plan["device"] != "cuda":
        lines.append(
            "  peak: live tensors; process: a bound on the process's resident memory on the CPU "
            "(tensors + the allocator's fragmentation + the runtime), what must be free"
        )
    if avail is not None:
        lines.append(f"available: {avail / GIB:.1f} GiB of {where}; fits with: {report['fits']}")
    return "\n".join(lines)


def with_run_shape(config: InspectConfig) -> tuple[InspectConfig, str | None]:
    """`config` with the block and batch size left out, and a precision and load dtype left at
    auto, taken from the run when --model is a domainlm run folder (or a checkpoint in one): the
    plan is then the run's, not the model's context at the device's precision (a GPT-2 run at
    block 256 in fp32 is planned at 256 in fp32, not 1024 in bf16). The note says so."""
    found = read_run_settings(config.model)
    run = found[1] if found else {}
    identity, settings = (
        run.get(k) if isinstance(run.get(k), dict) else {} for k in ("identity", "config")
    )
    run_block, run_batch = identity.get("block_size"), settings.get("batch_size")
    taken: list[str] = []
    if config.block_size is None and isinstance(run_block, int):
        config = replace(config, block_size=run_block)
        taken.append(f"--block-size {run_block}")
    if config.batch_size is None and isinstance(run_batch, int):
        config = replace(config, batch_size=run_batch)
        taken.append(f"--batch-size {run_batch}")
    if config.batch_size is None:
        config = replace(config, batch_size=DEFAULT_BATCH)
    for name, choices in (("precision", PRECISIONS), ("load_dtype", LOAD_DTYPES)):
        value = settings.get(name)
        if getattr(config, name) == "auto" and value != "auto" and value in choices:
            config = replace(config, **{name: value})
            taken.append(f"--{name.replace('_', '-')} {value}")
    lora = identity.get("lora")
    if lora is None and is_adapter_folder(config.model):  # an adapter without its run's files
        lora = adapter_lora_settings(config.model)
    config, lora_taken = with_run_lora(config, lora)
    taken += lora_taken
    if not taken:
        return config, None
    where = found[0] if found else f"{config.model}/{ADAPTER_CONFIG}"
    shown = ", ".join(taken[:-1]) + " and " + taken[-1] if len(taken) > 1 else taken[0]
    whose = "run's" if found else "adapter's"
    return (
        config,
        f"note: planned at the {whose} {shown} ({where}); pass them to plan another shape",
    )


# --lora-r and --lora-dropout when neither the command nor a LoRA run gives them: train's.
LORA_DEFAULTS = {
    f.name: f.default for f in fields(TrainConfig) if f.name in ("lora_r", "lora_dropout")
}


def with_run_lora(config: InspectConfig, lora: object) -> tuple[InspectConfig, list[str]]:
    """`config` with the LoRA settings left out taken from a LoRA run's identity (`lora`: r,
    dropout, targets), else train's defaults; and the flags taken, for the note."""
    run = lora if isinstance(lora, dict) else {}
    taken = []
    for name, key in (("lora_r", "r"), ("lora_dropout", "dropout"), ("lora_targets", "targets")):
        if getattr(config, name) is not None:
            continue
        value = run.get(key)
        if value is not None:
            shown = " ".join(value) if isinstance(value, list) else value
            taken.append(f"--{name.replace('_', '-')} {shown}")
        config = replace(config, **{name: value if value is not None else LORA_DEFAULTS.get(name)})
    return config, taken


def run_inspect(config: InspectConfig) -> int:
    if config.validation_file and not config.train_file:  # it was read by no one, said nowhere
        raise UserError(
            "--validation-file is inspected with the --train-file it validates; give both (or "
            "neither, for the model's memory plan alone)"
        )
    if not config.train_file:
        report = plan_report(config)
        print(json.dumps(report, indent=2) if config.json else format_plan(report))
        return 0
    report = inspect_data(config)
    if config.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0
