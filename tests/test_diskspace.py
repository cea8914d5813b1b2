"""Disk space (issue 17 item 1): the checkpoint size estimate against a written checkpoint, the
peak need against a step-by-step simulation of saves and rotation, --strict refusing before
anything is written, and a full disk during a checkpoint or the final save: one line, exit 4, the
partial write removed, the earlier checkpoints intact, and the same command, once there is space,
finishing bit-identical to an uninterrupted run. The full disk is injected (runs everywhere) and,
as root, real: a tmpfs of 100 MiB mounted for the test.

Runs are in-process `domainlm train` on scratch:tiny (dropout 0.1), CPU, fp32: 6 steps, a
checkpoint every 2, --save-total-limit 2.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from conftest import uneven_corpus, write_lines
from safetensors.torch import load_file

from domainlm.cli import main as cli_main
from domainlm.run import checkpoint as ckpt
from domainlm.run import diskspace
from domainlm.run.metrics import read_events

STEPS, SAVE_STEPS, KEEP = 6, 2, 2


def run_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", "scratch:tiny",
        "--train-file", str(corpus / "train.txt"),
        "--validation-file", str(corpus / "valid.txt"),
        "--output-dir", str(out), "--cache-dir", str(corpus / "cache"),
        "--block-size", "32", "--batch-size", "2", "--grad-accum", "2",
        "--max-steps", str(STEPS), "--save-steps", str(SAVE_STEPS),
        "--save-total-limit", str(KEEP), "--logging-steps", "1", "--lr", "1e-3",
        "--precision", "fp32", "--quiet",
        *extra,
    ]  # fmt: skip


def metric_events(out: Path) -> list[dict]:
    rows = read_events(out / "metrics.jsonl")
    for row in rows:
        row.pop("tokens_per_s", None)  # the only field that depends on timing
    return rows


def assert_same_run(out: Path, reference: Path) -> None:
    """Final weights bit for bit, the same metrics, the same checkpoints kept, all intact."""
    a, b = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metric_events(out) == metric_events(reference)
    kept = [c.step for c in ckpt.list_checkpoints(out)]
    assert kept == [c.step for c in ckpt.list_checkpoints(reference)]
    assert all(ckpt.checkpoint_problem(out / f"checkpoint-{s}") is None for s in kept)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def du(path: Path) -> int:
    """Bytes of the files under `path`, summed with os.walk (not the code under test)."""
    if path.is_file():
        return path.stat().st_size
    return sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
    )


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("domainlm:")]


# Made once per session, also for tests/test_preempt.py: in pytest's session folders, not in
# `module_tmp`'s (removed after this module's tests, before test_preempt's run).
_SHARED: dict[str, Path] = {}


@pytest.fixture
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if "corpus" not in _SHARED:
        folder = tmp_path_factory.mktemp("corpus")
        write_lines(folder / "train.txt", uneven_corpus(40, seed=0))
        write_lines(folder / "valid.txt", uneven_corpus(8, seed=1))
        _SHARED["corpus"] = folder
    return _SHARED["corpus"]


@pytest.fixture
def reference(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run of `run_args` (a module global: tests/test_preempt.py imports this
    module, so both files share the one run)."""
    if "reference" not in _SHARED:
        out = tmp_path_factory.mktemp("reference") / "out"
        assert cli_main(run_args(corpus, out)) == 0
        _SHARED["reference"] = out
    return _SHARED["reference"]


# ----------------------------------------------------------------------------- the estimate


def test_estimate_is_within_two_percent_of_a_written_checkpoint(reference: Path) -> None:
    from domainlm.model.loading import load_model

    loaded = load_model(str(reference / "checkpoint-6"))
    size = diskspace.estimate_checkpoint(loaded.model, loaded.tokenizer)
    written = du(reference / "checkpoint-6")
    assert abs(size.total - written) / written < 0.02, (size, written)
    weights = (reference / "checkpoint-6" / "model.safetensors").stat().st_size
    assert abs(size.weights - weights) / weights < 0.01
    state = (reference / "checkpoint-6" / ckpt.STATE_FILE).stat().st_size
    assert abs(size.optimizer - state) / state < 0.02
    # The final folder: the model, tokenizer and report files (not checkpoints, logs, run file).
    final = sum(
        du(p) for p in reference.iterdir()
        if not p.name.startswith("checkpoint-") and p.name not in ("metrics.jsonl", "tensorboard")
    )  # fmt: skip
    assert abs(size.model_folder - final) / final < 0.10, (size.model_folder, final)


