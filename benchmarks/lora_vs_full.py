"""LoRA vs full fine-tuning on the CPU, GPT-2 124M shape (issue 15 item 5, the CPU half).

    .venv/bin/python benchmarks/lora_vs_full.py                      # 30 steps, batch 4 x 256, bf16
    .venv/bin/python benchmarks/lora_vs_full.py --repeats 2 --write-docs

Each run is one `domainlm train` process on `scratch:gpt2` (random init, seed 42) and the demo's
corpus (Python's docstrings; the validation file cut to `--valid-docs` documents), the same steps,
batch, block and precision for both; `--lora` adds LoRA with its defaults (r 8, alpha 16, dropout
0.05, every linear layer of the blocks) and `--no-merge`. Learning rates are each method's usual
one (full 5e-5, LoRA 2e-4; `--full-lr`, `--lora-lr`). Reported per method, medians over
`--repeats` (the two methods alternate): peak RSS of the process, the median step time (from
metrics.jsonl's per-step tokens/s, the first `--skip` steps left out), the validation perplexity
after the last step, and the size of the last checkpoint folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from docs_section import write_section

SECTION = "## LoRA vs full fine-tuning on the CPU"
METHODS = ("full", "lora")


def prepare(root: Path, valid_docs: int) -> tuple[Path, Path]:
    from domainlm.demo import write_demo_corpus

    train_file, valid_file = write_demo_corpus(root / "data")
    lines = valid_file.read_text(encoding="utf-8").splitlines()[:valid_docs]
    valid_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return train_file, valid_file


def command(args: argparse.Namespace, method: str, data: tuple[Path, Path], out: Path) -> list[str]:
    cmd = [
        sys.executable, "-m", "domainlm", "train", "--model", "scratch:gpt2",
        "--train-file", str(data[0]), "--validation-file", str(data[1]), "--output-dir", str(out),
        "--block-size", str(args.block_size), "--batch-size", str(args.batch_size),
        "--max-steps", str(args.steps), "--save-steps", str(args.steps),
        "--eval-steps", str(args.steps), "--logging-steps", "1", "--precision", args.precision,
        "--quiet", "--overwrite-output-dir",
    ]  # fmt: skip
    if method == "lora":
        return [*cmd, "--lora", "--no-merge", "--lr", str(args.lora_lr)]
    return [*cmd, "--lr", str(args.full_lr)]


def measured(cmd: list[str], out: Path) -> dict:
    """Run one child; its peak RSS (this wrapper's only child, so getrusage is its)."""
    wrapper = [
        sys.executable, "-c",
        "import json, resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
        "print(json.dumps({'rc': rc, 'peak_rss_mb': "
        "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))",
        *cmd,
    ]  # fmt: skip
    done = subprocess.run(wrapper, capture_output=True, text=True)
    out.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}.log").write_text(done.stdout + done.stderr)
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    if facts["rc"] != 0:
        raise SystemExit(f"failed ({out}):\n{done.stderr[-2000:]}")
    return facts


def run_facts(args: argparse.Namespace, out: Path, facts: dict) -> dict:
    """Step time, perplexity and checkpoint size from the run folder."""
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tokens_per_step = args.batch_size * args.block_size
    times = [tokens_per_step / e["tokens_per_s"] for e in events if "tokens_per_s" in e]
    checkpoint = out / f"checkpoint-{args.steps}"
    size = sum(f.stat().st_size for f in checkpoint.iterdir() if f.is_file())
    results = json.loads((out / "eval_results.json").read_text())
    return {
        **facts,
        "step_s": statistics.median(times[args.skip :]),
        "perplexity": results["perplexity"],
        "initial_perplexity": results["initial_perplexity"],
        "checkpoint_mb": size / 2**20,
    }


def machine() -> str:
    cpu = platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    load = os.getloadavg()
    return (f"{cpu}, {os.cpu_count()} cores; load average {load[0]:.1f} / {load[1]:.1f} / "
            f"{load[2]:.1f} (1/5/15 min) when the table was written")  # fmt: skip


def table(args: argparse.Namespace, results: dict[str, list[dict]]) -> str:
    def med(method: str, key: str) -> float:
        return statistics.median(r[key] for r in results[method])

    rows = ["| | full fine-tuning | LoRA | LoRA / full |", "|---|---|---|---|"]
    for label, key, fmt in (
        ("peak RSS (MB)", "peak_rss_mb", "{:,.0f}"),
        ("step time (s, median)", "step_s", "{:.2f}"),
        ("checkpoint (MB)", "checkpoint_mb", "{:,.1f}"),
        (f"validation perplexity after {args.steps} steps", "perplexity", "{:,.1f}"),
    ):
        full, lora = med("full", key), med("lora", key)
        rows.append(f"| {label} | {fmt.format(full)} | {fmt.format(lora)} | {lora / full:.3f} |")
    initial = med("full", "initial_perplexity")
    rows.append(f"| validation perplexity before training | {initial:,.1f} | "
                f"{med('lora', 'initial_perplexity'):,.1f} | |")  # fmt: skip
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--full-lr", type=float, default=5e-5)
    parser.add_argument("--lora-lr", type=float, default=2e-4)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip", type=int, default=3, help="first steps left out of the median")
    parser.add_argument("--valid-docs", type=int, default=300)
    parser.add_argument("--root", type=Path, default=Path("/tmp/domainlm-lora-bench"))
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    data = prepare(args.root, args.valid_docs)
    results: dict[str, list[dict]] = {m: [] for m in METHODS}
    for index in range(args.repeats):
        for method in METHODS:
            out = args.root / f"{method}-{index}"
            facts = run_facts(args, out, measured(command(args, method, data, out), out))
            results[method].append(facts)
            print(method, index, json.dumps(facts), flush=True)
    report = table(args, results)
    print(report)
    if args.write_docs:
        flags = " ".join(a for a in sys.argv[1:] if a != "--write-docs")
        text = "\n".join([
            SECTION, "",
            f"Command: `python benchmarks/lora_vs_full.py {flags}`".replace(" `", " `", 1), "",
            f"Machine: {machine()}.", "",
            f"`scratch:gpt2` (GPT-2 124M shape, random init), {args.steps} steps of batch "
            f"{args.batch_size} x block {args.block_size}, {args.precision}, medians of "
            f"{args.repeats}; full fine-tuning at lr {args.full_lr}, LoRA (r 8, alpha 16, every "
            f"linear layer of the blocks; base frozen in {args.precision}) at lr {args.lora_lr}.",
            "", report, "",
        ])  # fmt: skip
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
