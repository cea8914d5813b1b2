"""Out of memory on one rank under torchrun (issue 12, item 8): all ranks back off together.

Before, the rank out of memory re-split its batch alone: its micro-batches then took other blocks
of the global batch than the other rank's (blocks counted twice, others missed) or the ranks waited
in mismatched collectives until --dist-timeout. 2 gloo processes on the CPU, the tiny dropout-free
model, the error injected on rank 1 only, after its first micro-batch's forward and backward.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from conftest import uneven_corpus, write_lines
from safetensors.torch import load_file

from domainlm import TrainConfig, train

FLAGS = [
    "--block-size", "32", "--max-steps", "3", "--save-steps", "100", "--eval-steps", "100",
    "--logging-steps", "1", "--precision", "fp32", "--lr", "1e-3", "--quiet",
    "--dist-timeout", "60",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(
    model: Path, train_file: Path, out: Path, cache: Path, *extra: str
) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", DOMAINLM_CACHE=str(cache))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(DOMAINLM_INJECT_OOM_AFTER_BACKWARD="1", DOMAINLM_INJECT_OOM_RANK="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--master-port={free_port()}", "-m", "domainlm", "train", "--model", str(model),
        "--train-file", str(train_file), "--validation-split", "0.1", "--output-dir", str(out),
        *FLAGS, *extra,
    ]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def test_oom_on_one_rank_backs_off_every_rank_to_the_same_result(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    train_file = write_lines(tmp_path / "train.txt", uneven_corpus(60, seed=1))
    out = tmp_path / "two-ranks"
    done = torchrun(
        tiny_model_dir,
        train_file,
        out,
        tmp_path / "cache",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("out of memory at micro-batch 2 x accumulation 2; retrying") == 1

    # The reference: one process, the global batch of 8 blocks in micro-batches of 1.
    ref = tmp_path / "one-rank"
    train(
        TrainConfig(
            model=str(tiny_model_dir),
            train_file=str(train_file),
            output_dir=str(ref),
            validation_split=0.1,
            block_size=32,
            batch_size=1,
            grad_accum=8,
            max_steps=3,
            save_steps=100,
            eval_steps=100,
            logging_steps=1,
            precision="fp32",
            lr=1e-3,
            quiet=True,
        )  # fmt: skip
    )
    wa, wb = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    diff = torch.cat([(wa[k] - wb[k]).flatten() for k in wa])
    weights = torch.cat([wb[k].flatten() for k in wb])
    assert (diff.norm() / weights.norm()).item() < 1e-5  # as tests/test_distributed.py bounds it
    assert (diff.abs().max() / weights.abs().max()).item() < 1e-4


def test_oom_on_one_rank_under_fsdp_stops_with_one_line(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """FSDP's passes hold collectives, so the ranks cannot re-split in step: the rank out of
    memory says so in one line and the run ends (the other rank loses contact), no hang."""
    train_file = write_lines(tmp_path / "train.txt", uneven_corpus(60, seed=1))
    done = torchrun(
        tiny_model_dir, train_file, tmp_path / "out", tmp_path / "cache",
        "--batch-size", "2", "--grad-accum", "2", "--strategy", "fsdp",
    )  # fmt: skip
    assert done.returncode != 0
    lines = [x for x in done.stderr.splitlines() if "out of memory on rank 1" in x]
    assert len(lines) == 1 and lines[0].startswith("domainlm: stopped: out of memory on rank 1")
    assert "under --strategy fsdp" in lines[0] and "raise --grad-accum" in lines[0]
