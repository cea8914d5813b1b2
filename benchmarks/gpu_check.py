"""Everything domainlm claims about one GPU, measured in one run: speed against the HF Trainer,
MFU, memory, a 1B Llama shape, perplexity on the GPU against the CPU, and the CUDA tests.

    python3 benchmarks/gpu_check.py                # about 5 minutes on one H100/H200
    python3 benchmarks/gpu_check.py --skip-1b --skip-tests --steps 60

What it runs, each as its own process (so that memory peaks are each tool's own):
1. A corpus: the docstrings of Python's standard library (domainlm.demo), one per line, split
   into train and validation; a random-init GPT-2 124M folder (seed 0) that both tools load.
2. `python -m domainlm train` on it: block 1024, bf16, `--batch-size B`, `--steps` steps (with
   `--compile` when asked: it did not pay for this shape, see docs/benchmarks.md); steady tokens/s is the median of metrics.jsonl's logging windows after the first
   two (compilation), i.e. the whole loop: data, loss, clipping, AdamW, logging.
3. The HF Trainer with run_clm.py's pipeline (tokenize each line, concatenate, cut into blocks of
   1024, labels = inputs) from the same folder and the same train file, same batch, steps,
   learning rate, schedule, clipping and bf16; steady tokens/s over the same steps.
4. The same two for a 1B-class Llama shape (16 layers, 2048 wide, 32 heads, 8 key/value heads,
   MLP 8192, GPT-2's vocabulary), block 2048, batch 8, random init, domainlm with `--compile`
   (`--skip-trainer-1b` leaves the Trainer's side out, to stay inside 6 minutes).
5. `domainlm perplexity` of the trained 124M model on the validation file: on the GPU in fp32 and
   bf16, and on the CPU in fp32 (CUDA hidden from that process).
6. `pytest -m cuda` (tests/test_cuda.py).
GPU memory is the peak of nvidia-smi's "memory.used" while the process runs, minus the idle
figure before it starts. MFU = tokens/s x (6N + 12 L H Q T) / 989 TFLOP/s (dense bf16 of an
H100/H200 SXM; `--peak` for others; benchmarks/model_flops.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from model_flops import PEAK_BF16_H100_SXM, flops_per_token

ROOT = Path(__file__).resolve().parent.parent
TRAIN_REPEATS = 20
LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)


# ----------------------------------------------------------------------------- measuring


class GPUMemoryPeak:
    """Samples nvidia-smi's memory.used (MiB) every 0.2 s while a `with` block runs."""

    def __init__(self) -> None:
        self.idle = self._used()
        self.peak = self.idle
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    @staticmethod
    def _used() -> int:
        """MiB in use on GPU 0; 0 without nvidia-smi (a dry run on a CPU)."""
        query = [
            "nvidia-smi",
            "--query-gpu=memory.used",
            "--format=csv,noheader,nounits",
            "-i",
            "0",
        ]
        try:
            out = subprocess.run(query, capture_output=True, text=True).stdout
        except FileNotFoundError:
            return 0
        return int(out.split()[0]) if out.strip() else 0

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self._used())

    def __enter__(self) -> GPUMemoryPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def gib(self) -> float:
        return (self.peak - self.idle) / 1024


def run(cmd: list[str], log: Path, env: dict[str, str] | None = None,
        timeout: float | None = None) -> tuple[float, float, bool]:  # fmt: skip
    """Run a command, its output to `log`; returns (seconds, GPU memory peak GiB, timed out)."""
    started = time.perf_counter()
    with GPUMemoryPeak() as memory, log.open("w") as handle:
        try:
            done = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                  cwd=ROOT, timeout=timeout)  # fmt: skip
        except subprocess.TimeoutExpired:
            return time.perf_counter() - started, memory.gib, True
    if done.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n" + "\n".join(tail))
    return time.perf_counter() - started, memory.gib, False


def model_flops(folder: Path, seq_len: int) -> float:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return flops_per_token(model, seq_len)


# ----------------------------------------------------------------------------- the inputs


