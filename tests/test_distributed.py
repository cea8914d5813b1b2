"""Data-parallel training under real torchrun processes (gloo on CPU): DDP, FSDP, several nodes.

Every run trains the same tiny dropout-free model for 4 steps of 4 blocks in fp32, so the runs
must agree with each other: 2 ranks == 1 rank with 2 accumulated micro-batches == 2 "nodes" ==
FSDP, and a 2-rank run resumed by 1 rank == the uninterrupted run. The expensive launches are
module fixtures shared by several tests. One step's gradients (with and without dropout) are
compared before the optimizer by tests/step_gradients.py; an untied-head model runs an epoch
whose last batch leaves a rank empty.

Weights are compared as a relative L2 distance over the whole model (1e-5) and a max-abs
difference relative to the largest weight (1e-4, a tenth of one Adam step at lr 1e-3): per
element, a weight whose gradient is zero in theory (attention's key biases) or nearly zero is
float noise in practice, which Adam divides by its own tiny second moment and turns into steps
of up to +-lr whose signs depend on the summation order of two ranks (one value weight of 12,288
moved 1.4e-5 apart, the rest at most 3e-6). A parameter left out of the gradient sync, or a
wrong average, moves every element by about lr per step: 10x over the bound.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ModuleTemp, uneven_corpus, write_lines
from safetensors.torch import load_file
from step_gradients import step_gradients

from domainlm.config import TrainConfig
from domainlm.data.blocks import IGNORE_INDEX, BlockDataset, epoch_order
from domainlm.data.tokens import read_documents, tokenize_documents
from domainlm.errors import TrainingAborted
from domainlm.model.distributed import DistContext, rank_lost, setup_distributed
from domainlm.model.loading import gpt2_tokenizer, save_scratch_folder
from domainlm.run.metrics import read_events
from domainlm.run.train import train

# In-process reference runs on one thread, as each rank runs (conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread_like_the_ranks")

STEPS = 4
RUN_FLAGS = [
    "--block-size", "32", "--batch-size", "2", "--max-steps", str(STEPS), "--save-steps", "2",
    "--logging-steps", "1", "--precision", "fp32", "--lr", "1e-3", "--quiet",
]  # fmt: skip
LAUNCH_TIMEOUT = 240


# ----------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", DOMAINLM_CACHE=str(cache))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def torchrun_cmd(launcher: list[str], data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", *launcher, "-m", "domainlm",
        "train", "--model", str(data["model"]), "--train-file", str(data["train"]),
        "--validation-file", str(data["valid"]), "--output-dir", str(out), *RUN_FLAGS, *extra,
    ]  # fmt: skip


def run_ok(cmd: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def train_losses(out: Path) -> dict[int, float]:
    events = read_events(out / "metrics.jsonl")
    return {e["step"]: e["loss"] for e in events if "loss" in e}


def eval_events(out: Path) -> dict[int, dict]:
    events = read_events(out / "metrics.jsonl")
    return {e["step"]: e for e in events if "eval_ppl" in e}


def assert_same_weights(a: Path, b: Path, rel: float = 1e-5, rel_max: float = 1e-4) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    diff = torch.cat([(wa[k] - wb[k]).flatten() for k in wa])
    ref = torch.cat([wb[k].flatten() for k in wb])
    assert (diff.norm() / ref.norm()).item() < rel
    assert (diff.abs().max() / ref.abs().max()).item() < rel_max


def assert_same_losses(a: dict[int, float], b: dict[int, float], rel: float = 1e-5) -> None:
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=rel), step


# ----------------------------------------------------------------------------- shared runs


@pytest.fixture(scope="module")
def data(tiny_model_dir: Path, module_tmp: ModuleTemp) -> dict[str, Path]:
    root = module_tmp.mktemp("dist-data")
    return {
        "model": tiny_model_dir,
        "train": write_lines(root / "train.txt", uneven_corpus(60, seed=1)),
        "valid": write_lines(root / "valid.txt", uneven_corpus(20, seed=2)),
        "cache": root / "cache",
        "root": root,
    }


@pytest.fixture(scope="module")
def ddp_run(data: dict[str, Path]) -> tuple[Path, str]:
    """torchrun --nproc_per_node=2, DDP: the reference the other runs must match."""
    out = data["root"] / "ddp"
    launcher = ["torch.distributed.run", "--nproc_per_node=2", f"--master-port={free_port()}"]
    log = run_ok(torchrun_cmd(launcher, data, out), launch_env(data["cache"]))
    return out, log


@pytest.fixture(scope="module")
def single_run(data: dict[str, Path]) -> Path:
    """One process, 2 accumulated micro-batches: the same global batch of 4 blocks."""
    out = data["root"] / "single"
    os.environ["DOMAINLM_CACHE"] = str(data["cache"])
    train(one_process_config(data, out))
    return out


def one_process_config(data: dict[str, Path], out: Path) -> TrainConfig:
    return TrainConfig(
        model=str(data["model"]),
        train_file=str(data["train"]),
        validation_file=str(data["valid"]),
        output_dir=str(out),
        block_size=32,
        batch_size=2,
        grad_accum=2,
        max_steps=STEPS,
        save_steps=2,
        logging_steps=1,
        precision="fp32",
        lr=1e-3,
        quiet=True,
    )


@pytest.fixture(scope="module")
def fsdp_run(data: dict[str, Path]) -> Path:
    """FSDP on 2 ranks, started by the seed's launcher (torch.distributed.launch: --local-rank).

    Full checkpoints (gathered to rank 0), which FSDP writes on request; its default, sharded
    checkpoints, is tested in tests/test_sharded_distributed.py."""
    out = data["root"] / "fsdp"
    launcher = ["torch.distributed.launch", "--nproc_per_node=2", f"--master-port={free_port()}"]
    cmd = torchrun_cmd(launcher, data, out, "--strategy", "fsdp", "--checkpoint-format", "full")
    run_ok(cmd, launch_env(data["cache"]))
    return out


# ----------------------------------------------------------------------------- the tests


def test_two_ranks_equal_one_rank_with_accumulation(
    ddp_run: tuple[Path, str], single_run: Path
) -> None:
    ddp_out, log = ddp_run
    assert "global batch 2 x 1 accum x 2 ranks = 4 blocks" in log
    assert_same_losses(train_losses(ddp_out), train_losses(single_run))
    assert_same_weights(ddp_out, single_run)
    moved = load_file(ddp_out / "model.safetensors")["transformer.h.0.mlp.c_fc.weight"]
    assert not torch.equal(moved, load_file(ddp_out / "checkpoint-2" / "model.safetensors")[
        "transformer.h.0.mlp.c_fc.weight"])  # fmt: skip


def test_two_ranks_stop_early_at_the_step_one_rank_does(
    data: dict[str, Path], tmp_path: Path
) -> None:
    """--early-stopping-patience under DDP: every rank decides on the same all-reduced
    perplexity, so both stop after the same step (no rank left waiting in a collective), the
    step one process with the same global batch stops at. With --load-best-model-at-end rank 0
    reads the best checkpoint and rank 1 receives its weights: the model saved and its score
    are the single process's."""
    early = dict(max_steps=12, lr=3e-2, eval_steps=1, save_steps=1, scheduler="constant",
                 warmup_steps=0, early_stopping_patience=2,
                 load_best_model_at_end=True)  # fmt: skip
    os.environ["DOMAINLM_CACHE"] = str(data["cache"])
    single = train(replace(one_process_config(data, tmp_path / "single"), **early))
    assert single.stopped_early and single.steps < 12 and single.model_step < single.steps
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in early.items() if v is not True]
    flags.append("--load-best-model-at-end")
    launcher = ["torch.distributed.run", "--nproc_per_node=2", f"--master-port={free_port()}"]
    out = tmp_path / "ddp"
    log = run_ok(torchrun_cmd(launcher, data, out, *flags), launch_env(data["cache"]))
    assert f"step {single.steps}: stopping early" in log
    assert max(eval_events(out)) == single.steps
    assert_same_weights(out, single.output_dir, rel_max=1e-3)  # lr 3e-2 amplifies rounding
    results = json.loads((out / "eval_results.json").read_text())
    assert results["model_checkpoint"]["step"] == single.model_step
    assert results["perplexity"] == pytest.approx(single.final_perplexity, rel=1e-4)
    # Stopped a step before and resumed (with a --max-eval-tokens cut that holds the whole set):
    # only rank 0 reads metrics.jsonl, and every rank must decide by its evaluations so far. Rank
    # 1 once counted no patience spent and trained on while rank 0 stopped: a collective
    # mismatch (gloo's "Received data size doesn't match"), the run never finishing.
    resumed, cut = tmp_path / "resumed", "--max-eval-tokens=100000"
    before = [f if not f.startswith("--max-steps=") else f"--max-steps={single.steps - 1}"
              for f in flags]  # fmt: skip
    for step_flags in (before, flags):
        launcher = ["torch.distributed.run", "--nproc_per_node=2", f"--master-port={free_port()}"]
        cmd = torchrun_cmd(launcher, data, resumed, *step_flags, cut)
        log = run_ok(cmd, launch_env(data["cache"]))
    assert f"step {single.steps}: stopping early" in log
    assert max(eval_events(resumed)) == single.steps
    assert_same_weights(resumed, single.output_dir, rel_max=1e-3)


