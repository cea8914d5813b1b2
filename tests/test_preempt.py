"""Preemption (issue 17 item 4): SIGTERM's grace period as a budget for the last save.

A SIGTERM whose full save would not fit in --preempt-grace keeps the last complete checkpoint,
writes preempted.json (step reached, data position) and exits 143; the same command resumes from
that checkpoint, says which steps it trains again, and ends bit-identical to an uninterrupted run.
When the save fits, the checkpoint of the step is written as before. Real SIGTERMs: sent to this
process at a chosen step (in-process runs, fast) and, in the slow tests, to a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_diskspace import assert_same_run, corpus, error_lines, reference, run_args  # noqa: F401

from domainlm.cli import main as cli_main
from domainlm.run import checkpoint as ckpt
from domainlm.run import guard, preempt
from domainlm.run.metrics import read_events


class Signals:
    """What StopSignals holds after a signal: its number and when it came."""

    def __init__(self, signum: int, received_at: float) -> None:
        self.signum, self.received_at = signum, received_at


def test_a_save_goes_ahead_only_when_it_fits_in_the_grace_left() -> None:
    from domainlm.model.distributed import SINGLE

    plan = preempt.PreemptPlan(grace=60.0, checkpoint_bytes=10**9, save_seconds=10.0, write_speed=0)
    assert plan.fits_at_start and plan.fits(0.0) and plan.fits(47.0)
    assert not plan.fits(48.0)  # 10 s > 80% of the 12 s left
    now = __import__("time").monotonic()
    term_late, term_early = Signals(signal.SIGTERM, now - 55), Signals(signal.SIGTERM, now)
    assert not preempt.full_save_agreed(plan, term_late, SINGLE, None)
    assert preempt.full_save_agreed(plan, term_early, SINGLE, None)
    # Ctrl-C is a person waiting, not a scheduler: always the full save.
    assert preempt.full_save_agreed(plan, Signals(signal.SIGINT, now - 55), SINGLE, None)
    # A real save of this run that took longer than the estimate replaces it.
    slower = plan.after_a_save(55.0)
    assert slower.save_seconds == 55.0 and not slower.fits(0.0)
    assert "(the last save's time)" in slower.describe()
    assert plan.after_a_save(1.0) is plan
    slow = preempt.PreemptPlan(grace=5.0, checkpoint_bytes=10**9, save_seconds=10.0, write_speed=0)
    assert not slow.fits_at_start


def test_the_write_probe_measures_and_leaves_nothing(tmp_path: Path) -> None:
    write, checksum = preempt.probe_speeds(tmp_path, 3 << 20)
    assert write > 0 and checksum > 0
    assert list(tmp_path.iterdir()) == []


def sigterm_after_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """A real SIGTERM to this process right after `step` (fit calls guard.step_delay per step)."""
    calls = {"n": 0}

    def delay() -> None:
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(guard, "step_delay", delay)


def test_sigterm_with_too_little_grace_keeps_the_last_checkpoint_and_resumes_exactly(
    corpus: Path,  # noqa: F811
    reference: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    args = run_args(corpus, out, "--preempt-grace", "0.001")
    with monkeypatch.context() as patch:
        sigterm_after_step(patch, 3)
        assert cli_main(args) == 143
    err = capsys.readouterr().err
    assert "more than --preempt-grace 0.001 s allows: on SIGTERM the run will keep its last" in err
    assert (  # not the "and saving a checkpoint" it said before, for a save it will not make
        "SIGTERM received: finishing this step; a save would not fit in --preempt-grace 0.001 s: "
        "keeping the last checkpoint and writing preempted.json instead"
    ) in err
    (line,) = error_lines(err)
    assert line.startswith("domainlm: stopped: SIGTERM: stopped after step 3 without a new ")
    assert f"kept checkpoint-2 and wrote {out / 'preempted.json'}" in line
    assert "To resume, run" in line
    record = json.loads((out / "preempted.json").read_text())
    # 3 steps of 2 x 2 blocks: 12 blocks of epoch 0 consumed
    assert {k: record[k] for k in ("signal", "step", "epoch", "offset", "resume_from")} == {
        "signal": "SIGTERM", "step": 3, "epoch": 0, "offset": 12, "resume_from": "checkpoint-2",
    }  # fmt: skip
    assert [c.step for c in ckpt.list_checkpoints(out)] == [2]
    assert ckpt.checkpoint_problem(out / "checkpoint-2") is None
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]

    assert cli_main(args) == 0
    err = capsys.readouterr().err
    assert f"resuming from {out / 'checkpoint-2'} at step 2" in err
    assert "stopped by SIGTERM after step 3 without a checkpoint of it" in err
    assert not (out / "preempted.json").exists()
    assert_same_run(out, reference)


def test_the_resume_hint_turns_off_a_config_files_overwrite_and_continues(
    corpus: Path,  # noqa: F811
    reference: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """overwrite_output_dir in a --config file, --overwrite-output-dir typed as well: the hint
    after a SIGTERM (and after a fallback to preempted.json) keeps the file and adds
    --no-overwrite-output-dir; run as printed it continues the run, which ends as the
    uninterrupted one (the printed command removed the run and trained from step 0)."""
    out = tmp_path / "out"
    config_file = tmp_path / "run.yaml"
    config_file.write_text("overwrite_output_dir: true\n")
    typed = ["--config", str(config_file), "--overwrite-output-dir"]
    # preempted.json at step 3 (checkpoint-2 kept); resumed there, a save at its 2nd step, 4
    for grace, step in (("0.001", 3), ("60", 2)):
        with monkeypatch.context() as patch:
            sigterm_after_step(patch, step)
            args = run_args(corpus, out, "--preempt-grace", grace, *typed)
            args = args if grace == "0.001" else hint  # noqa: F821 - the first stop's, below
            patch.setattr(
                sys,
                "argv",
                [str(Path(cli_main.__code__.co_filename).parent / "__main__.py"), *args],
            )  # as `python -m domainlm`
            assert cli_main(args) == 143
        (line,) = error_lines(capsys.readouterr().err)
        printed = line.split("To resume, run ", 1)[1].split(" (it continues", 1)[0]
        assert printed.endswith(f"--config {config_file} --no-overwrite-output-dir"), printed
        hint = shlex.split(printed)[3:]  # less `python -m domainlm`
    assert cli_main(hint) == 0
    err = capsys.readouterr().err
    assert f"resuming from {out / 'checkpoint-4'} at step 4" in err and "removed" not in err
    assert_same_run(out, reference)


@pytest.mark.slow  # the same path as test_reliability's SIGTERM test, with a slow writer injected
def test_sigterm_when_the_save_fits_writes_the_checkpoint_of_the_step(
    corpus: Path,  # noqa: F811
    reference: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    monkeypatch.setenv(preempt.SAVE_SECONDS_ENV, "5")  # a slow writer, still inside 60 s
    with monkeypatch.context() as patch:
        sigterm_after_step(patch, 3)
        assert cli_main(run_args(corpus, out)) == 143
    err = capsys.readouterr().err
    assert "takes about 5 s to write here: fits in --preempt-grace 60 s" in err
    (line,) = error_lines(err)
    assert f"saved {out / 'checkpoint-3'}" in line
    assert [c.step for c in ckpt.list_checkpoints(out)] == [2, 3]
    assert not (out / "preempted.json").exists()
    assert cli_main(run_args(corpus, out)) == 0
    assert f"resuming from {out / 'checkpoint-3'} at step 3" in capsys.readouterr().err
    assert_same_run(out, reference)


# ----------------------------------------------------------------------------- real subprocesses


def spawn(corpus: Path, out: Path, **env: str) -> subprocess.Popen:  # noqa: F811
    cmd = [sys.executable, "-m", "domainlm", *run_args(corpus, out)]
    full_env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), **env}
    return subprocess.Popen(cmd, cwd=corpus, env=full_env, stderr=subprocess.PIPE, text=True)


def sigterm_at_step(proc: subprocess.Popen, out: Path, step: int) -> str:
    import time

    while not (out / "metrics.jsonl").exists() or not any(
        e.get("step") == step and "loss" in e for e in read_events(out / "metrics.jsonl")
    ):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    return err


@pytest.mark.slow
@pytest.mark.parametrize("save_seconds", ["", "1000"])
def test_sigterm_to_a_subprocess_saves_or_falls_back_and_resumes_bit_identically(
    corpus: Path,  # noqa: F811
    reference: Path,  # noqa: F811
    tmp_path: Path,
    save_seconds: str,
) -> None:
    out = tmp_path / "out"
    slow = {preempt.SAVE_SECONDS_ENV: save_seconds} if save_seconds else {}
    proc = spawn(corpus, out, DOMAINLM_INJECT_STEP_DELAY="1", **slow)
    err = sigterm_at_step(proc, out, 3)
    assert proc.returncode == 143, err
    (line,) = error_lines(err)
    step = int(re.search(r"stopped after step (\d+)", line)[1])  # 3, or 4 on a slow machine
    if save_seconds and step % 2:  # a writer too slow for the default 60 s: the fallback
        assert "without a new checkpoint" in line and (out / "preempted.json").is_file()
        assert json.loads((out / "preempted.json").read_text())["step"] == step
        resume_step = step - 1
    else:  # the save fits, or the step's checkpoint was just written (a --save-steps step)
        assert f"saved {out / f'checkpoint-{step}'}" in line
        resume_step = step
    assert max(c.step for c in ckpt.list_checkpoints(out)) == resume_step
    done = spawn(corpus, out, **slow)
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    assert f"checkpoint-{resume_step} at step {resume_step}" in err
    assert_same_run(out, reference)


def test_a_grace_period_of_zero_or_less_is_refused() -> None:
    from domainlm.config import TrainConfig
    from domainlm.errors import UserError

    for bad in (0.0, -5.0):
        with pytest.raises(UserError, match="--preempt-grace must be a positive number"):
            TrainConfig(model="m", train_file="t", output_dir="o", preempt_grace=bad)
    assert TrainConfig(model="m", train_file="t", output_dir="o").preempt_grace == 60.0


def test_a_sigterm_after_the_last_step_lets_the_final_save_finish(
    corpus: Path,  # noqa: F811
    reference: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A SIGTERM while the final model is written: the run ends as it would have (exit 0, the
    uninterrupted run's files), and says so; it announced a checkpoint it never wrote."""
    from domainlm.run import train as train_module

    real = train_module.save_model_folder

    def signalled(*args, **kwargs):  # type: ignore[no-untyped-def]
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "save_model_folder", signalled)
    out = tmp_path / "out"
    assert cli_main(run_args(corpus, out)) == 0
    err = capsys.readouterr().err
    assert (
        "SIGTERM received: the steps are done; the run ends once its final model is written" in err
    )
    assert "saving a checkpoint" not in err
    assert_same_run(out, reference)