def make_corpus(work: Path, repeats: int = TRAIN_REPEATS) -> dict[str, Path]:
    """The train and validation files: Python's standard-library docstrings, one per line."""
    from domainlm.demo import stdlib_docstrings

    docs = stdlib_docstrings()
    work.mkdir(parents=True, exist_ok=True)
    train, valid = work / "train.txt", work / "valid.txt"
    # ~0.26M tokens, repeated: enough blocks that no run reaches an epoch's short last batch
    train.write_text("\n".join(docs[400:] * repeats) + "\n", encoding="utf-8")
    valid.write_text("\n".join(docs[:400]) + "\n", encoding="utf-8")
    return {"train": train, "valid": valid}


def make_inputs(work: Path) -> dict[str, Path]:
    """The corpus and the GPT-2 124M folder."""
    from domainlm.model.loading import save_scratch_folder

    paths = {**make_corpus(work), "gpt2": work / "gpt2-124m"}
    if not (paths["gpt2"] / "config.json").exists():
        save_scratch_folder("gpt2", paths["gpt2"], seed=0)
    return paths


def make_llama(folder: Path, shape: dict, dtype: str = "float32") -> Path:
    """A random-init Llama folder of this shape with GPT-2's tokenizer (seed 0), its weights
    saved in `dtype`, built on the GPU where there is one (initialising billions of parameters
    on the CPU takes minutes)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from domainlm.model.loading import gpt2_tokenizer

    if not (folder / "config.json").exists():
        tokenizer = gpt2_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **shape,
        )
        torch.manual_seed(0)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(getattr(torch, dtype))
        try:
            with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
                model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(default_dtype)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return folder


def make_llama_1b(work: Path) -> Path:
    """A random-init 1B-class Llama folder with GPT-2's tokenizer (seed 0)."""
    return make_llama(work / "llama-1b", LLAMA_1B)


# ----------------------------------------------------------------------------- the two tools


def steady_tokens_per_s(metrics: Path) -> float:
    """Median tokens/s of the logging windows after the first two (compilation, warm-up); NaN
    when the run logged none."""
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    rates = [e["tokens_per_s"] for e in map(json.loads, lines) if "tokens_per_s" in e]
    if not rates:
        return float("nan")
    return statistics.median(rates[2:] if len(rates) > 3 else rates)


def domainlm_train(model: Path, paths: dict[str, Path], out: Path, block: int, batch: int,
                   steps: int, log: Path, extra: tuple[str, ...] = (), timeout: float = 240,
                   lr: float = 5e-5, logging_steps: int = 10) -> dict:  # fmt: skip
    """`python -m domainlm train` with bf16 and no evaluation or checkpoint before the end;
    `extra`: more flags (--compile, --lora, ...)."""
    cmd = [
        sys.executable, "-m", "domainlm", "train", "--model", str(model),
        "--train-file", str(paths["train"]), "--validation-file", str(paths["valid"]),
        "--output-dir", str(out), "--overwrite-output-dir", "--block-size", str(block),
        "--batch-size", str(batch), "--max-steps", str(steps), "--precision", "bf16",
        "--logging-steps", str(logging_steps), "--eval-steps", str(10**6),
        "--save-steps", str(10**6), "--max-eval-tokens", "8000", "--lr", str(lr), "--quiet",
        *extra,
    ]  # fmt: skip
    seconds, memory, timed_out = run(cmd, log, timeout=timeout)
    # stopped by the time budget after its training windows were logged (e.g. while saving): the
    # windows still say how fast it trained
    return {
        "tokens_per_s": steady_tokens_per_s(out / "metrics.jsonl"),
        "memory_gib": memory,
        "seconds": seconds,
        "stopped_at_budget": timed_out,
    }


def measured_peak_gib(out: Path) -> float:
    """domainlm's peak of live GPU tensors (metrics.jsonl's peak_gpu_memory_gib, the largest);
    NaN off a GPU."""
    path = out / "metrics.jsonl"
    events = map(json.loads, path.read_text().splitlines()) if path.exists() else []
    peaks = [e["peak_gpu_memory_gib"] for e in events if "peak_gpu_memory_gib" in e]
    return max(peaks) if peaks else float("nan")


def planned_peak_gib(model: Path, block: int, batch: int, scenario: str) -> float:
    """The memory plan's peak on a GPU (`domainlm inspect --model`'s figure) for this run:
    scenario "full", "full+ckpt", "lora" or "lora+ckpt" (LoRA r 8, dropout 0.05, bf16)."""
    from domainlm.model.memory import model_config_of, plan_memory

    plan = plan_memory(model_config_of(str(model)), model=str(model), batch_size=batch,
                       block_size=block, precision="bf16", device="cuda")  # fmt: skip
    return plan.scenarios[scenario].peak / 2**30