@pytest.fixture(scope="module")
def dropout_model_dir(module_tmp: ModuleTemp) -> Path:
    """scratch:tiny with GPT-2's own dropout (0.1 on embeddings, attention, residuals)."""
    return save_scratch_folder("tiny", module_tmp.mktemp("tiny-dropout"), seed=0)


def full_batch_gradients(model_dir: Path, train_file: Path) -> dict[str, torch.Tensor]:
    """The obvious reference for step_gradients: one forward over all 4 blocks in eval mode
    (no dropout), full logits, float64 cross-entropy summed over every target / their count."""
    import step_gradients as sg
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    stream = tokenize_documents(read_documents(train_file), gpt2_tokenizer(), 50256, np.int64)
    dataset = BlockDataset(stream, sg.BLOCK_SIZE)
    batch = dataset.batch(epoch_order(len(dataset), 0, sg.SEED)[: sg.GLOBAL_BLOCKS].tolist())
    logits = model(input_ids=batch.input_ids).logits.double()
    nll = F.cross_entropy(logits.transpose(1, 2), batch.targets, ignore_index=IGNORE_INDEX,
                          reduction="sum")  # fmt: skip
    (nll / (batch.targets != IGNORE_INDEX).sum()).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Max elementwise error relative to the largest entry of `expected`."""
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("dropout", [False, True], ids=["no-dropout", "dropout"])
def test_two_ranks_give_the_gradients_of_one_rank_with_accumulation(
    dropout: bool, data: dict[str, Path], dropout_model_dir: Path, tmp_path: Path
) -> None:
    """One step's summed gradients, before clipping and AdamW (which would hide a wrong scale):
    2 DDP ranks x 1 micro-batch == 1 rank x 2 micro-batches of the same blocks, to float
    rounding (1e-5 of the largest entry; a wrong rank average is off by 2x). With dropout on,
    each micro-batch draws its masks from its slot in the global batch, not from its rank, so
    the two splits agree there too (docs/distributed.md)."""
    model_dir = dropout_model_dir if dropout else data["model"]
    out = tmp_path / "grads.pt"
    worker = Path(__file__).parent / "step_gradients.py"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--master-port={free_port()}", str(worker), str(model_dir), str(data["train"]), str(out),
        "1",
    ]  # fmt: skip
    run_ok(cmd, launch_env(data["cache"]))
    two_ranks = torch.load(out, weights_only=True)
    one_rank = step_gradients(str(model_dir), str(data["train"]), grad_accum=2)
    reference = full_batch_gradients(model_dir, data["train"])
    assert two_ranks.keys() == one_rank.keys() == reference.keys()
    for name, g in one_rank.items():
        assert relative_error(two_ranks[name], g) < 1e-5, name
    # Without dropout both equal the full-batch reference; with it, the masks really matter.
    worst = max(relative_error(one_rank[n], reference[n]) for n in reference)
    assert worst < 1e-5 if not dropout else worst > 1e-2


@pytest.fixture(scope="module")
def untied_model_dir(module_tmp: ModuleTemp) -> Path:
    """A tiny Llama-shape model whose output layer is its own weight (tie_word_embeddings off)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = module_tmp.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=50257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=50256, eos_token_id=50256,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    model.save_pretrained(folder)
    gpt2_tokenizer().save_pretrained(folder)
    return folder


