"""--async-save (issue 17 item 3): checkpoints written from a host copy by a background thread.

Runs are in-process `domainlm train` on scratch:tiny (dropout 0.1), CPU, fp32. A sync and an
async run must write the same bytes (every file but training_state.pt, whose loss window holds
the wall-clock training seconds, and the marker that checksums it; those states are compared
tensor by tensor) and resume to the same bits. The kill during an async write is in
tests/test_reliability.py (a real subprocess and SIGKILL).
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import ModuleTemp, uneven_corpus, write_lines
from safetensors.torch import load_file

from domainlm.cli import main as cli_main
from domainlm.run import async_save
from domainlm.run import checkpoint as ckpt
from domainlm.run.metrics import read_events


@pytest.fixture(scope="module")
def corpus(module_tmp: ModuleTemp) -> Path:
    folder = module_tmp.mktemp("corpus")
    write_lines(folder / "train.txt", uneven_corpus(40, seed=0))
    write_lines(folder / "valid.txt", uneven_corpus(8, seed=1))
    return folder


def train_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", "scratch:tiny",
        "--train-file", str(corpus / "train.txt"),
        "--validation-file", str(corpus / "valid.txt"),
        "--output-dir", str(out),
        "--block-size", "32", "--batch-size", "2", "--max-steps", "6", "--save-steps", "2",
        "--save-total-limit", "2", "--logging-steps", "1", "--lr", "1e-3",
        "--precision", "fp32", "--quiet", *extra,
    ]  # fmt: skip


def events(out: Path) -> list[dict]:
    rows = read_events(out / "metrics.jsonl")
    for row in rows:
        row.pop("tokens_per_s", None)
    return rows


def state_without_clock(path: Path) -> dict:
    state = ckpt.load_training_state(path)
    state["loss_window"].pop("seconds")  # wall-clock training time: differs between any 2 runs
    state["totals"].pop("seconds")  # the same wall-clock time, summed over the run
    return state


def assert_equal_nested(a: object, b: object, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_equal_nested(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_equal_nested(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def sync_run(corpus: Path, module_tmp: ModuleTemp) -> Path:
    out = module_tmp.mktemp("sync") / "out"
    assert cli_main(train_args(corpus, out)) == 0
    return out


def test_async_checkpoints_are_byte_identical_to_sync_and_resume_bit_identical(
    corpus: Path, sync_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "async"
    assert cli_main(train_args(corpus, out, "--async-save")) == 0
    # keep-K rotation ran after each publication: the newest 2 are left, as in the sync run
    assert [c.step for c in ckpt.list_checkpoints(out)] == [4, 6]
    assert [c.step for c in ckpt.list_checkpoints(sync_run)] == [4, 6]
    for step in (4, 6):
        a, s = out / f"checkpoint-{step}", sync_run / f"checkpoint-{step}"
        assert ckpt.checkpoint_problem(a) is None
        names = sorted(p.name for p in a.iterdir())
        assert names == sorted(p.name for p in s.iterdir())
        for name in set(names) - {ckpt.STATE_FILE, ckpt.MARKER}:
            assert (a / name).read_bytes() == (s / name).read_bytes(), f"checkpoint-{step}/{name}"
        assert_equal_nested(state_without_clock(a), state_without_clock(s), f"checkpoint-{step}")
    assert (out / "model.safetensors").read_bytes() == (sync_run / "model.safetensors").read_bytes()

    # Resume the async run from checkpoint-4 (as if killed after it): the same bits at the end.
    for name in ("checkpoint-6", "model.safetensors"):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert cli_main(train_args(corpus, out, "--async-save")) == 0
    wa, ws = load_file(out / "model.safetensors"), load_file(sync_run / "model.safetensors")
    assert wa.keys() == ws.keys() and all(torch.equal(wa[k], ws[k]) for k in wa)
    assert events(out) == events(sync_run)


def test_an_error_in_the_writer_thread_stops_the_run(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed background write is raised in the training thread, not lost with the thread."""
    real = async_save.save_checkpoint
    failing_thread: list[str] = []

    def fail_at_4(output_dir: Path, step: int, *args: object) -> Path:
        if step == 4:
            failing_thread.append(threading.current_thread().name)
            raise OSError(5, "Input/output error")
        return real(output_dir, step, *args)

    monkeypatch.setattr(async_save, "save_checkpoint", fail_at_4)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="Input/output error") as raised:
        cli_main(train_args(corpus, out, "--async-save"))
    assert failing_thread == ["domainlm-save-4"]  # it was the background thread that failed
    assert "while writing checkpoint-4 in the background" in str(raised.value.__notes__)
    assert [c.step for c in ckpt.list_checkpoints(out)] == [2]  # the previous one stays
    assert not (out / "model.safetensors").exists()  # no final model after a failed save


class SlowJob:
    """A checkpoint write that holds until released, recording how many ran at once."""

    running = 0
    most = 0
    lock = threading.Lock()

    def __init__(self, release: threading.Event, log: list[str], name: str) -> None:
        self.release, self.log, self.name = release, log, name
        self.step = len(log)

    def write(self) -> None:
        with SlowJob.lock:
            SlowJob.running += 1
            SlowJob.most = max(SlowJob.most, SlowJob.running)
        self.log.append(f"start {self.name}")
        self.release.wait(timeout=30)
        self.log.append(f"end {self.name}")
        with SlowJob.lock:
            SlowJob.running -= 1


def test_at_most_one_save_in_flight_and_a_new_one_waits() -> None:
    writer = async_save.BackgroundWriter()
    first, second, log = threading.Event(), threading.Event(), []
    writer.submit(SlowJob(first, log, "a"))  # type: ignore[arg-type]
    submitting = threading.Thread(target=writer.submit, args=(SlowJob(second, log, "b"),))
    submitting.start()
    submitting.join(timeout=0.5)
    assert submitting.is_alive() and log == ["start a"]  # b waits while a is in flight
    first.set()
    submitting.join(timeout=30)
    second.set()
    writer.wait()
    assert log == ["start a", "end a", "start b", "end b"] and SlowJob.most == 1


def test_host_copy_is_a_snapshot_that_keeps_ties() -> None:
    weight = torch.arange(6.0).reshape(2, 3)
    state = {"wte": weight, "lm_head": weight, "opt": [{"step": torch.tensor(3.0), "lr": 0.1}]}
    copied = async_save.host_copy(state)
    weight.add_(100.0)  # the next optimizer step changes the live tensors in place
    state["opt"][0]["step"].add_(1)
    assert torch.equal(copied["wte"], torch.arange(6.0).reshape(2, 3))
    assert copied["lm_head"] is copied["wte"]  # a tied weight is copied once
    assert copied["opt"][0] == {"step": torch.tensor(3.0), "lr": 0.1}


def test_the_preemption_budget_counts_the_background_write() -> None:
    """With --async-save a save lasts its stall plus the background write: the time a SIGTERM's
    save needs (run/preempt.py reads Checkpoints.last_seconds), not the stall alone."""
    from types import SimpleNamespace

    from domainlm.run.boundaries import Checkpoints

    class SleepingJob:
        step = 1

        def write(self) -> None:
            time.sleep(0.3)

    writer = async_save.BackgroundWriter()
    run = SimpleNamespace(data=SimpleNamespace(resume_from=None))
    checkpoints = Checkpoints(run, None, None, writer)  # type: ignore[arg-type]
    checkpoints.last_stall = 0.05
    writer.submit(SleepingJob())  # type: ignore[arg-type]
    writer.wait()
    assert writer.last_write_seconds >= 0.3
    assert checkpoints.last_seconds == 0.05 + writer.last_write_seconds
