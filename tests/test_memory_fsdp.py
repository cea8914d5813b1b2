"""The memory plan of one rank under `--strategy fsdp` (model/memory.py's `sharded_terms`): its
arithmetic against counts from the real model, its peaks against measured ones (two gloo ranks
on this CPU), and `train`'s and `inspect`'s use of it (docs/memory.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from conftest import uneven_corpus, write_lines
from transformers import AutoModelForCausalLM

from domainlm.cli import main
from domainlm.config import TrainConfig
from domainlm.model.loading import scratch_config
from domainlm.model.memory import HEADROOM, fitting_flags, plan_memory
from domainlm.run.memory_check import memory_shortfalls, run_plan

ROOT = Path(__file__).resolve().parents[1]


def test_the_fsdp_plan_is_one_ranks_share_and_the_root_stays_whole():
    """Over 4 ranks, full fine-tuning's weights, gradients and AdamW state are a quarter of the
    unsharded plan's; activations and the loss's buffers are each rank's own; autocast's copies
    are gone (the layers are gathered in bf16: `block_mixed_precision`); what every rank holds
    whole is the root unit: the parameters outside the transformer layers, counted here from
    the real model by name. LoRA's rows (LoRA runs under ddp) do not change."""
    cfg = scratch_config("tiny")
    model = AutoModelForCausalLM.from_config(cfg)
    root = sum(p.numel() for n, p in model.named_parameters() if ".h." not in n)
    assert root == cfg.vocab_size * cfg.n_embd + cfg.n_positions * cfg.n_embd + 2 * cfg.n_embd

    def plan(ranks: int):  # type: ignore[no-untyped-def]
        return plan_memory(cfg, model="scratch:tiny", batch_size=4, block_size=64,
                           precision="bf16", fsdp_ranks=ranks)  # fmt: skip

    whole, sharded = plan(1), plan(4)
    assert sharded.fsdp_ranks == 4
    for key in ("full", "full+ckpt"):
        w, s = whole.scenarios[key], sharded.scenarios[key]
        assert (s.weights, s.gradients, s.optimizer) == tuple(
            -(-x // 4) for x in (w.weights, w.gradients, w.optimizer)
        )
        assert s.gathered == 4 * root and w.gathered == 0  # float32 weights, whole on every rank
        assert (s.activations, s.loss_buffers) == (w.activations, w.loss_buffers)
        assert s.weight_copies == 0 < w.weight_copies
        assert s.peak < w.peak
    assert sharded.scenarios["lora"] == whole.scenarios["lora"]
    # LoRA is the answer only under ddp: the flags say so
    sharded.available = int(sharded.scenarios["lora"].fit_bytes / HEADROOM) + 1
    assert sharded.scenarios["full+ckpt"].fit_bytes > HEADROOM * sharded.available
    assert fitting_flags(sharded, lambda batch: plan(4)) == "--lora --strategy ddp"


def test_train_checks_one_ranks_plan_under_fsdp(tmp_path):
    """`train --strategy fsdp` plans one rank of the run's world size (before, it planned
    nothing under fsdp); what does not fit names the ranks it is sharded over."""
    config = TrainConfig(
        model="scratch:tiny", train_file=str(tmp_path / "train.txt"), output_dir=str(tmp_path),
        strategy="fsdp", batch_size=4, block_size=64, precision="bf16",
    )  # fmt: skip
    found = run_plan(config, "bf16", "cpu", ranks=2)
    assert found is not None
    model_config, plan = found
    assert plan.fsdp_ranks == 2
    unsharded = run_plan(replace(config, strategy="ddp"), "bf16", "cpu", ranks=2)
    assert unsharded is not None and unsharded[1].fsdp_ranks == 1
    assert plan.scenarios["full"].peak < unsharded[1].scenarios["full"].peak
    need = plan.scenarios["full"].fit_bytes
    short = replace(plan, available=need)  # short of the 10% headroom

    def replan(batch: int):  # type: ignore[no-untyped-def]
        smaller = plan_memory(model_config, model="scratch:tiny", batch_size=batch,
                              block_size=64, precision="bf16", fsdp_ranks=2)  # fmt: skip
        return replace(smaller, available=need)

    (message,) = memory_shortfalls(config, short, replan, processes=2)
    assert f"needs about {need / 1024**3:.1f} GiB of system RAM per rank " in message
    assert "(--strategy fsdp over 2 ranks, 2 on this machine)" in message


def test_inspect_plans_one_rank_of_fsdp(tmp_path, capsys):
    """`inspect --model M --strategy fsdp --nproc 4` prints one rank's plan and says so; with
    data, the report's memory line is one rank's and says so."""
    shape = ["--model", "scratch:tiny", "--batch-size", "4", "--block-size", "64", "--device",
             "cpu"]  # fmt: skip
    assert main(["inspect", *shape, "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)["memory_plan"]
    assert main(["inspect", *shape, "--strategy", "fsdp", "--nproc", "4", "--json"]) == 0
    sharded = json.loads(capsys.readouterr().out)["memory_plan"]
    assert sharded["fsdp_ranks"] == 4 and whole["fsdp_ranks"] == 1
    full, full_whole = sharded["scenarios"]["full"], whole["scenarios"]["full"]
    assert full["optimizer"] == -(-full_whole["optimizer"] // 4)
    assert main(["inspect", *shape, "--strategy", "fsdp", "--nproc", "4"]) == 0
    text = capsys.readouterr().out
    assert "full fine-tuning, one rank of 4 (fsdp)" in text
    assert "--strategy fsdp over 4 ranks" in text
    train = write_lines(tmp_path / "train.txt", uneven_corpus(40, seed=3))
    data = [*shape, "--train-file", str(train), "--time-steps", "0", "--json"]
    assert main(["inspect", *data]) == 0
    whole_line = json.loads(capsys.readouterr().out)["memory"]
    assert main(["inspect", *data, "--strategy", "fsdp", "--nproc", "4"]) == 0
    line = json.loads(capsys.readouterr().out)["memory"]
    assert (line["fsdp_ranks"], whole_line["fsdp_ranks"]) == (4, 1)
    assert line["optimizer_gib"] == full["optimizer"] / 1024**3 < whole_line["optimizer_gib"]
    assert main(["inspect", *data[:-1], "--strategy", "fsdp", "--nproc", "4"]) == 0
    assert "GiB per rank (--strategy fsdp over 4 ranks)" in capsys.readouterr().out


def test_fsdp_plan_against_measured_peaks_on_the_cpu(tmp_path):
    """benchmarks/memory_peak.py --fsdp on three rows, each one rank of 2 gloo ranks trained 4
    steps: GPT-2 tiny (the loss's buffers dominate), GPT-2 124M at 1 x 64 tokens with
    gradient checkpointing (the sharded state, the root held whole and the layers gathered in
    the backward dominate) and a small Llama in bf16 with float32 weights (its layers gathered
    in bf16, no autocast copies): the plan's peak within 15% of the measured peak of live tensor
    bytes (FSDP's storage resizes followed), and the CPU process bound at or above the
    measured resident peak. The issue asks for 15%; these rows are within 4% (the bytes are
    counted, not timed: the same on any machine with this PyTorch), and 6% is what catches a
    wrong term (the root unit not held whole: -10%; a tied head's two gradients left out:
    -10%; autocast's copies counted under mixed precision: +8.5%)."""
    out = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    measured = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "memory_peak.py"), "--fsdp", "--only", "0,5,7",
         "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert measured.returncode == 0, measured.stderr[-6000:]  # the failing row's own stderr
    rows = json.loads(out.read_text())
    assert [(r["model"], r["precision"], r["ranks"], r["ckpt"], r["batch"]) for r in rows] == [
        ("gpt2:tiny", "fp32", 2, False, 8), ("gpt2:gpt2", "fp32", 2, True, 1),
        ("llama", "bf16", 2, False, 4),
    ]  # fmt: skip
    for row in rows:
        assert 0.94 <= row["plan_peak"] / row["tensor_peak"] <= 1.06, row
        assert row["rss_peak"] <= row["plan_process_bound"], row
