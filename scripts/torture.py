"""Kill a training run at random moments; check that every resume ends bit-identical.

    .venv/bin/python scripts/torture.py --kills 20 [--seed 0] [--workdir /tmp/torture] [--async-save]

One uninterrupted reference run first. Then, for each of the `--kills` trials: start the same run
in a fresh folder, draw a step k uniformly from 1 .. steps-1 and a fraction f of a step from
[0, 1), wait until the run's own metrics.jsonl logs step k, then SIGKILL it f times the
reference's mean step time later (so kills land in steps, evaluations, checkpoint saves and
rotation, over the killed run's own steps, not over a clock that runs past its end), then run the
same command again until it finishes. Each trial passes when the final model.safetensors is
bit-identical to the reference's and metrics.jsonl holds the same events (step, loss and
perplexity, exactly) with no step missing or repeated. The report counts the resumes that had
steps left to train. CPU, fp32, dropout on (scratch:tiny's default 0.1). Exit code 0 when every
trial passed. With --async-save the killed and resumed runs save in the background (the reference
stays synchronous), so kills also land while a checkpoint is written from its host copy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from domainlm.demo import word_documents

DOMAINLM = [sys.executable, "-m", "domainlm"]
STEPS = 8


def write_corpus(folder: Path) -> tuple[Path, Path]:
    docs = word_documents(48, seed=0)
    train, valid = folder / "train.txt", folder / "valid.txt"
    train.write_text("".join(d + "\n" for d in docs[:40]))
    valid.write_text("".join(d + "\n" for d in docs[40:]))
    return train, valid


def train_args(train: Path, valid: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        *DOMAINLM,
        "train",
        "--model", "scratch:tiny",
        "--train-file", str(train),
        "--validation-file", str(valid),
        "--output-dir", str(output_dir),
        "--block-size", "32",
        "--batch-size", "2",
        "--grad-accum", "2",
        "--max-steps", str(STEPS),
        "--save-steps", "2",
        "--eval-steps", "3",
        "--save-total-limit", "2",
        "--logging-steps", "1",
        "--lr", "1e-3",
        "--precision", "fp32",
        "--quiet",
        *extra,
    ]  # fmt: skip


def run_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ, DOMAINLM_CACHE=str(cache), HF_HUB_OFFLINE="1")
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def events(output_dir: Path) -> list[tuple]:
    """metrics.jsonl without the timing field: what must match the reference exactly."""
    rows = []
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        e = json.loads(line)
        e.pop("tokens_per_s", None)
        rows.append(tuple(sorted(e.items())))
    return rows


def logged_steps(output_dir: Path) -> list[int]:
    """Training steps logged so far (a line being written is not one yet)."""
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            break
        if "loss" in event:
            steps.append(int(event["step"]))
    return steps


def wait_for_step(output_dir: Path, step: int, proc: subprocess.Popen) -> bool:
    """Until the run logs `step`; False if it ended first."""
    while step not in logged_steps(output_dir):
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    return True


def resumed_at(stderr: str) -> int:
    """The step the second run started from (0 when it found no checkpoint)."""
    found = re.search(r"resuming from \S+ at step (\d+)", stderr)
    return int(found.group(1)) if found else 0


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/domainlm-torture"))
    parser.add_argument("--async-save", action="store_true", help="trials save in the background")
    args = parser.parse_args()
    extra = ["--async-save"] if args.async_save else []
    rng = random.Random(args.seed)
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    train, valid = write_corpus(work)
    env = run_env(work / "cache")

    ref = work / "reference"
    done = subprocess.run(train_args(train, valid, ref), env=env, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"the reference run failed:\n{done.stderr[-3000:]}")
        return 2
    # Time a step of a run: from its first logged step to its last (no start-up, no final save).
    timing = work / "timing"
    proc = subprocess.Popen(train_args(train, valid, timing), env=env, stderr=subprocess.DEVNULL)
    wait_for_step(timing, 1, proc)
    t0 = time.monotonic()
    wait_for_step(timing, STEPS, proc)
    step_time = (time.monotonic() - t0) / (STEPS - 1)
    proc.wait()
    print(f"reference run: {step_time:.2f} s a step (evaluations and saves included)", flush=True)

    failures = with_steps_left = 0
    for trial in range(args.kills):
        out = work / f"trial-{trial:02d}"
        kill_step, fraction = rng.randint(1, STEPS - 1), rng.random()
        cmd = train_args(train, valid, out, *extra)
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
        wait_for_step(out, kill_step, proc)
        time.sleep(fraction * step_time)
        finished_first = proc.poll() is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reached = max(logged_steps(out), default=0)
        left = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        partial = [n for n in left if n.startswith(".") and n != ".domainlm.lock"]
        complete = [n for n in left if n.startswith("checkpoint-")]
        again = subprocess.run(cmd, env=env, capture_output=True, text=True)
        ok = again.returncode == 0 and same_weights(out, ref) and events(out) == events(ref)
        failures += not ok
        start = resumed_at(again.stderr)
        with_steps_left += start < STEPS
        print(
            f"trial {trial:2d}: killed {fraction:.2f} of a step after step {kill_step} "
            f"(it had logged step {reached}){' (after it finished)' if finished_first else ''}; "
            f"left {complete}{' + partial ' + str(partial) if partial else ''}; resumed at step "
            f"{start} ({STEPS - start} steps left): "
            f"{'identical' if ok else 'MISMATCH rc=' + str(again.returncode)}",
            flush=True,
        )
        if not ok:
            print(again.stderr[-2000:], flush=True)
        else:
            shutil.rmtree(out)
    print(
        f"{args.kills - failures}/{args.kills} trials bit-identical; "
        f"{with_steps_left}/{args.kills} resumed with steps left to train",
        flush=True,
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