def trainer_train(model: Path, paths: dict[str, Path], out: Path, block: int, batch: int,
                  steps: int, log: Path, **settings: object) -> dict:  # fmt: skip
    """The HF Trainer (as_trainer) in its own process; `settings`: as_trainer's optional keys."""
    spec = {"model": str(model), "train": str(paths["train"]), "out": str(out), "block": block,
            "batch": batch, "steps": steps, **settings}  # fmt: skip
    cmd = [sys.executable, str(Path(__file__).resolve()), "--as-trainer", json.dumps(spec)]
    seconds, memory, _ = run(cmd, log)
    result = json.loads((out / "gpu_check_trainer.json").read_text())
    return {**result, "memory_gib": memory, "seconds": seconds}


def trainer_model(spec: dict):  # type: ignore[no-untyped-def]
    """The Trainer's model: the folder as transformers loads it (float32), or with spec["lora"]
    ({"r", "alpha", "dropout", "targets"}) a bf16 base with peft's LoRA adapters on top."""
    import torch
    from transformers import AutoModelForCausalLM

    if not spec.get("lora"):
        return AutoModelForCausalLM.from_pretrained(spec["model"])
    from peft import LoraConfig, get_peft_model

    lora = spec["lora"]
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.bfloat16)
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=lora["targets"], task_type="CAUSAL_LM")  # fmt: skip
    return get_peft_model(model, config)


def as_trainer(spec: dict) -> None:
    """run_clm.py's pipeline without `datasets`: each line tokenized with the tokenizer's defaults,
    everything concatenated and cut into blocks (the remainder dropped), labels = input_ids,
    default_data_collator, Trainer with bf16 and its default fused AdamW. Optional keys: "lr"
    (5e-5), "gradient_checkpointing" (False), "lora" (trainer_model). Writes tokens/s and the
    number of trainable parameters."""
    import torch
    from transformers import (
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    lines = [line for line in Path(spec["train"]).read_text(encoding="utf-8").splitlines() if line]
    ids = [i for row in tokenizer(lines)["input_ids"] for i in row]
    block = spec["block"]
    blocks = [ids[i : i + block] for i in range(0, len(ids) - block + 1, block)]
    dataset = [{"input_ids": b, "labels": list(b), "attention_mask": [1] * block} for b in blocks]
    model = trainer_model(spec)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    skip = min(20, spec["steps"] // 4)  # the same warm-up share as domainlm's first two windows

    class StepTimes(TrainerCallback):
        """Step-end times; the GPU is waited for at the first timed step and the last only, so
        that the Trainer's host runs ahead of the GPU as it does when nobody is timing it."""

        times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if state.global_step in (skip + 1, spec["steps"]) and torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    timer = StepTimes()
    checkpointing = bool(spec.get("gradient_checkpointing"))
    args = TrainingArguments(
        output_dir=spec["out"],
        per_device_train_batch_size=spec["batch"],
        max_steps=spec["steps"],
        learning_rate=spec.get("lr", 5e-5),
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        bf16=True,
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        seed=42,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),  # a dry run of this script on a CPU
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=default_data_collator,
        callbacks=[timer],
    )
    trainer.train()
    span = timer.times[-1] - timer.times[skip]
    tokens = (len(timer.times) - 1 - skip) * spec["batch"] * block
    Path(spec["out"], "gpu_check_trainer.json").write_text(
        json.dumps(
            {"tokens_per_s": tokens / span, "trainable": trainable, "steps": len(timer.times)}
        )
    )


# ----------------------------------------------------------------------------- perplexity, tests


def perplexity_command(model: Path, valid: Path, precision: str) -> list[str]:
    return [
        sys.executable, "-m", "domainlm", "perplexity", "--model", str(model), "--file",
        str(valid), "--precision", precision, "--batch-size", "8", "--json", "--quiet",
    ]  # fmt: skip


def read_perplexity(log: Path) -> float:
    text = log.read_text()
    return float(json.loads(text[text.index("{") : text.rindex("}") + 1])["perplexity"])


def perplexity(model: Path, valid: Path, precision: str, log: Path) -> float:
    """`domainlm perplexity` on the GPU."""
    run(perplexity_command(model, valid, precision), log, timeout=120)
    return read_perplexity(log)


def perplexity_process(model: Path, valid: Path, log: Path) -> subprocess.Popen:
    """`domainlm perplexity` in fp32 on the CPU (CUDA hidden from it), started in the background."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    return subprocess.Popen(perplexity_command(model, valid, "fp32"), cwd=ROOT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)  # fmt: skip


def perplexity_result(process: subprocess.Popen, log: Path) -> float:
    if process.wait() != 0:
        raise SystemExit(f"CPU perplexity failed:\n{log.read_text()[-2000:]}")
    return read_perplexity(log)


def cuda_tests(log: Path, timeout: float) -> str:
    """`pytest -m cuda`, each test's outcome printed as it comes (a run stopped by the time
    budget still says which tests passed); returns pytest's summary line."""
    cmd = [sys.executable, "-m", "pytest", "-v", "-m", "cuda", "-p", "no:cacheprovider",
           "tests/test_cuda.py"]  # fmt: skip
    outcome = re.compile(r"(PASSED|FAILED|ERROR|SKIPPED)")
    lines: list[str] = []
    with log.open("w") as handle:
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, cwd=ROOT)  # fmt: skip
        timer = threading.Timer(timeout, process.kill)
        timer.start()
        for line in process.stdout or []:
            handle.write(line)
            lines.append(line.strip())
            if "::" in line and outcome.search(line):
                print("  " + line.strip(), flush=True)
        process.wait()
        timer.cancel()
    if process.returncode == -9:
        done = sum(1 for line in lines if "::" in line and outcome.search(line))
        return f"stopped at {timeout:.0f} s after {done} tests"
    return next((ln.strip("= ") for ln in reversed(lines) if ln.strip()), "no output")


