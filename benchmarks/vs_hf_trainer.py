"""domainlm vs the Hugging Face Trainer (run_clm.py's pipeline), side by side on this machine.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/vs_hf_trainer.py                 # GPT-2 124M shape, block 256, batch 4
    .venv/bin/python benchmarks/vs_hf_trainer.py --n-layer 2 --repeats 3 --write-docs

One random-init model folder and one text corpus (Python's standard-library docstrings) are made
once; then, for each precision, the two tools run alternately, `--repeats` times, each as its own
subprocess with a fresh token / datasets cache (so tokenization is always counted):

- domainlm: `domainlm train ...` (tokenize, N steps, final validation, model saved).
- baseline: `run_baseline()` below, which follows transformers' examples/pytorch/language-modeling/
  run_clm.py: datasets' `text` loader, `tokenize_function`, `group_texts`, the default collator,
  `Trainer` with the same batch size, block size, learning rate, schedule, clipping, steps and
  precision, then `trainer.save_model()` and `trainer.evaluate()` with run_clm's accuracy metric.

Reported per tool: median steady-state training tokens/s (per-step times, first 2 steps dropped),
the whole command's wall time, its peak RSS (getrusage of the child), and, in a separate
subprocess each, evaluation tokens/s on the same validation file from the same init. Validation
losses after N steps are printed for both (quality unchanged), and for domainlm's fp32 path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from docs_section import write_section

SECTION = "## Training vs the HF Trainer"


# ----------------------------------------------------------------------------- the baseline


def run_baseline(args: argparse.Namespace) -> None:
    """run_clm.py's pipeline, trimmed to the options this benchmark uses; writes result.json."""
    from itertools import chain

    import numpy as np
    import torch
    from datasets import load_dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    started = time.perf_counter()
    out = Path(args.output_dir)
    raw = load_dataset(
        "text",
        data_files={"train": args.train_file, "validation": args.validation_file},
        cache_dir=str(out / "hf-datasets-cache"),
        keep_linebreaks=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    block_size = args.block_size

    def tokenize_function(examples):  # type: ignore[no-untyped-def]
        return tokenizer(examples["text"])

    tokenized = raw.map(tokenize_function, batched=True, remove_columns=["text"])

    def group_texts(examples):  # type: ignore[no-untyped-def]
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total_length = (len(concatenated["input_ids"]) // block_size) * block_size
        result = {
            k: [t[i : i + block_size] for i in range(0, total_length, block_size)]
            for k, t in concatenated.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    lm_datasets = tokenized.map(group_texts, batched=True)

    def preprocess_logits_for_metrics(logits, labels):  # type: ignore[no-untyped-def]
        if isinstance(logits, tuple):
            logits = logits[0]
        return logits.argmax(dim=-1)

    def compute_metrics(eval_preds):  # type: ignore[no-untyped-def]
        preds, labels = eval_preds
        labels, preds = labels[:, 1:].reshape(-1), preds[:, :-1].reshape(-1)
        return {"accuracy": float(np.mean(preds == labels))}

    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, *_, **__):  # type: ignore[no-untyped-def]
            step_times.append(time.perf_counter())

    training_args = TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr,
        max_steps=args.steps,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=args.precision == "bf16",
        use_cpu=not torch.cuda.is_available(),
        logging_steps=10,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=42,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=lm_datasets["train"],
        eval_dataset=lm_datasets["validation"],
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        callbacks=[StepTimer()],
    )
    trainer.train()
    trainer.save_model()
    eval_started = time.perf_counter()
    metrics = trainer.evaluate()
    eval_seconds = time.perf_counter() - eval_started
    tokens = len(lm_datasets["validation"]) * (block_size - 1)  # predicted positions (shifted)
    write_result(
        out,
        step_times=step_times,
        tokens_per_step=args.batch_size * block_size,
        eval_loss=metrics["eval_loss"],
        eval_tokens=tokens,
        eval_seconds=eval_seconds,
        wall_inside=time.perf_counter() - started,
    )


def run_baseline_eval(args: argparse.Namespace) -> None:
    """Evaluation only, run_clm.py style, from the init model: times trainer.evaluate()."""
    args.steps = 0
    from itertools import chain

    import numpy as np
    import torch
    from datasets import load_dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    out = Path(args.output_dir)
    raw = load_dataset(
        "text",
        data_files={"validation": args.validation_file},
        cache_dir=str(out / "hf-datasets-cache"),
        keep_linebreaks=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    block_size = args.block_size
    tokenized = raw.map(lambda e: tokenizer(e["text"]), batched=True, remove_columns=["text"])

    def group_texts(examples):  # type: ignore[no-untyped-def]
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total_length = (len(concatenated["input_ids"]) // block_size) * block_size
        result = {
            k: [t[i : i + block_size] for i in range(0, total_length, block_size)]
            for k, t in concatenated.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    valid = tokenized.map(group_texts, batched=True)["validation"]

    def compute_metrics(eval_preds):  # type: ignore[no-untyped-def]
        preds, labels = eval_preds
        return {"accuracy": float(np.mean(preds[:, :-1] == labels[:, 1:]))}

    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(out / "trainer"),
            per_device_eval_batch_size=args.batch_size,
            bf16=args.precision == "bf16",
            bf16_full_eval=False,
            use_cpu=not torch.cuda.is_available(),
            report_to="none",
            disable_tqdm=True,
        ),
        eval_dataset=valid,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(dim=-1),
    )
    started = time.perf_counter()
    metrics = trainer.evaluate()
    seconds = time.perf_counter() - started
    write_result(
        out,
        eval_loss=metrics["eval_loss"],
        eval_tokens=len(valid) * (block_size - 1),
        eval_seconds=seconds,
    )


# ----------------------------------------------------------------------------- domainlm


def domainlm_train_command(args: argparse.Namespace, out: Path, precision: str) -> list[str]:
    return [
        str(Path(sys.executable).parent / "domainlm"),
        "train",
        "--model", str(args.work_dir / "model"),
        "--train-file", str(args.work_dir / "train.txt"),
        "--validation-file", str(args.work_dir / "valid.txt"),
        "--output-dir", str(out / "run"),
        "--cache-dir", str(out / "token-cache"),
        "--block-size", str(args.block_size),
        "--batch-size", str(args.batch_size),
        "--max-steps", str(args.steps),
        "--lr", str(args.lr),
        "--scheduler", "linear",
        "--precision", precision,
        "--logging-steps", "1",
        "--save-steps", str(args.steps),
        "--max-eval-tokens", "1",  # the evaluation before training: one window (the baseline has none)
        "--quiet",
    ]  # fmt: skip


def run_domainlm_eval(args: argparse.Namespace) -> None:
    """Evaluation only, from the init model: times domainlm's windowed stream_nll."""
    import torch

    from domainlm.data.tokens import load_token_stream
    from domainlm.evaluation.windows import stream_nll
    from domainlm.model.fastpath import use_fast_kernels
    from domainlm.model.loading import load_model, tokenizer_fingerprint
    from domainlm.model.loss import CausalLMLoss
    from domainlm.model.malloc import reuse_freed_host_memory

    reuse_freed_host_memory()  # as the domainlm command does
    out = Path(args.output_dir)
    loaded = load_model(args.model)
    use_fast_kernels(loaded.model)  # as train.py does
    stream = load_token_stream(
        args.validation_file,
        loaded.tokenizer,
        loaded.eos_id,
        tokenizer_fingerprint(loaded.tokenizer, loaded.eos_id),
        out / "token-cache",
    ).stream
    started = time.perf_counter()
    result = stream_nll(
        CausalLMLoss(loaded.model),
        stream.tokens,
        block_size=args.block_size,
        stride=args.block_size - 1,
        batch_size=args.batch_size,
        device=torch.device("cpu"),
        precision=args.precision,
    )
    seconds = time.perf_counter() - started
    write_result(out, eval_loss=result.nll, eval_tokens=result.tokens, eval_seconds=seconds)


def domainlm_train_result(out: Path) -> dict:
    events = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    speeds = [e["tokens_per_s"] for e in events if "tokens_per_s" in e]
    final = json.loads((out / "run" / "eval_results.json").read_text())
    return {
        "train_tokens_per_s": statistics.median(speeds[2:] or speeds),
        "eval_loss": final["eval_loss"],
    }


# ----------------------------------------------------------------------------- measuring


def write_result(out: Path, *, step_times: list[float] | None = None, tokens_per_step: int = 0,
                 **values: float) -> None:  # fmt: skip
    result = dict(values)
    if step_times:
        gaps = [b - a for a, b in zip(step_times, step_times[1:], strict=False)][1:]
        result["train_tokens_per_s"] = tokens_per_step / statistics.median(gaps)
    if "eval_seconds" in result:
        result["eval_tokens_per_s"] = result["eval_tokens"] / result["eval_seconds"]
    (out / "result.json").write_text(json.dumps(result))


def measured(command: list[str], out: Path, env: dict[str, str]) -> dict:
    """Run one child; its wall time and peak RSS (this wrapper's only child, so getrusage is its)."""
    wrapper = [
        sys.executable,
        "-c",
        "import json, resource, subprocess, sys, time; t = time.perf_counter(); "
        "rc = subprocess.call(sys.argv[1:]); "
        "print(json.dumps({'rc': rc, 'wall_s': time.perf_counter() - t, "
        "'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))",
        *command,
    ]
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(wrapper, env=env, capture_output=True, text=True)
    (out / "log.txt").write_text(done.stdout + done.stderr)
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    if facts["rc"] != 0:
        raise SystemExit(f"failed ({out}): see {out / 'log.txt'}\n{done.stderr[-2000:]}")
    facts.update(
        json.loads((out / "result.json").read_text()) if (out / "result.json").exists() else {}
    )
    return facts


def child_env(threads: int | None) -> dict[str, str]:
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def one_run(args: argparse.Namespace, tool: str, precision: str, index: int) -> dict:
    out = args.work_dir / "runs" / f"{tool}-{precision}-{index}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = child_env(args.threads)
    common = [
        "--model", str(args.work_dir / "model"),
        "--train-file", str(args.work_dir / "train.txt"),
        "--validation-file", str(args.work_dir / "valid.txt"),
        "--block-size", str(args.block_size), "--batch-size", str(args.batch_size),
        "--steps", str(args.steps), "--lr", str(args.lr), "--precision", precision,
    ]  # fmt: skip
    me = [sys.executable, str(Path(__file__).resolve())]
    if tool == "domainlm":
        facts = measured(domainlm_train_command(args, out, precision), out, env)
        facts.update(domainlm_train_result(out))
        ev = measured(
            [*me, "domainlm-eval", *common, "--output-dir", str(out / "eval")], out / "eval", env
        )
    else:
        facts = measured([*me, "baseline", *common, "--output-dir", str(out)], out, env)
        ev = measured(
            [*me, "baseline-eval", *common, "--output-dir", str(out / "eval")], out / "eval", env
        )
    facts["eval_tokens_per_s"] = ev["eval_tokens_per_s"]
    facts["init_eval_loss"] = ev["eval_loss"]
    shutil.rmtree(out / "run", ignore_errors=True)  # checkpoints of 124M models are large
    print(f"  {tool:8s} {precision} #{index}: " + ", ".join(
        f"{k} {v:.4g}" for k, v in facts.items() if isinstance(v, float)), flush=True)  # fmt: skip
    return facts


def prepare(args: argparse.Namespace) -> None:
    from domainlm.demo import stdlib_docstrings
    from domainlm.model.loading import save_scratch_folder

    args.work_dir.mkdir(parents=True, exist_ok=True)
    overrides = {} if args.n_layer is None else {"n_layer": args.n_layer}
    save_scratch_folder(args.preset, args.work_dir / "model", seed=0, **overrides)
    docs = stdlib_docstrings()
    random.Random(0).shuffle(docs)
    valid, train = (
        docs[: args.valid_docs],
        docs[args.valid_docs : args.valid_docs + args.train_docs],
    )
    (args.work_dir / "train.txt").write_text("\n".join(train) + "\n", encoding="utf-8")
    (args.work_dir / "valid.txt").write_text("\n".join(valid) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- the report

FIGURES = [
    ("train_tokens_per_s", "training tokens/s (median steady state)", "higher"),
    ("peak_rss_mb", "peak RSS, MB (whole command)", "lower"),
    ("eval_tokens_per_s", "eval tokens/s (same validation file)", "higher"),
    ("wall_s", "wall s: tokenize + steps + final eval", "lower"),
]


def summarise(results: dict[tuple[str, str], list[dict]]) -> list[tuple[str, str, float, float]]:
    rows = []
    for precision in sorted({p for _, p in results}):
        ours, base = results[("domainlm", precision)], results[("baseline", precision)]
        for key, label, _ in FIGURES:
            rows.append((precision, label, statistics.median(r[key] for r in ours),
                         statistics.median(r[key] for r in base)))  # fmt: skip
        rows.append((precision, "validation loss after N steps",
                     statistics.median(r["eval_loss"] for r in ours),
                     statistics.median(r["eval_loss"] for r in base)))  # fmt: skip
    return rows


# (precision, figure label, target ratio, "higher" or "lower"): issue 6's CPU targets
TARGETS = [
    ("bf16", "training tokens/s (median steady state)", 1.5, "higher"),
    ("bf16", "peak RSS, MB (whole command)", 0.7, "lower"),
    ("bf16", "eval tokens/s (same validation file)", 2.0, "higher"),
    ("bf16", "wall s: tokenize + steps + final eval", 0.6, "lower"),
    ("fp32", "training tokens/s (median steady state)", 1.3, "higher"),
]


def verdicts(rows: list[tuple[str, str, float, float]]) -> str:
    """Each target of issue 6 against the measured median ratio."""
    ratios = {(p, label): ours / base for p, label, ours, base in rows}
    lines = ["| target | wanted | measured | met |", "|---|---|---|---|"]
    for precision, label, wanted, better in TARGETS:
        ratio = ratios.get((precision, label))
        if ratio is None:
            continue
        met = ratio >= wanted if better == "higher" else ratio <= wanted
        sign = ">=" if better == "higher" else "<="
        lines.append(f"| {label}, {precision} | {sign} {wanted}x | {ratio:.2f}x | "
                     f"{'yes' if met else 'no'} |")  # fmt: skip
    return "\n".join(lines)


def quality(results: dict[tuple[str, str], list[dict]]) -> str:
    """Validation loss after N steps from the same init: each tool's bf16 path against its own
    plain fp32 path (the bf16 - fp32 gap of the Trainer is the yardstick for "within noise")."""
    lines = []
    for tool in ("domainlm", "baseline"):
        runs = {p: results.get((tool, p)) for p in ("bf16", "fp32")}
        if not all(runs.values()):
            continue
        bf16, fp32 = (statistics.median(r["eval_loss"] for r in runs[p]) for p in ("bf16", "fp32"))
        name = "domainlm" if tool == "domainlm" else "HF Trainer"
        lines.append(f"- {name}: validation loss {bf16:.4f} (bf16) vs {fp32:.4f} (fp32), "
                     f"bf16 - fp32 = {bf16 - fp32:+.5f}")  # fmt: skip
    return "\n".join(lines)


def table(rows: list[tuple[str, str, float, float]]) -> str:
    lines = ["| precision | figure | domainlm | HF Trainer | ratio |", "|---|---|---|---|---|"]
    for precision, label, ours, base in rows:
        lines.append(f"| {precision} | {label} | {ours:,.4g} | {base:,.4g} | {ours / base:.2f}x |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    import transformers

    load = os.getloadavg()
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, Python {platform.python_version()}; load average "
            f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) when the table was written")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", default="compare",
                        choices=["compare", "baseline", "baseline-eval", "domainlm-eval"])  # fmt: skip
    parser.add_argument("--preset", default="gpt2", help="scratch shape (gpt2 = GPT-2 124M)")
    parser.add_argument("--n-layer", type=int, default=None, help="fewer layers, for a quick run")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--precisions", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"]
    )
    parser.add_argument("--train-docs", type=int, default=4000)
    parser.add_argument("--valid-docs", type=int, default=150)
    parser.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS for the children"
    )
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/domainlm-vs-hf"))
    parser.add_argument("--write-docs", action="store_true", help="write docs/benchmarks.md")
    # child modes
    parser.add_argument("--model")
    parser.add_argument("--train-file")
    parser.add_argument("--validation-file")
    parser.add_argument("--output-dir")
    parser.add_argument("--precision", default="bf16")
    args = parser.parse_args()
    if args.mode == "baseline":
        return run_baseline(args)
    if args.mode == "baseline-eval":
        return run_baseline_eval(args)
    if args.mode == "domainlm-eval":
        return run_domainlm_eval(args)

    command = " ".join([".venv/bin/python benchmarks/vs_hf_trainer.py", *sys.argv[1:]])
    prepare(args)
    results: dict[tuple[str, str], list[dict]] = {}
    for precision in args.precisions:
        for index in range(args.repeats):
            # Alternate, and swap who goes first each repeat, so drifting load hits both alike.
            order = ["domainlm", "baseline"] if index % 2 == 0 else ["baseline", "domainlm"]
            for tool in order:
                results.setdefault((tool, precision), []).append(
                    one_run(args, tool, precision, index)
                )
    rows = summarise(results)
    report = table(rows)
    checks, same_learning = verdicts(rows), quality(results)
    print("\n" + report + "\n\n" + checks + "\n\n" + same_learning)
    shape = f"scratch:{args.preset}" + (f" with {args.n_layer} layers" if args.n_layer else "")
    text = "\n".join([
        SECTION, "",
        f"Model {shape} (random init, one folder for both), block {args.block_size}, batch "
        f"{args.batch_size}, {args.steps} steps, lr {args.lr} linear, {args.repeats} alternating "
        f"repeats per tool and precision (medians; ratio = domainlm / HF Trainer). Corpus: "
        f"{args.train_docs} Python standard-library docstrings (train), {args.valid_docs} (validation).",
        "", f"Command: `{command}`", "", f"Machine: {machine()}", "", report, "",
        "Issue 6's CPU targets (ratio = domainlm / HF Trainer, medians):", "", checks, "",
        "Quality after the same steps from the same init (each tool's bf16 path vs its fp32 "
        "path; the two tools' token streams differ: run_clm.py joins lines without EOS and "
        "drops the remainder, domainlm adds EOS after each line):", "", same_learning, "",
    ])  # fmt: skip
    if args.write_docs:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