def simulated_peak(c: int, m: int, saves: list[int], keep: int | None, existing: list[int]) -> int:
    """Walk the saves one by one: add the new checkpoint, then rotate to the newest `keep` plus
    the best (worst case: the best is the oldest one, which rotation never deletes); at the end
    add the final model. The most bytes on disk at any moment, less what was there before."""
    on_disk = list(existing)  # steps of complete checkpoints
    before = len(on_disk) * c
    peak = before
    for step in saves:
        on_disk.append(step)
        peak = max(peak, len(on_disk) * c)
        if keep is not None and len(on_disk) > keep:
            best = on_disk[0]
            on_disk = [best] + [s for s in on_disk[-keep:] if s != best]
    peak = max(peak, len(on_disk) * c + m)
    return peak - before


@pytest.mark.parametrize("keep", [None, 1, 2, 5])
@pytest.mark.parametrize(
    ("start", "total", "every"), [(0, 10, 2), (0, 7, 3), (4, 11, 2), (6, 6, 2)]
)
def test_peak_need_matches_a_simulation_of_saves_and_rotation(
    keep: int | None, start: int, total: int, every: int
) -> None:
    size = diskspace.CheckpointSize(
        weights=3 * 10**8, optimizer=6 * 10**8, tokenizer=10**8, other=0
    )
    c, m = size.total, size.model_folder
    existing = list(range(every, start + 1, every))
    if keep is not None:
        existing = existing[-keep:]
    saves = [s for s in range(start + 1, total + 1) if s % every == 0 or s == total]
    need = diskspace.space_needed(size, start, total, every, keep, [c] * len(existing))
    assert need.to_write == len(saves)
    expected = simulated_peak(c, m, saves, keep, existing)
    # The estimate may be above the simulation only by the best checkpoint it cannot foresee.
    assert expected <= need.peak <= expected + (c if keep else 0)


# ----------------------------------------------------------------------------- before training

Usage = namedtuple("Usage", "total used free")


def test_too_little_space_with_strict_is_refused_before_anything_is_written(
    corpus: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    free = 50_000_000
    monkeypatch.setattr(diskspace.shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - free, free))
    clean = tmp_path / "clean"  # lines shorter than a block: no data lint for --strict to refuse
    clean.mkdir()
    write_lines(clean / "train.txt", [f"the cat sat on mat {i}" for i in range(40)])
    write_lines(clean / "valid.txt", [f"a dog sat on log {i}" for i in range(8)])
    out = tmp_path / "out"
    assert cli_main(run_args(clean, out, "--strict")) == 2
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    assert "Traceback" not in err
    assert line.startswith(f"domainlm: error: --strict: --output-dir {out}: the run needs about ")
    assert "but 50.0 MB is free there" in line
    # The figure: what the uninterrupted run held at its worst, within 10% (3 checkpoints on
    # disk while the third is written, then the two kept plus the best and the final model).
    needed_mb = float(line.split("needs about ")[1].split(" MB")[0])
    ckpt_bytes = du(reference / "checkpoint-6")
    worst = 3 * ckpt_bytes + du(reference) - du(reference / "checkpoint-4") - ckpt_bytes
    assert abs(needed_mb * 1e6 - worst) / worst < 0.10, (needed_mb, worst)
    assert not out.exists()


def test_check_disk_space_warns_with_both_figures(tmp_path: Path) -> None:
    size = diskspace.CheckpointSize(weights=2_000_000, optimizer=4_000_000, tokenizer=0, other=0)
    need = diskspace.space_needed(size, 0, 4, 2, None, [])
    warnings: list[str] = []
    said = diskspace.check_disk_space(need, tmp_path, False, warnings.append, free=3_000_000)
    assert warnings == [said] and "needs about 15.0 MB" in said and "3.0 MB is free" in said
    assert "exit code 4" in said
    assert diskspace.check_disk_space(need, tmp_path, True, warnings.append, free=10**12) is None


# ----------------------------------------------------------------------------- a full disk


def test_out_of_space_is_recognised_in_the_words_of_each_library(tmp_path: Path) -> None:
    full = OSError(errno.ENOSPC, "No space left on device")
    assert diskspace.says_out_of_space(full)
    assert diskspace.says_out_of_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    # safetensors' and tokenizers' errors carry the OS message, not an errno
    assert diskspace.says_out_of_space(
        Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    )
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = full
    assert diskspace.says_out_of_space(wrapped)
    # torch.save's opaque error: out of space only if the free space could not have held it
    opaque = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    free = diskspace.free_bytes(tmp_path)
    assert diskspace.is_out_of_space(opaque, tmp_path, needed=free + 10**6, partial=0)
    assert not diskspace.is_out_of_space(opaque, tmp_path, needed=1, partial=0)
    assert not diskspace.is_out_of_space(KeyError("x"), tmp_path, needed=free + 10**6, partial=0)
    assert not diskspace.says_out_of_space(OSError(errno.EACCES, "Permission denied"))