# ----------------------------------------------------------------------------- the table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default="/tmp/domainlm-gpu-check")
    parser.add_argument("--batch-size", type=int, default=32, help="GPT-2 124M's batch")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--compile", action="store_true",
                        help="GPT-2 124M with --compile too (the 1B shape always is)")  # fmt: skip
    parser.add_argument("--skip-1b", action="store_true")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-trainer-1b", action="store_true")
    parser.add_argument("--tests-timeout", type=float, default=240, help="seconds for pytest")
    parser.add_argument("--time-budget", type=float, default=330,
                        help="seconds for the whole script; the 1B shape gets what is left")  # fmt: skip
    parser.add_argument("--peak", type=float, default=PEAK_BF16_H100_SXM, help="peak FLOP/s")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--as-trainer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.as_trainer:
        return as_trainer(json.loads(args.as_trainer))

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA GPU")
    started = time.perf_counter()
    work = Path(args.work_dir)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}", flush=True)
    paths = make_inputs(work)
    rows: list[tuple[str, ...]] = []
    results: dict[str, object] = {"gpu": gpu, "torch": torch.__version__}

    def row(*cells: str) -> None:
        rows.append(cells)
        print("| " + " | ".join(cells) + " |", flush=True)

    def compare(label: str, model: Path, block: int, batch: int, steps: int, compile_: bool,
                with_trainer: bool = True, timeout: float = 240) -> None:  # fmt: skip
        flops = model_flops(model, block)
        slug = label.replace(" ", "-")
        ours = domainlm_train(model, paths, work / f"out-{slug}", block, batch, steps,
                              logs / f"domainlm-{slug}.log", ("--compile",) if compile_ else (),
                              timeout)  # fmt: skip
        print(f"domainlm {label}: {ours}", flush=True)
        results[label] = {"domainlm": ours, "flops_per_token": flops}
        if not with_trainer:
            stopped = " (stopped at the time budget)" if ours["stopped_at_budget"] else ""
            row(f"{label}, block {block}, batch {batch}: tokens/s, MFU, GiB{stopped}",
                f"{ours['tokens_per_s']:,.0f}, {ours['tokens_per_s'] * flops / args.peak:.1%}, "
                f"{ours['memory_gib']:.1f}", "not run", "", "reported")  # fmt: skip
            plan_row(f"{label}, block {block}, batch {batch}", model, block, batch,
                     work / f"out-{slug}")  # fmt: skip
            return
        theirs = trainer_train(model, paths, work / f"trainer-{slug}", block, batch, steps,
                               logs / f"trainer-{slug}.log")  # fmt: skip
        print(f"trainer {label}: {theirs}", flush=True)
        results[label]["trainer"] = theirs
        shape = f"{label}, block {block}, batch {batch}"
        row(f"{shape}: tokens/s", f"{ours['tokens_per_s']:,.0f}", f"{theirs['tokens_per_s']:,.0f}",
            f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x", ">= 1.5x")  # fmt: skip
        row(f"{shape}: MFU", f"{ours['tokens_per_s'] * flops / args.peak:.1%}",
            f"{theirs['tokens_per_s'] * flops / args.peak:.1%}", "", ">= 45%")  # fmt: skip
        row(f"{shape}: GPU memory (GiB)", f"{ours['memory_gib']:.1f}",
            f"{theirs['memory_gib']:.1f}", f"{ours['memory_gib'] / theirs['memory_gib']:.2f}x",
            "<= 0.5x")  # fmt: skip
        plan_row(shape, model, block, batch, work / f"out-{slug}")

    def plan_row(shape: str, model: Path, block: int, batch: int, out: Path) -> None:
        planned, measured = planned_peak_gib(model, block, batch, "full"), measured_peak_gib(out)
        results.setdefault("memory_plan", {})[shape] = {"plan": planned, "measured": measured}
        row(f"{shape}: memory plan vs measured peak of live tensors (GiB)", f"{planned:.2f}",
            f"measured {measured:.2f}", f"{planned / measured:.3f}", "within 15% (issue 15)")  # fmt: skip

    compare("GPT-2 124M", paths["gpt2"], 1024, args.batch_size, args.steps, args.compile)
    trained = work / "out-GPT-2-124M"
    # the CPU's perplexity runs beside the GPU work that follows (it uses the CPU's cores)
    cpu_job = perplexity_process(trained, paths["valid"], logs / "ppl-cpu.log")
    gpu32 = perplexity(trained, paths["valid"], "fp32", logs / "ppl-gpu-fp32.log")
    gpu16 = perplexity(trained, paths["valid"], "bf16", logs / "ppl-gpu-bf16.log")
    if not args.skip_tests:
        summary = cuda_tests(logs / "pytest-cuda.log", args.tests_timeout)
        results["cuda_tests"] = summary
        row("pytest -m cuda", summary, "", "", "all pass")
    cpu = perplexity_result(cpu_job, logs / "ppl-cpu.log")
    results["perplexity"] = {"cpu_fp32": cpu, "gpu_fp32": gpu32, "gpu_bf16": gpu16}
    row("perplexity, GPU fp32 vs CPU fp32", f"{gpu32:.6f}", f"CPU {cpu:.6f}",
        f"{abs(gpu32 / cpu - 1):.1e} rel.", "<= 1e-4")  # fmt: skip
    row("perplexity, GPU bf16 vs CPU fp32", f"{gpu16:.6f}", f"CPU {cpu:.6f}",
        f"{abs(gpu16 / cpu - 1):.1e} rel.", "stated")  # fmt: skip
    # The 1B shape last, in the time that is left of --time-budget (it is the longest part).
    left = args.time_budget - (time.perf_counter() - started)
    if args.skip_1b or left < 90:
        row("Llama 1B", "not run" if args.skip_1b else f"skipped: {left:.0f} s of the budget left",
            "", "", "")  # fmt: skip
    else:
        paths["llama"] = make_llama_1b(work)
        left = args.time_budget - (time.perf_counter() - started)
        compare("Llama 1B", paths["llama"], 2048, 8, max(30, args.steps // 3), True,
                not args.skip_trainer_1b, timeout=left)  # fmt: skip
    results["seconds"] = round(time.perf_counter() - started)

    print(f"\n{gpu}, torch {torch.__version__}; bf16; {args.steps} steps; "
          f"whole run {results['seconds']} s\n")  # fmt: skip
    print("| check | domainlm | HF Trainer | ratio | target |\n|---|---|---|---|---|")
    for cells in rows:
        print("| " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
