"""Sharded checkpoints under real torchrun processes (gloo on CPU), issue 17 item 2.

Under FSDP (`--strategy fsdp`, --checkpoint-format auto) each of 2 ranks writes its own shard
file: no gather to rank 0. The checkpoint of step 2 then resumes on 2 ranks bit-identically, and
on 1 rank (2 -> 1) within the bounds tests/test_distributed.py uses for runs whose ranks sum in a
different order; a 1-process sharded checkpoint resumes on 2 FSDP ranks (1 -> 2) within them
too. The tiny model is dropout-free (the runs must agree), 4 steps of 4 blocks, fp32. The final
model of an FSDP run is a plain Hugging Face folder (its weights gathered), as before.

Also here, what FSDP and DDP runs read and where they shard: rank 0 alone reads the weights,
and a `--device cpu` FSDP run keeps its shards on the CPU where a GPU is seen.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import ModuleTemp, uneven_corpus, write_lines
from safetensors.torch import load_file
from test_distributed import (
    LAUNCH_TIMEOUT,
    assert_same_losses,
    assert_same_weights,
    free_port,
    launch_env,
    one_process_config,
    run_ok,
    torchrun_cmd,
    train_losses,
)
from tiny_families import save_family_folder

from domainlm.run import checkpoint as ckpt
from domainlm.run.sharded import is_sharded_checkpoint
from domainlm.run.train import train

# In-process reference runs on one thread, as each rank runs (conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread_like_the_ranks")


@pytest.fixture(scope="module")
def data(tiny_model_dir: Path, module_tmp: ModuleTemp) -> dict[str, Path]:
    root = module_tmp.mktemp("sharded-dist")
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


SEES_A_GPU = """import torch

torch._C._get_accelerator = lambda: torch.device("cuda")  # what FSDP asks on a GPU machine
"""


def test_a_cpu_fsdp_run_on_a_machine_with_a_gpu_keeps_its_shards_on_the_cpu(
    data: dict[str, Path], fsdp_run: Path, tmp_path: Path
) -> None:
    """FSDP's default device mesh is the machine's accelerator, whatever the run's device: on a
    GPU machine a `--device cpu --strategy fsdp` run (gloo) had its shards moved to the GPU. The
    mesh is now the run's device. Here every process is told, as on a GPU machine, that the
    accelerator is CUDA (a sitecustomize.py); the run trains on the CPU as the plain run does."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SEES_A_GPU)
    env = launch_env(data["cache"])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    out = tmp_path / "cpu"
    launcher = ["torch.distributed.run", "--nproc_per_node=2", f"--master-port={free_port()}"]
    run_ok(torchrun_cmd(launcher, data, out, "--strategy", "fsdp", "--device", "cpu"), env)
    assert train_losses(out) == train_losses(fsdp_run)


COUNTS_WEIGHT_READS = """import os

import safetensors

_open = safetensors.safe_open


def safe_open(path, *args, **kwargs):  # transformers reads model.safetensors through this
    if os.path.basename(str(path)) == "model.safetensors":
        with open(os.environ["WEIGHT_READS_LOG"], "a") as log:
            log.write(os.environ.get("RANK", "-") + "\\n")
    return _open(path, *args, **kwargs)


safetensors.safe_open = safe_open
"""