def test_untied_head_trains_when_a_rank_gets_no_block(
    untied_model_dir: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    """21 blocks in global batches of 4: the last step gives rank 1 an empty micro-batch. Its
    zero loss must still reach every parameter, the untied head included, or DDP's gradient sync
    goes out of step (gloo: a collective mismatch that kills the run). The run must also equal
    one rank with 2 accumulated micro-batches (which scores the empty slot the same way)."""
    train_file = write_lines(tmp_path / "train.txt", uneven_corpus(30, seed=1))
    out, single = tmp_path / "ddp", tmp_path / "single"
    launcher = ["torch.distributed.run", "--nproc_per_node=2", f"--master-port={free_port()}"]
    cmd = torchrun_cmd(launcher, {**data, "model": untied_model_dir, "train": train_file}, out)
    at = cmd.index("--max-steps")
    cmd[at : at + 2] = ["--epochs", "1"]  # the whole epoch, to its short last batch
    log = run_ok(cmd, launch_env(data["cache"]))
    assert "21 blocks of 32; global batch 2 x 1 accum x 2 ranks = 4 blocks; 6 steps/epoch" in log
    assert sorted(train_losses(out)) == list(range(1, 7))
    os.environ["DOMAINLM_CACHE"] = str(data["cache"])
    config = one_process_config({**data, "model": untied_model_dir, "train": train_file}, single)
    config.max_steps, config.epochs = None, 1.0
    train(config)
    assert train_losses(out) == pytest.approx(train_losses(single), rel=1e-5)
    assert_same_weights(out, single)


def test_validation_perplexity_does_not_depend_on_world_size(
    ddp_run: tuple[Path, str], single_run: Path
) -> None:
    two, one = eval_events(ddp_run[0]), eval_events(single_run)
    assert sorted(two) == sorted(one) == [0, 2, 4]
    for step in two:
        assert two[step]["eval_tokens"] == one[step]["eval_tokens"] > 0
        assert two[step]["eval_ppl"] == pytest.approx(one[step]["eval_ppl"], rel=1e-6)


def test_two_nodes_equal_one_node(data: dict[str, Path], ddp_run: tuple[Path, str]) -> None:
    """Two torchrun launches (--nnodes=2, c10d rendezvous on 127.0.0.1) == --nproc_per_node=2."""
    out = data["root"] / "two-nodes"
    endpoint = f"127.0.0.1:{free_port()}"
    env = launch_env(data["cache"])
    procs = []
    for node in (0, 1):
        launcher = [
            "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=test",
        ]  # fmt: skip
        cmd = torchrun_cmd(launcher, data, out)
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    logs = [p.communicate(timeout=LAUNCH_TIMEOUT)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert_same_losses(train_losses(out), train_losses(ddp_run[0]))
    assert_same_weights(out, ddp_run[0])


def test_fsdp_equals_ddp_and_saves_a_normal_folder(
    fsdp_run: Path, ddp_run: tuple[Path, str]
) -> None:
    from transformers import AutoModelForCausalLM

    assert_same_losses(train_losses(fsdp_run), train_losses(ddp_run[0]))
    assert_same_weights(fsdp_run, ddp_run[0])
    assert_same_weights(fsdp_run / "checkpoint-2", ddp_run[0] / "checkpoint-2")
    model = AutoModelForCausalLM.from_pretrained(fsdp_run)
    saved = load_file(fsdp_run / "model.safetensors")
    loaded = model.transformer.h[1].mlp.c_fc.weight
    assert torch.equal(loaded, saved["transformer.h.1.mlp.c_fc.weight"])
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied, saved once


@pytest.mark.parametrize("source", ["ddp", "fsdp"])
def test_two_rank_checkpoint_resumed_by_one_rank(
    source: str,
    data: dict[str, Path],
    ddp_run: tuple[Path, str],
    fsdp_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Stop a 2-rank run after step 2; one process with --grad-accum 2 finishes it identically,
    and says the global batch stayed what it was (the history records ranks 2 -> 1)."""
    finished = ddp_run[0] if source == "ddp" else fsdp_run
    out = tmp_path / "resumed"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "checkpoint-4")  # as if the run had been stopped after step 2
    state = torch.load(out / "checkpoint-2" / "training_state.pt", weights_only=True)
    assert (state["world_size"], state["step"], state["epoch"], state["offset"]) == (2, 2, 0, 8)
    os.environ["DOMAINLM_CACHE"] = str(data["cache"])
    capsys.readouterr()
    result = train(one_process_config(data, out))
    assert result.resumed_from == out / "checkpoint-2"
    # the FSDP run's --strategy fsdp -> auto is said and recorded too
    strategy = ", --strategy fsdp -> auto" if source == "fsdp" else ""
    assert "resuming at step 2 with other settings than the run's so far: --grad-accum 1 -> 2" \
        f"{strategy}, ranks 2 -> 1; the global batch stays 4 blocks;" in capsys.readouterr().err  # fmt: skip
    history = json.loads((out / "run_config.json").read_text())["history"]
    changed = {"grad_accum": [1, 2], "ranks": [2, 1]}
    changed |= {"strategy": ["fsdp", "auto"]} if source == "fsdp" else {}
    assert history == [{"step": 2, "changed": changed}]
    end = torch.load(out / "checkpoint-4" / "training_state.pt", weights_only=True)
    assert (end["world_size"], end["step"], end["epoch"], end["offset"]) == (1, 4, 0, 16)
    assert_same_losses(train_losses(out), train_losses(ddp_run[0]))
    assert_same_weights(out, ddp_run[0])


def test_killed_rank_stops_the_whole_run(data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "killed"
    launcher = ["torch.distributed.run", "--nproc_per_node=2", f"--master-port={free_port()}"]
    cmd = torchrun_cmd(launcher, data, out)
    cmd[cmd.index("--max-steps") + 1] = "100000"
    cmd[cmd.index("--save-steps") + 1] = "100000"
    log_file = tmp_path / "log.txt"
    with open(log_file, "w") as log:
        agent = subprocess.Popen(cmd, env=launch_env(data["cache"]), stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while "step 1:" not in log_file.read_text():  # both ranks are in the step loop
            assert agent.poll() is None and time.monotonic() < deadline, log_file.read_text()
            time.sleep(0.2)
        workers = child_pids(agent.pid)
        assert len(workers) == 2
        victim = max(workers)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        agent.wait(timeout=60)
        stopped_after = time.monotonic() - killed_at
    finally:
        if agent.poll() is None:
            agent.kill()
    log = log_file.read_text()
    assert agent.returncode != 0
    assert stopped_after < 60
    assert "FAILED" in log and "SIGKILL" in log, log[-3000:]
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


def test_dead_node_stops_the_other_node_with_a_message(
    data: dict[str, Path], tmp_path: Path
) -> None:
    """A whole node (agent and worker) dies: the other node's rank sees its collective fail and
    stops with domainlm's one-line message; its agent then ends the run."""
    out, endpoint = tmp_path / "dead-node", f"127.0.0.1:{free_port()}"
    agents, logs = [], []
    for node in (0, 1):
        launcher = [
            "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=dead",
        ]  # fmt: skip
        cmd = torchrun_cmd(launcher, data, out)
        cmd[cmd.index("--max-steps") + 1] = "100000"
        cmd[cmd.index("--save-steps") + 1] = "100000"
        logs.append(tmp_path / f"node{node}.txt")
        with open(logs[-1], "w") as log:
            env = launch_env(data["cache"])
            agents.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=log))
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while "step 1:" not in logs[0].read_text():
            assert time.monotonic() < deadline, logs[0].read_text()
            time.sleep(0.2)
        for pid in [*child_pids(agents[1].pid), agents[1].pid]:
            os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        agents[0].wait(timeout=60)
        assert time.monotonic() - killed_at < 60
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    assert agents[0].returncode != 0
    assert "domainlm: stopped: rank 0 of 2 lost contact with the other ranks" in logs[0].read_text()


def child_pids(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return sorted(int(c) for c in children)


def test_rendezvous_timeout_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank whose peers never come stops after the timeout with a message, not a hang."""
    for name, value in {
        "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
    }.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    started = time.monotonic()
    with pytest.raises(TrainingAborted, match="rank 1 of 2 could not join the other ranks at 127"):
        setup_distributed(timeout_s=1)
    assert time.monotonic() - started < 30


def test_lost_rank_errors_become_one_line() -> None:
    ctx = DistContext(rank=1, world_size=2)
    lost = rank_lost(RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:1234\nmore"), ctx)
    assert isinstance(lost, TrainingAborted)
    assert str(lost).startswith("rank 1 of 2 lost contact with the other ranks")
    assert "more" not in str(lost)
    assert rank_lost(RuntimeError("shape mismatch"), ctx) is None
    assert rank_lost(RuntimeError("Connection closed"), DistContext()) is None


def test_fsdp_on_one_torchrun_rank_shards_and_equals_one_process(
    data: dict[str, Path], single_run: Path
) -> None:
    """torchrun with one process and --strategy fsdp joins a process group of one and shards
    (the path many ranks take, checkable on one GPU); it trains like the plain process."""
    out = data["root"] / "fsdp-one"
    launcher = ["torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    log = run_ok(
        torchrun_cmd(launcher, data, out, "--strategy", "fsdp", "--grad-accum", "2"),
        launch_env(data["cache"]),
    )
    assert "on cpu x1, precision fp32, parameters sharded by FSDP" in log
    assert_same_losses(train_losses(out), train_losses(single_run))
    assert_same_weights(out, single_run)


# A torchrun worker running `domainlm train` as rank 0 would, but rank 1 with the values of some
# flags replaced (argv[1]: "--flag=value,..."): machines whose files or command lines differ.
RANK_1_DIFFERS = """
import os, sys
from domainlm.cli import main
args = sys.argv[2:]
if os.environ["RANK"] == "1":
    for pair in filter(None, sys.argv[1].split(",")):
        flag, value = pair.split("=", 1)
        args[args.index(flag) + 1] = value
sys.exit(main(args))
"""


def launch_with_rank_1(
    data: dict[str, Path], out: Path, tmp_path: Path, rank_1: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    """A 2-rank torchrun of the shared run's command, rank 1's flags changed by `rank_1`."""
    script = tmp_path / "rank_1_differs.py"
    script.write_text(RANK_1_DIFFERS)
    launcher = ["torch.distributed.run", "--nproc_per_node=2", f"--master-port={free_port()}"]
    cmd = torchrun_cmd(launcher, data, out, *extra)
    at = cmd.index("-m", 3)  # torchrun's `-m domainlm`: the script instead
    cmd[at : at + 2] = [str(script), rank_1]
    return subprocess.run(cmd, env=launch_env(data["cache"]), capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT)  # fmt: skip


def test_ranks_that_disagree_stop_with_one_line_before_training(
    data: dict[str, Path], tmp_path: Path
) -> None:
    """Every rank reads its own command and files: rank 1 with other training data, another
    --max-steps, its own --output-dir under FSDP's sharded checkpoints, or its own --output-dir
    holding no checkpoint when rank 0 resumes, stops the run with one line on each rank before
    a step. They trained a mix silently, ran two schedules, published checkpoints missing rank
    1's shards (exit 0), or crashed in gloo."""
    other = write_lines(tmp_path / "other.txt", uneven_corpus(30, seed=5))
    own = tmp_path / "rank1-out"
    cases = [
        (f"--train-file={other}", (), "rank 1 of 2 runs with other training data than rank 0"),
        ("--max-steps=6", (), "rank 1 of 2 runs with other --max-steps 6 (rank 0: 4) than rank 0"),
        (f"--output-dir={own}", ("--strategy", "fsdp"), "rank 1 of 2 does not see --output-dir"),
    ]
    for number, (rank_1, extra, said) in enumerate(cases):
        out = tmp_path / f"out{number}"
        done = launch_with_rank_1(data, out, tmp_path, rank_1, *extra)
        errors = [line for line in done.stderr.splitlines() if line.startswith("domainlm: ")]
        assert done.returncode != 0 and len(errors) == 2, done.stderr[-3000:]
        assert all(said in line for line in errors), errors
        assert not (out / "metrics.jsonl").exists() and not (out / ".domainlm.lock").exists()
    assert not own.exists()
    # Rank 0's folder holds checkpoint-2, rank 1's (another machine's disk) nothing.
    out = tmp_path / "resumed"
    launch_with_rank_1(data, out, tmp_path, f"--output-dir={own}", "--max-steps", "2")
    assert (out / "checkpoint-2").is_dir() and not own.exists()
    done = launch_with_rank_1(data, out, tmp_path, f"--output-dir={own}")
    errors = [line for line in done.stderr.splitlines() if line.startswith("domainlm: ")]
    assert done.returncode != 0 and len(errors) == 2, done.stderr[-3000:]
    said = "rank 0 resumes from checkpoint-2, but rank 1 of 2 finds no checkpoint in its"
    assert all(said in line for line in errors), errors


def test_generate_under_torchrun_prints_each_sample_once(data: dict[str, Path]) -> None:
    """Rank 0 generates; every rank printed every sample (two ranks: each sample twice)."""
    launcher = ["torch.distributed.run", "--nproc_per_node=2", f"--master-port={free_port()}"]
    cmd = [sys.executable, "-m", *launcher, "-m", "domainlm", "generate", "--model",
           str(data["model"]), "--prompt", "The river", "--max-new-tokens", "4", "--seed", "1",
           "--json"]  # fmt: skip
    printed = run_ok(cmd, launch_env(data["cache"]))
    samples = [json.loads(line) for line in printed.splitlines() if line.startswith("{")]
    assert len(samples) == 1 and samples[0]["text"], printed[-3000:]