def test_full_disk_in_a_checkpoint_is_one_line_exit_4_and_the_same_command_resumes(
    corpus: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    out = tmp_path / "out"
    real_save = torch.save

    def disk_fills_at_checkpoint_4(obj: object, path: object, *args: object, **kw: object) -> None:
        if Path(str(path)).parent.name == ".checkpoint-4.tmp":
            Path(str(path)).write_bytes(b"\0" * 4096)  # a partial file, as a real full disk leaves
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, path, *args, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(ckpt.torch, "save", disk_fills_at_checkpoint_4)
        assert cli_main(run_args(corpus, out)) == diskspace.OUT_OF_SPACE_EXIT == 4
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    assert "Traceback" not in err
    assert line.startswith(
        f"domainlm: stopped: no space left on device while writing checkpoint-4 in {out}: it "
        "needs about 43.6 MB, "
    )
    assert "checkpoint-2 is intact and the partial .checkpoint-4.tmp was removed" in line
    assert "Free space, then run " in line and ": it resumes from there" in line
    assert [c.step for c in ckpt.list_checkpoints(out)] == [2]
    assert ckpt.checkpoint_problem(out / "checkpoint-2") is None
    assert not (out / ".checkpoint-4.tmp").exists() and not (out / "checkpoint-4").exists()

    assert cli_main(run_args(corpus, out)) == 0
    assert f"resuming from {out / 'checkpoint-2'} at step 2" in capsys.readouterr().err
    assert_same_run(out, reference)


@pytest.mark.slow  # two runs
def test_full_disk_in_the_final_model_removes_its_weights_and_the_same_command_resumes(
    corpus: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from transformers import PreTrainedModel

    out = tmp_path / "out"
    real_save = PreTrainedModel.save_pretrained

    def disk_fills_in_final(self: PreTrainedModel, folder: object, *args: object, **kw: object):
        staging = out / ckpt.FINAL_STAGING  # the final model's, not a checkpoint's
        if Path(str(folder)) == staging:
            (staging / "model.safetensors").write_bytes(b"\0" * 4096)
            raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")  # fmt: skip
        return real_save(self, folder, *args, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(PreTrainedModel, "save_pretrained", disk_fills_in_final)
        assert cli_main(run_args(corpus, out)) == 4
    (line,) = error_lines(capsys.readouterr().err)
    assert f"no space left on device while writing the final model in {out}" in line
    assert "its weight files were removed, the checkpoints are intact" in line
    assert not (out / "model.safetensors").exists()  # no truncated model left to load
    assert not (out / ckpt.FINAL_STAGING).exists()  # nor taking space where it was written
    assert [c.step for c in ckpt.list_checkpoints(out)] == [4, 6]

    assert cli_main(run_args(corpus, out)) == 0
    assert f"resuming from {out / 'checkpoint-6'} at step 6" in capsys.readouterr().err
    assert_same_run(out, reference)


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A real 100 MiB file system (tmpfs), as root; skipped where mount is not allowed."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100m", "tmpfs", str(mount)],
                          capture_output=True)  # fmt: skip
    if made.returncode != 0:
        pytest.skip(f"mount -t tmpfs failed: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_real_full_file_system_then_more_space_resumes_bit_identically(
    corpus: Path, reference: Path, small_tmpfs: Path, capsys
) -> None:
    out = small_tmpfs / "out"
    # 43.6 MB a checkpoint: checkpoint-2 and checkpoint-4 fit in 100 MiB, checkpoint-6 does not.
    assert cli_main(run_args(corpus, out)) == 4
    err = capsys.readouterr().err
    assert "warning: --output-dir" in err and "more disk space" in err  # said at the start
    (line,) = error_lines(err)
    assert "Traceback" not in err
    assert "no space left on device while writing checkpoint-6" in line
    assert "checkpoint-4 is intact and the partial .checkpoint-6.tmp was removed" in line
    assert [c.step for c in ckpt.list_checkpoints(out)] == [2, 4]
    assert all(ckpt.checkpoint_problem(out / f"checkpoint-{s}") is None for s in (2, 4))
    assert not (out / ".checkpoint-6.tmp").exists()

    subprocess.run(["mount", "-o", "remount,size=300m", str(small_tmpfs)], check=True)
    assert cli_main(run_args(corpus, out)) == 0
    assert f"resuming from {out / 'checkpoint-4'} at step 4" in capsys.readouterr().err
    assert_same_run(out, reference)
