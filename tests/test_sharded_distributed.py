"""Sharded checkpoints under real torchrun processes (gloo on CPU), issue 17 item 2.

Under FSDP (`--strategy fsdp`, --checkpoint-format auto) each of 2 ranks writes its own shard
file: no gather to rank 0. The checkpoint of step 2 then resumes on 2 ranks bit-identically, and
on 1 rank (2 -> 1) within the bounds tests/test_distributed.py uses for runs whose ranks sum in a
different order; a 1-process sharded checkpoint resumes on 2 FSDP ranks (1 -> 2) within them
too. The tiny model is dropout-free (the runs must agree), 4 steps of 4 blocks, fp32. The final
model of an FSDP run is a plain Hugging Face folder (its weights gathered), as before.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import uneven_corpus, write_lines
from safetensors.torch import load_file
from test_distributed import (
    assert_same_losses,
    assert_same_weights,
    free_port,
    launch_env,
    one_process_config,
    run_ok,
    torchrun_cmd,
    train_losses,
)

from domainlm.run import checkpoint as ckpt
from domainlm.run.sharded import is_sharded_checkpoint
from domainlm.run.train import train


@pytest.fixture(scope="module")
def data(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sharded-dist")
    return {
        "model": tiny_model_dir,
        "train": write_lines(root / "train.txt", uneven_corpus(60, seed=1)),
        "valid": write_lines(root / "valid.txt", uneven_corpus(20, seed=2)),
        "cache": root / "cache",
        "root": root,
    }


def fsdp2(data: dict[str, Path], out: Path) -> str:
    launcher = ["torch.distributed.run", "--nproc_per_node=2", f"--master-port={free_port()}"]
    cmd = torchrun_cmd(launcher, data, out, "--strategy", "fsdp")
    return run_ok(cmd, launch_env(data["cache"]))


@pytest.fixture(scope="module")
def fsdp_run(data: dict[str, Path]) -> Path:
    out = data["root"] / "fsdp"
    fsdp2(data, out)
    return out


def cut_after_step_2(finished: Path, out: Path) -> Path:
    """A copy of a finished run as if it had been stopped after checkpoint-2."""
    shutil.copytree(finished, out)
    shutil.rmtree(out / "checkpoint-4")
    (out / "model.safetensors").unlink()
    return out


def test_each_fsdp_rank_writes_its_own_shards(fsdp_run: Path) -> None:
    step2 = fsdp_run / "checkpoint-2"
    assert is_sharded_checkpoint(step2) and ckpt.checkpoint_problem(step2) is None
    names = sorted(p.name for p in step2.iterdir())
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(names)
    assert "model.safetensors" not in names  # nothing gathered to rank 0
    # each rank's file holds about half of the weights and optimizer state
    sizes = [(step2 / f"__{r}_0.distcp").stat().st_size for r in (0, 1)]
    assert 0.6 < sizes[0] / sizes[1] < 1.6
    state = ckpt.load_training_state(step2)
    assert (state["world_size"], state["step"], state["offset"]) == (2, 2, 8)
    weights = load_file(fsdp_run / "model.safetensors")  # the final model: whole tensors
    assert weights["transformer.h.1.mlp.c_fc.weight"].shape == (64, 256)


def test_sharded_checkpoint_of_2_ranks_resumed_by_1_rank(
    data: dict[str, Path], fsdp_run: Path, tmp_path: Path
) -> None:
    out = cut_after_step_2(fsdp_run, tmp_path / "resumed")
    os.environ["DOMAINLM_CACHE"] = str(data["cache"])
    result = train(one_process_config(data, out))  # no FSDP: --checkpoint-format auto = full
    assert result.resumed_from == out / "checkpoint-2"
    assert not is_sharded_checkpoint(out / "checkpoint-4")
    assert_same_losses(train_losses(out), train_losses(fsdp_run))
    assert_same_weights(out, fsdp_run)


def test_sharded_checkpoint_of_2_ranks_resumed_by_2_ranks_bit_identical(
    data: dict[str, Path], fsdp_run: Path, tmp_path: Path
) -> None:
    out = cut_after_step_2(fsdp_run, tmp_path / "resumed")
    log = fsdp2(data, out)
    assert f"resuming from {out / 'checkpoint-2'} at step 2" in log
    wa, wb = load_file(out / "model.safetensors"), load_file(fsdp_run / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert train_losses(out) == train_losses(fsdp_run)


def test_sharded_checkpoint_of_1_process_resumed_by_2_fsdp_ranks(
    data: dict[str, Path], fsdp_run: Path, tmp_path: Path
) -> None:
    single = tmp_path / "single"
    os.environ["DOMAINLM_CACHE"] = str(data["cache"])
    config = one_process_config(data, single)
    config.checkpoint_format = "sharded"
    train(config)
    assert is_sharded_checkpoint(single / "checkpoint-2")
    assert sorted(p.name for p in (single / "checkpoint-2").glob("*.distcp")) == ["__0_0.distcp"]
    out = cut_after_step_2(single, tmp_path / "resumed")
    log = fsdp2(data, out)
    assert f"resuming from {out / 'checkpoint-2'} at step 2" in log
    assert_same_losses(train_losses(out), train_losses(single))
    assert_same_weights(out, single)
    assert_same_weights(out, fsdp_run)


@pytest.mark.parametrize("checkpoint_format", ["sharded", "full"])
def test_load_best_model_at_end_under_fsdp_equals_one_process(
    data: dict[str, Path], tmp_path: Path, checkpoint_format: str
) -> None:
    """--load-best-model-at-end under FSDP: a sharded best checkpoint is read by each rank (its
    own part), a full one by rank 0 and scattered to the shards; either way the model saved and
    its score are one process's, whose best checkpoint is the same step."""
    best = dict(max_steps=12, lr=3e-2, eval_steps=1, save_steps=1, scheduler="constant",
                warmup_steps=0, early_stopping_patience=2)  # fmt: skip
    os.environ["DOMAINLM_CACHE"] = str(data["cache"])
    single = train(replace(one_process_config(data, tmp_path / "single"), **best,
                           load_best_model_at_end=True))  # fmt: skip
    assert single.model_step is not None and single.model_step < single.steps  # not the last
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in best.items()]
    launcher = ["torch.distributed.run", "--nproc_per_node=2", f"--master-port={free_port()}"]
    out = tmp_path / "fsdp"
    cmd = torchrun_cmd(launcher, data, out, "--strategy", "fsdp", *flags,
                       f"--checkpoint-format={checkpoint_format}", "--load-best-model-at-end")  # fmt: skip
    log = run_ok(cmd, launch_env(data["cache"]))
    assert f"the model saved is checkpoint-{single.model_step}'s" in log
    assert is_sharded_checkpoint(out / "checkpoint-1") == (checkpoint_format == "sharded")
    assert_same_weights(out, single.output_dir, rel_max=1e-3)  # lr 3e-2 amplifies rounding
    results = json.loads((out / "eval_results.json").read_text())
    assert results["model_checkpoint"]["step"] == single.model_step
    assert results["perplexity"] == pytest.approx(single.final_perplexity, rel=1e-4)
