"""--device {auto,cpu,cuda}: which device and which process-group backend a process gets (issue 14).

No GPU is needed: torch.cuda's answers are monkeypatched, and `torch.cuda.set_device` is recorded
instead of called. The real-GPU side (two torchrun ranks on one GPU) is in tests/test_cuda.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import uneven_corpus, write_lines

from domainlm.cli import main as cli_main
from domainlm.config import TrainConfig
from domainlm.errors import UserError
from domainlm.model import device as device_mod
from domainlm.model import distributed
from domainlm.model.device import DEVICE_ENV, distributed_backend, pick_device


class FakeCuda:
    """torch.cuda as a machine with `gpus` GPUs answers it; set_device calls are recorded."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, gpus: int) -> None:
        self.selected: list[int] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "set_device", self.selected.append)


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No DOMAINLM_DEVICE (conftest sets it to cpu) and no torchrun variables."""
    for name in (DEVICE_ENV, "LOCAL_WORLD_SIZE", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_auto_is_the_gpu_when_there_is_one_else_the_cpu(no_env: pytest.MonkeyPatch) -> None:
    gpu = FakeCuda(no_env, gpus=1)
    assert pick_device() == torch.device("cuda", 0) and gpu.selected == [0]
    assert pick_device(requested="auto") == torch.device("cuda", 0)
    FakeCuda(no_env, gpus=0)
    assert pick_device() == torch.device("cpu")
    assert pick_device(0, "auto") == torch.device("cpu")


def test_cpu_is_the_cpu_even_with_a_gpu(no_env: pytest.MonkeyPatch) -> None:
    gpu = FakeCuda(no_env, gpus=2)
    no_env.setenv("LOCAL_WORLD_SIZE", "4")  # more ranks than GPUs is fine on the CPU
    assert pick_device(3, "cpu") == torch.device("cpu")
    assert gpu.selected == []


def test_cuda_without_a_gpu_is_a_one_line_error(no_env: pytest.MonkeyPatch) -> None:
    FakeCuda(no_env, gpus=0)
    with pytest.raises(UserError, match=r"--device cuda, but PyTorch sees no GPU.*--device cpu"):
        pick_device(requested="cuda")


def test_environment_sets_the_default_and_the_flag_overrides_it(
    no_env: pytest.MonkeyPatch,
) -> None:
    FakeCuda(no_env, gpus=1)
    no_env.setenv(DEVICE_ENV, "cpu")
    assert pick_device() == torch.device("cpu")
    assert pick_device(requested="cuda") == torch.device("cuda", 0)
    no_env.setenv(DEVICE_ENV, "gpu")
    with pytest.raises(UserError, match=r"DOMAINLM_DEVICE must be one of auto, cpu, cuda"):
        pick_device()


def test_each_local_rank_takes_its_own_gpu(no_env: pytest.MonkeyPatch) -> None:
    gpu = FakeCuda(no_env, gpus=2)
    no_env.setenv("LOCAL_WORLD_SIZE", "2")
    assert pick_device(1, "cuda") == torch.device("cuda", 1)
    assert pick_device(0) == torch.device("cuda", 0)
    assert gpu.selected == [1, 0]


@pytest.mark.parametrize("local_rank", [0, 1])
@pytest.mark.parametrize("requested", ["auto", "cuda"])
def test_more_local_ranks_than_gpus_is_one_error_naming_both_counts(
    no_env: pytest.MonkeyPatch, local_rank: int, requested: str
) -> None:
    """Every rank of the machine stops with the same line, rank 0 too (not only the rank without
    a GPU), so that none waits for the others."""
    gpu = FakeCuda(no_env, gpus=1)
    no_env.setenv("LOCAL_WORLD_SIZE", "2")
    expected = (
        "torchrun started 2 processes on this machine but it has 1 GPU: "
        "use --nproc_per_node=1, or --device cpu"
    )
    with pytest.raises(UserError) as caught:
        pick_device(local_rank, requested)
    assert str(caught.value) == expected
    assert gpu.selected == []


def test_rank_beyond_the_gpus_is_refused_without_local_world_size(
    no_env: pytest.MonkeyPatch,
) -> None:
    FakeCuda(no_env, gpus=2)  # a launcher that sets LOCAL_RANK only
    with pytest.raises(UserError, match="started 3 processes on this machine but it has 2 GPUs"):
        pick_device(2)


def test_backend_is_nccl_only_for_gpus(no_env: pytest.MonkeyPatch) -> None:
    FakeCuda(no_env, gpus=1)
    assert distributed_backend("auto") == "nccl"
    assert distributed_backend("cuda") == "nccl"
    assert distributed_backend("cpu") == "gloo"
    no_env.setenv(DEVICE_ENV, "cpu")
    assert distributed_backend(None) == "gloo"
    FakeCuda(no_env, gpus=0)
    no_env.delenv(DEVICE_ENV)
    assert distributed_backend(None) == "gloo"


def torchrun_env(monkeypatch: pytest.MonkeyPatch, local_rank: int, local_world: int) -> None:
    monkeypatch.setenv("WORLD_SIZE", str(local_world))
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))


def record_joins(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    joined: list[str] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: joined.append(backend))
    return joined


@pytest.mark.parametrize(
    ("gpus", "requested", "backend"),
    [(2, None, "nccl"), (2, "cuda", "nccl"), (2, "cpu", "gloo"), (0, None, "gloo")],
)
def test_setup_distributed_joins_with_the_backend_of_the_device(
    no_env: pytest.MonkeyPatch, gpus: int, requested: str | None, backend: str
) -> None:
    FakeCuda(no_env, gpus=gpus)
    torchrun_env(no_env, local_rank=1, local_world=2)
    joined = record_joins(no_env)
    ctx = distributed.setup_distributed(60.0, requested)
    assert joined == [backend] and ctx.world_size == 2 and ctx.local_rank == 1


def test_setup_distributed_refuses_more_ranks_than_gpus_before_joining(
    no_env: pytest.MonkeyPatch,
) -> None:
    FakeCuda(no_env, gpus=1)
    torchrun_env(no_env, local_rank=0, local_world=2)
    joined = record_joins(no_env)
    with pytest.raises(UserError, match="started 2 processes on this machine but it has 1 GPU"):
        distributed.setup_distributed(60.0, "auto")
    assert joined == []  # never waited for the other rank
    assert distributed.setup_distributed(60.0, "cpu").world_size == 2
    assert joined == ["gloo"]


def test_bad_device_in_config_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"--device must be one of auto, cpu, cuda, got 'gpu'"):
        TrainConfig(model="m", train_file="t", output_dir=str(tmp_path), device="gpu")


def test_train_device_cuda_without_gpu_stops_with_one_line_before_writing(
    no_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    FakeCuda(no_env, gpus=0)
    train = write_lines(tmp_path / "train.txt", uneven_corpus(10))
    out = tmp_path / "out"
    args = ["train", "--model", "scratch:tiny", "--train-file", str(train)]
    rc = cli_main([*args, "--output-dir", str(out), "--max-steps", "1", "--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "--device cuda, but PyTorch sees no GPU" in err[0]
    assert not out.exists()


def test_module_reads_the_environment_at_call_time(no_env: pytest.MonkeyPatch) -> None:
    """conftest sets DOMAINLM_DEVICE after domainlm may have been imported: it must still apply."""
    FakeCuda(no_env, gpus=1)
    no_env.setenv(DEVICE_ENV, "cpu")
    assert device_mod.device_choice(None) == "cpu"