def test_rank_0_alone_reads_the_weights_under_fsdp_and_ddp_and_a_llama_equals_one_process(
    data: dict[str, Path], tmp_path: Path
) -> None:
    """Every rank read the whole model into system RAM (8 copies of an 8B model on a machine of
    8 GPUs). Now rank 0 reads it; the other ranks build it on the meta device and receive it
    from rank 0: under FSDP their shards and the buffers (a Llama's rotary frequencies, which no
    state dict carries), under DDP everything, by DDP's own broadcast. The weights file is opened
    by rank 0 alone (a sitecustomize.py logs each rank's reads), and a tiny Llama trained so on 2
    ranks equals one process: FSDP in float32 and in pure bf16, DDP in float32, full and LoRA."""
    model = save_family_folder("llama", tmp_path / "llama")
    llama = {**data, "model": model}
    os.environ["DOMAINLM_CACHE"] = str(data["cache"])
    single = train(one_process_config(llama, tmp_path / "single"))
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(COUNTS_WEIGHT_READS)
    reads = tmp_path / "reads.log"
    env = launch_env(data["cache"])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    env["WEIGHT_READS_LOG"] = str(reads)
    out = tmp_path / "fsdp"
    launcher = ["torch.distributed.run", "--nproc_per_node=2", f"--master-port={free_port()}"]
    run_ok(torchrun_cmd(launcher, llama, out, "--strategy", "fsdp"), env)
    assert reads.read_text().split() == ["0"]
    assert_same_weights(out, single.output_dir)
    assert_same_losses(train_losses(out), train_losses(single.output_dir))
    # Pure bf16: rank 0 reads bfloat16 weights but float32 rotary frequencies; the meta model
    # takes rank 0's dtype tensor by tensor (a bf16 buffer would not match rank 0's float32 one)
    pure = dict(precision="bf16", load_dtype="bfloat16")
    single = train(replace(one_process_config(llama, tmp_path / "single-bf16"), **pure))
    out = tmp_path / "fsdp-bf16"
    launcher = ["torch.distributed.run", "--nproc_per_node=2", f"--master-port={free_port()}"]
    flags = ["--strategy", "fsdp", "--precision", "bf16", "--load-dtype", "bfloat16"]
    run_ok(torchrun_cmd(launcher, llama, out, *flags), env)
    assert reads.read_text().split() == ["0", "0"]
    assert_same_losses(train_losses(out), train_losses(single.output_dir), rel=1e-2)
    out = tmp_path / "ddp"  # the default strategy under torchrun
    launcher = ["torch.distributed.run", "--nproc_per_node=2", f"--master-port={free_port()}"]
    run_ok(torchrun_cmd(launcher, llama, out), env)
    assert reads.read_text().split() == ["0", "0", "0"]
    assert_same_weights(out, tmp_path / "single")
    # LoRA under DDP: rank 0 reads the base (and again to merge); rank 1's base and adapters,
    # frozen or not, arrive by DDP's broadcast
    single = train(replace(one_process_config(llama, tmp_path / "single-lora"), lora=True))
    out = tmp_path / "ddp-lora"
    launcher = ["torch.distributed.run", "--nproc_per_node=2", f"--master-port={free_port()}"]
    run_ok(torchrun_cmd(launcher, llama, out, "--lora"), env)
    lora_reads = reads.read_text().split()[3:]
    assert lora_reads and set(lora_reads) == {"0"}
    assert_same_losses(train_losses(out), train_losses(single.output_dir))
    assert_same_weights(out / "merged", single.output_dir / "merged")
    # resumed from checkpoint-2: rank 0 reads the checkpoint's adapters, rank 1 receives them
    resumed = tmp_path / "ddp-lora-resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    shutil.rmtree(resumed / "merged")
    (resumed / "adapter_model.safetensors").unlink()
    launcher = ["torch.distributed.run", "--nproc_per_node=2", f"--master-port={free_port()}"]
    run_ok(torchrun_cmd(launcher, llama, resumed, "--lora"), env)
    assert "1" not in reads.read_text().split()
    assert_same_losses(train_losses(resumed), train_losses(out))
    assert_same_weights(resumed / "merged", out / "merged")


def test_packing_docs_refused_on_rank_0_stops_every_rank(data: dict[str, Path], tmp_path: Path):
    """`--packing docs`' check runs the model, which only rank 0 holds under torchrun: rank 0
    refuses an OPT model (its attention ignores restarting position ids) with its own line, the
    other rank stops with one that points to it; both say what to use, nothing is written."""
    opt = {**data, "model": save_family_folder("opt", tmp_path / "opt")}
    out = tmp_path / "refused"
    launcher = ["torch.distributed.run", "--nproc_per_node=2", f"--master-port={free_port()}"]
    cmd = torchrun_cmd(launcher, opt, out, "--packing", "docs")
    proc = subprocess.run(cmd, env=launch_env(data["cache"]), capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT)  # fmt: skip
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "domainlm: error:" in line]
    assert any("does not separate packed documents" in line for line in errors), proc.stderr
    assert any("refused on rank 0 (its message says why)" in line for line in errors)
    assert all("use --packing concat" in line for line in errors) and len(errors) == 2
    frames = [line for line in proc.stderr.splitlines() if line.lstrip().startswith('File "')]
    package = str(Path(__file__).resolve().parents[1] / "domainlm") + os.sep
    assert not [f for f in frames if package in f], proc.stderr  # torchrun's own report only
    assert not (out / "run_config.json").exists()


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
