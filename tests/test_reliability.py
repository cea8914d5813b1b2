"""Never lose a run (issue 5): exact resume after SIGKILL, graceful stop on SIGINT/SIGTERM, the run
lock, NaN/Inf steps, out-of-memory back-off, crash-safe checkpoints.

Runs are real `domainlm train` subprocesses receiving real signals, on scratch:tiny (dropout 0.1,
as the preset defines it), CPU, fp32. `DOMAINLM_INJECT_STEP_DELAY` slows a run down so that a
signal reliably arrives mid-run; it does not change any number.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ModuleTemp, uneven_corpus, write_lines
from safetensors.torch import load_file

from domainlm.cli import main as cli_main
from domainlm.run import checkpoint as ckpt
from domainlm.run.lock import LOCK_FILE, RunLock, pid_alive
from domainlm.run.metrics import read_events

MAX_STEPS = 9  # 8 steps per epoch: the runs cross an epoch boundary


def train_cmd(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "domainlm", "train",
        "--model", "scratch:tiny",
        "--train-file", str(corpus / "train.txt"),
        "--validation-file", str(corpus / "valid.txt"),
        "--output-dir", str(out),
        "--block-size", "32", "--batch-size", "2", "--grad-accum", "2",
        "--max-steps", str(MAX_STEPS), "--save-steps", "3", "--eval-steps", "5",
        "--logging-steps", "1", "--lr", "1e-3", "--precision", "fp32", "--quiet",
        *extra,
    ]  # fmt: skip


def env_for(corpus: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "DOMAINLM_CACHE": str(corpus / "cache"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **extra,
    }


def metric_events(out: Path) -> list[dict]:
    rows = read_events(out / "metrics.jsonl")
    for row in rows:
        row.pop("tokens_per_s", None)  # the only field that depends on timing
    return rows


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path.name} appeared"
        assert time.monotonic() < end, f"{path} did not appear"
        time.sleep(0.02)


def wait_for_step(out: Path, step: int, proc: subprocess.Popen) -> None:
    """Until metrics.jsonl holds the training event of `step` (logging every step)."""
    wait_for(out / "metrics.jsonl", proc)
    while f'"step": {step}, "epoch"' not in (out / "metrics.jsonl").read_text():
        assert proc.poll() is None, "the run ended early"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def corpus(module_tmp: ModuleTemp) -> Path:
    folder = module_tmp.mktemp("corpus")
    write_lines(folder / "train.txt", uneven_corpus(40, seed=0))
    write_lines(folder / "valid.txt", uneven_corpus(8, seed=1))
    return folder


@pytest.fixture(scope="module")
def reference(corpus: Path, module_tmp: ModuleTemp) -> Path:
    """One uninterrupted run; run from an empty folder with an empty HOME and TMPDIR, so that the
    security test can check that nothing was written outside the output dir and the cache."""
    base = module_tmp.mktemp("reference")
    home, cwd, tmp = base / "home", base / "cwd", base / "tmp"
    for folder in (home, cwd, tmp):
        folder.mkdir()
    out = base / "out"
    env = env_for(corpus, HOME=str(home), TMPDIR=str(tmp), XDG_CACHE_HOME=str(home / ".cache"))
    done = subprocess.run(train_cmd(corpus, out), env=env, cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out


def test_reference_writes_only_output_dir_and_cache(reference: Path) -> None:
    base = reference.parent
    for name in ("home", "cwd", "tmp"):
        left = sorted(
            str(p.relative_to(base))
            for p in (base / name).rglob("*")
            # torch's own compile cache, made on import of torch._inductor (not domainlm's)
            if not p.relative_to(base / name).parts[0].startswith("torchinductor_")
        )
        assert left == [], f"written outside the output dir and the cache: {left}"
    assert sorted(p.name for p in base.iterdir()) == ["cwd", "home", "out", "tmp"]


def test_sigkill_mid_epoch_then_resume_is_bit_identical(
    corpus: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    cmd = train_cmd(corpus, out)
    proc = subprocess.Popen(
        cmd,
        cwd=corpus,  # `python -m` imports from the working folder: the same for all runs
        env=env_for(corpus, DOMAINLM_INJECT_STEP_DELAY="0.3"),
        stderr=subprocess.DEVNULL,
    )
    wait_for(out / "checkpoint-3", proc)
    proc.kill()  # SIGKILL: no handler, no clean-up
    assert proc.wait() == -signal.SIGKILL
    steps_before = [e["step"] for e in metric_events(out) if "loss" in e]
    assert 3 <= max(steps_before) < MAX_STEPS  # killed mid-run, mid-epoch (8 steps per epoch)
    # The lock of the killed run is left behind, stale: the resumed run takes it over.
    owner = json.loads((out / LOCK_FILE).read_text())
    assert not pid_alive(owner["pid"])

    done = subprocess.run(cmd, cwd=corpus, env=env_for(corpus), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr
    assert_same_weights(out, reference)
    # metrics.jsonl: the same events, losses and perplexities to the last bit; no step twice.
    assert metric_events(out) == metric_events(reference)
    train_steps = [e["step"] for e in metric_events(out) if "loss" in e]
    assert train_steps == list(range(1, MAX_STEPS + 1))
    assert not (out / LOCK_FILE).exists()


def test_sigkill_during_an_async_save_resumes_from_the_previous_checkpoint(
    corpus: Path, reference: Path, tmp_path: Path
) -> None:
    """--async-save: checkpoint-6 is held mid-write (its files written, no marker yet) while
    training goes on past step 6; a SIGKILL then leaves checkpoint-3 as the resume point, and the
    resumed run ends bit-identical to the uninterrupted synchronous run."""
    out = tmp_path / "out"
    cmd = train_cmd(corpus, out, "--async-save")
    slow = env_for(corpus, DOMAINLM_INJECT_STEP_DELAY="0.3", DOMAINLM_INJECT_SAVE_DELAY="6:120")
    proc = subprocess.Popen(cmd, cwd=corpus, env=slow, stderr=subprocess.DEVNULL)
    wait_for_step(out, 7, proc)  # the loop went on while checkpoint-6 was being written
    assert (out / ".checkpoint-6.tmp").is_dir() and not (out / "checkpoint-6").exists()
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    assert [c.step for c in ckpt.list_checkpoints(out)] == [3]

    done = subprocess.run(cmd, cwd=corpus, env=env_for(corpus), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"resuming from {out / 'checkpoint-3'} at step 3" in done.stderr
    assert_same_weights(out, reference)
    assert metric_events(out) == metric_events(reference)
    assert not (out / ".checkpoint-6.tmp").exists()  # the partial write was replaced


# `domainlm train` with one function (argv[1]: "module:attribute") replaced by an os._exit (no
# handler, no clean-up: as a SIGKILL or the OOM killer at that point) when `{when}` holds, after
# `{before}` runs; otherwise the function runs as it is.
KILLED_IN = """
import importlib, os, sys
from pathlib import Path
module_name, _, attribute = sys.argv[1].partition(":")
owner = importlib.import_module(module_name)
*parents, name = attribute.split(".")
for parent in parents:
    owner = getattr(owner, parent)
real = getattr(owner, name)
def killed(*args, **kwargs):
    if {when}:
        {before}
        os._exit(137)
    return real(*args, **kwargs)
setattr(owner, name, killed)
from domainlm.cli import main
sys.exit(main(sys.argv[2:]))
"""

# Where the final save is cut short (target, when, before, flags): after the model and tokenizer
# are in the run folder; for LoRA, midway through the merge (merged/ holds its config, not yet
# its weights); midway through a plot's PNG; midway through the model card.
FINAL_SAVE_KILLS = {
    "full": ("domainlm.run.train:save_eval_results", "True", "pass", ()),
    "lora": (
        "domainlm.run.train:save_merged",
        "True",
        "(Path(args[0]) / 'merged').mkdir(); (Path(args[0]) / 'merged/config.json').write_text('{{}}')",
        ("--lora",),
    ),
    "plot": (
        "matplotlib.figure:Figure.savefig",
        "True",
        "Path(args[1]).write_bytes(bytes(10))",
        (),
    ),
    "card": (
        "pathlib:Path.write_text",
        "'README' in args[0].name",
        "real(args[0], args[1][:10])",
        (),
    ),
}


@pytest.mark.parametrize("mode", sorted(FINAL_SAVE_KILLS))
def test_a_run_killed_in_its_final_save_resumes_and_can_be_overwritten(
    mode: str, corpus: Path, reference: Path, tmp_path: Path
) -> None:
    """Every file of the final save is recorded as the run's before it is written, or replaces
    its name at once when complete (the plots, the card): the same command finishes the run,
    and --overwrite-output-dir replaces it, instead of both refusing the run's own files as a
    user's ("which domainlm did not write"), or keeping a half-written card as a user's."""
    target, when, before, flags = FINAL_SAVE_KILLS[mode]
    out = tmp_path / "out"
    command = train_cmd(corpus, out, *flags)
    harness = KILLED_IN.format(when=when, before=before)
    killer = [sys.executable, "-c", harness, target, *command[3:]]
    died = subprocess.run(killer, cwd=corpus, env=env_for(corpus), capture_output=True, text=True)
    assert died.returncode == 137, died.stderr
    assert (out / ("adapter_model.safetensors" if flags else "model.safetensors")).is_file()
    assert "finished" not in json.loads((out / ckpt.RUN_FILE).read_text())
    for extra in ((), ("--overwrite-output-dir",)):
        again = subprocess.run(
            [*command, *extra], cwd=corpus, env=env_for(corpus), capture_output=True, text=True
        )
        assert again.returncode == 0, again.stderr
        assert "did not write" not in again.stderr
        assert "not written by domainlm" not in again.stderr  # the card is written again
        assert "finished" in json.loads((out / ckpt.RUN_FILE).read_text())
        assert (out / "eval_results.json").is_file() and not (out / ".final.tmp").exists()
        assert "domainlm" in (out / "README.md").read_text()
        assert (out / "training_loss.png").read_bytes().startswith(b"\x89PNG")
        if flags:
            assert load_file(out / "merged" / "model.safetensors")
        else:
            assert_same_weights(out, reference)


def test_a_folder_whose_final_save_was_cut_short_names_its_newest_checkpoint(
    corpus: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Killed while its final files were moved in (config.json there, the tokenizer still in
    .final.tmp): perplexity says it is a run without its final model and names the checkpoint
    to use, not "copy the tokenizer files of the model it came from into it"."""
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / ".final.tmp").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).replace(out / ".final.tmp" / name)
    argv = ["perplexity", "--model", str(out), "--file", str(corpus / "valid.txt")]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a training run without its final model yet" in err[0], err
    assert f"--model {out / f'checkpoint-{MAX_STEPS}'}" in err[0]


def test_sigterm_saves_and_exits_143_then_resumes_exactly(
    corpus: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    # --overwrite-output-dir: the resume hint must leave it out (it removed the run it resumed)
    cmd = train_cmd(corpus, out, "--overwrite-output-dir")
    proc = subprocess.Popen(
        cmd,
        cwd=corpus,  # `python -m` imports from the working folder: the same for all runs
        env=env_for(corpus, DOMAINLM_INJECT_STEP_DELAY="0.5"),
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_step(out, 4, proc)  # the signal arrives during step 4 (its pause): not a save step
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    stopped = [line for line in stderr.splitlines() if line.startswith("domainlm: stopped")]
    assert len(stopped) == 1 and "SIGTERM" in stopped[0] and "To resume, run" in stopped[0]
    # It finished the step it was in and saved it, although 4 or 5 is not a --save-steps step.
    step = max(c.step for c in ckpt.list_checkpoints(out))
    assert step in (4, 5)
    assert f"checkpoint-{step}" in stopped[0]
    assert ckpt.checkpoint_problem(out / f"checkpoint-{step}") is None
    assert not (out / LOCK_FILE).exists()

    # The resume is the command the message gives (`python -m domainlm ...`, or this test's
    # interpreter by its path where `python` on PATH is another one), run as a shell would.
    hint = stopped[0].split("To resume, run ", 1)[1].split(" (it continues", 1)[0]
    done = subprocess.run(
        shlex.split(hint), cwd=corpus, env=env_for(corpus), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert f"checkpoint-{step} at step {step}" in done.stderr
    assert_same_weights(out, reference)
    assert metric_events(out) == metric_events(reference)


# `domainlm train` sending itself SIGTERM as one function (argv[1]: "module:attribute") starts.
SIGNALLED_IN = KILLED_IN.format(
    when="True",
    before="import signal; os.kill(os.getpid(), signal.SIGTERM); return real(*args, **kwargs)",
).replace("        os._exit(137)\n", "")


@pytest.mark.parametrize(
    "target",
    ["domainlm.run.train:decide_resume", "domainlm.run.boundaries:Evaluation.initial"],
    ids=["lock-held", "initial-evaluation"],
)
def test_sigterm_during_set_up_is_one_line_143_and_releases_the_lock(
    corpus: Path, reference: Path, tmp_path: Path, target: str
) -> None:
    """A SIGTERM before the step loop (the lock held, the weights not read yet; or during the
    validation before training): one line and exit 143, the lock released (SIGTERM's default
    action ended the process silently, exit -15, leaving the lock), and the same command then
    trains the run an uninterrupted one does."""
    out = tmp_path / "out"
    cmd = train_cmd(corpus, out)[2:]  # without `-m domainlm`
    stopped = subprocess.run([sys.executable, "-c", SIGNALLED_IN, target, *cmd[1:]], cwd=corpus,
                             env=env_for(corpus), capture_output=True, text=True)  # fmt: skip
    assert stopped.returncode == 143, stopped.stderr
    lines = stopped.stderr.strip().splitlines()
    assert "Traceback" not in stopped.stderr and lines[-1].startswith("domainlm: stopped: SIGTERM")
    assert "during set-up" in lines[-1] and "To start it again, run" in lines[-1], lines[-1]
    assert not (out / LOCK_FILE).exists()
    done = subprocess.run(train_cmd(corpus, out), cwd=corpus, env=env_for(corpus),
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert_same_weights(out, reference)


def test_the_resume_hint_is_the_command_as_the_user_can_type_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`domainlm` when that is the one on PATH, else its path; a torchrun rank, which cannot see
    torchrun's command line, says so (its own `python -m domainlm` would start one process)."""
    from domainlm.run import guard
    from domainlm.run.guard import resume_command

    for name in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    on_path, elsewhere = tmp_path / "bin" / "domainlm", tmp_path / "venv" / "bin" / "domainlm"
    for script in (on_path, elsewhere):
        script.parent.mkdir(parents=True)
        script.write_text("#!/bin/sh\n")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", str(on_path.parent))
    args = ["train", "--output-dir", "my run"]
    monkeypatch.setattr(sys, "argv", [str(on_path), *args])
    assert resume_command() == "domainlm train --output-dir 'my run'"
    monkeypatch.setattr(sys, "argv", [str(elsewhere), *args])
    assert resume_command() == f"{elsewhere} train --output-dir 'my run'"
    # What would not continue the run is left out: --overwrite-output-dir would remove it,
    # --resume never refuse it, --resume PATH go back to where it began (auto finds the newest).
    # As typed where nothing is to continue from.
    typed = [*args, "--overwrite_output_dir", "--resume", "never", "--resume=out/checkpoint-2",
             "--seed", "3"]  # fmt: skip
    monkeypatch.setattr(guard, "RUN_FLAGS", guard.RunFlags(overwrite=True, resume="never"))
    monkeypatch.setattr(sys, "argv", [str(on_path), *typed])
    assert resume_command() == "domainlm train --output-dir 'my run' --seed 3"
    assert resume_command(continues=False) == shlex.join(["domainlm", *sys.argv[1:]])
    # A --config file's overwrite or resume, typed too or not, is turned off after it (the
    # printed command removed the run when the file set overwrite_output_dir and it was typed).
    for extra in ([], ["--overwrite-output-dir", "--resume", "never"]):
        monkeypatch.setattr(sys, "argv", [str(on_path), *args, "--config", "c.yaml", *extra])
        assert resume_command() == (
            "domainlm train --output-dir 'my run' --config c.yaml --no-overwrite-output-dir "
            "--resume auto"
        )
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "domainlm" / "__main__.py"), *args])
    monkeypatch.setattr(guard, "RUN_FLAGS", guard.RunFlags())
    assert resume_command() == "the same torchrun command again"
    monkeypatch.setattr(guard, "RUN_FLAGS", guard.RunFlags(overwrite=True))
    monkeypatch.setattr(sys, "argv", [sys.argv[0], *args, "--config", "c.yaml"])
    assert resume_command() == "the same torchrun command again with --no-overwrite-output-dir"
    monkeypatch.setattr(sys, "argv", [sys.argv[0], *args, "--overwrite-output-dir"])
    assert resume_command() == "the same torchrun command again without --overwrite-output-dir"


def test_sigint_exits_130_and_the_lock_refuses_a_second_run(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    cmd = train_cmd(corpus, out)
    proc = subprocess.Popen(
        cmd,
        # 8 s pauses: the first run surely lives while the second one starts up
        cwd=corpus,  # `python -m` imports from the working folder: the same for all runs
        env=env_for(corpus, DOMAINLM_INJECT_STEP_DELAY="8"),
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_step(out, 1, proc)
    # A second run on the same folder while the first lives: refused, nothing touched.
    before = sorted(p.name for p in out.iterdir())
    assert cli_main(cmd[3:]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("domainlm:")]
    assert len(lines) == 1 and f"in use by another run (process {proc.pid}" in lines[0]
    assert "Traceback" not in err
    assert proc.poll() is None  # the first run goes on

    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "SIGINT: stopped after step" in stderr
    # The refused run deleted nothing (the lock went with the first run, as it should).
    assert set(before) - {LOCK_FILE} <= {p.name for p in out.iterdir()}
    assert not (out / LOCK_FILE).exists()


def test_second_ctrl_c_stops_at_once(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen(
        train_cmd(corpus, out),
        cwd=corpus,  # `python -m` imports from the working folder: the same for all runs
        env=env_for(corpus, DOMAINLM_INJECT_STEP_DELAY="30"),  # step 1, then a long pause
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_step(out, 1, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - started < 20  # did not sit out the 30 s pause
    assert proc.returncode == 130
    assert "domainlm: interrupted" in stderr and "stopped after step" not in stderr
    assert ckpt.list_checkpoints(out) == []  # stopped at once: no checkpoint of step 1


# ----------------------------------------------------------------------------- the lock


def test_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        RunLock(out).acquire().release()  # free folder: taken and released
        lock = out / LOCK_FILE
        lock.write_text(json.dumps({"pid": live.pid, "host": socket.gethostname()}))
        with pytest.raises(Exception, match=f"in use by another run \\(process {live.pid}"):
            RunLock(out).acquire()
        assert json.loads(lock.read_text())["pid"] == live.pid  # not touched
        lock.write_text(json.dumps({"pid": live.pid, "host": "another-host"}))
        with pytest.raises(Exception, match="on host another-host; if that run is over, remove"):
            RunLock(out).acquire()
    finally:
        live.kill()
        live.wait()
    lock.write_text(json.dumps({"pid": live.pid, "host": socket.gethostname()}))  # now dead
    taken = RunLock(out).acquire()
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    taken.release()
    assert not lock.exists() and out.is_dir()


# ----------------------------------------------------------------------------- numerical faults


def small_run(model_dir: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", str(model_dir),
        "--train-file", str(corpus / "train.txt"),
        "--validation-file", str(corpus / "valid.txt"),
        "--output-dir", str(out), "--block-size", "32", "--batch-size", "2",
        "--logging-steps", "1", "--lr", "1e-3", "--precision", "fp32", "--quiet",
        *extra,
    ]  # fmt: skip


def test_nan_steps_are_skipped_without_update(
    tiny_model_dir: Path,
    corpus: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DOMAINLM_INJECT_NAN_STEPS", "1,2")
    out = tmp_path / "out"
    assert cli_main(small_run(tiny_model_dir, corpus, out, "--max-steps", "2")) == 0
    err = capsys.readouterr().err
    assert "step 1: NaN/Inf loss or gradient norm, step skipped (1 in a row" in err
    assert "step 2: NaN/Inf loss or gradient norm, step skipped (2 in a row, 2 in all)" in err
    # Both steps were skipped: the saved model is the initial one, finite, bit for bit.
    assert_same_weights(out, tiny_model_dir)
    losses = [e["loss"] for e in metric_events(out) if "loss" in e]
    assert len(losses) == 2 and all(math.isnan(x) for x in losses)  # logged as NaN, not 0


def test_too_many_bad_steps_stop_with_exit_3_and_no_final_model(
    tiny_model_dir: Path,
    corpus: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DOMAINLM_INJECT_NAN_STEPS", "2,3,4")
    out = tmp_path / "out"
    args = small_run(tiny_model_dir, corpus, out, "--max-steps", "6", "--save-steps", "2")
    assert cli_main([*args, "--max-bad-steps", "3"]) == 3
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("domainlm:")]
    assert len(lines) == 1
    assert "3 consecutive steps (up to step 4) had a NaN/Inf loss" in lines[0]
    assert f"the last good checkpoint is {out / 'checkpoint-2'}" in lines[0]
    assert not (out / "model.safetensors").exists()  # no final model
    for c in ckpt.list_checkpoints(out):
        assert all(
            torch.isfinite(t).all() for t in load_file(c.path / "model.safetensors").values()
        )


def test_a_model_that_diverged_on_its_last_step_is_not_saved(
    tiny_model_dir: Path, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--lr 1e10: step 1 leaves finite weights whose outputs overflow, step 2 is skipped as bad
    (one of --max-bad-steps), and the last step's validation perplexity is NaN. The run used to
    exit 0 with that model saved, its NaN checkpoint named the best; now it stops with exit 3,
    no model folder, and no NaN checkpoint counts as the best."""
    out = tmp_path / "out"
    args = small_run(tiny_model_dir, corpus, out, "--max-steps", "2", "--save-steps", "1",
                     "--lr", "1e10")  # fmt: skip
    assert cli_main(args) == 3
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("domainlm:")]
    assert len(lines) == 1 and "Traceback" not in lines[0]
    assert "the model of step 2 scores a validation perplexity of nan" in lines[0]
    assert "(the training diverged) and was not saved" in lines[0] and "Lower --lr" in lines[0]
    assert not (out / "model.safetensors").exists() and not (out / "eval_results.json").exists()
    scores = {c.step: c.eval_perplexity for c in ckpt.list_checkpoints(out)}
    assert math.isnan(scores[2])
    best = ckpt.best_checkpoint(ckpt.list_checkpoints(out))
    assert best is None or math.isfinite(best.eval_perplexity or math.nan)
    if best is not None:
        assert f"the best checkpoint is {best.path}" in lines[0]


# ----------------------------------------------------------------------------- out of memory


def test_oom_halves_micro_batch_and_matches_smaller_batch_run(
    corpus: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """batch 4 x accum 1 with OOM above 2 rows == batch 2 x accum 2 (dropout on: RNG restored)."""
    common = ["--max-steps", "3", "--save-steps", "100"]

    def run(out: Path, *extra: str) -> None:
        args = small_run(Path("scratch:tiny"), corpus, out, *common, *extra)
        assert cli_main(args) == 0

    run(tmp_path / "small", "--batch-size", "2", "--grad-accum", "2")
    capsys.readouterr()
    monkeypatch.setenv("DOMAINLM_INJECT_OOM_ABOVE", "2")
    run(tmp_path / "oom", "--batch-size", "4", "--grad-accum", "1")
    err = capsys.readouterr().err
    assert (
        "out of memory at micro-batch 4 x accumulation 1; retrying the step with 2 x 2 "
        "(same effective batch)" in err
    )
    assert "out of memory in evaluation at batch 4; retrying with 2" in err
    assert err.count("retrying the step") == 1  # the halved split is kept for later steps
    wa = load_file(tmp_path / "oom" / "model.safetensors")
    wb = load_file(tmp_path / "small" / "model.safetensors")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6)
    ea = [e for e in metric_events(tmp_path / "oom") if "eval_ppl" in e]
    eb = [e for e in metric_events(tmp_path / "small") if "eval_ppl" in e]
    assert [e["eval_ppl"] for e in ea] == pytest.approx([e["eval_ppl"] for e in eb], rel=1e-6)


def test_oom_after_dropout_and_gradients_retries_the_step_exactly(
    corpus: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The error comes after the first micro-batch's forward (dropout drawn, scratch:tiny has
    dropout 0.1) and backward (gradient accumulated): the retry must restore the RNG and clear the
    gradient to match a run at the smaller split. Without either, the weights differ."""
    common = ["--max-steps", "3", "--save-steps", "100", "--eval-steps", "100"]

    def run(out: Path, *extra: str) -> None:
        args = small_run(Path("scratch:tiny"), corpus, out, *common, *extra)
        assert cli_main(args) == 0

    run(tmp_path / "small", "--batch-size", "1", "--grad-accum", "4")
    capsys.readouterr()
    monkeypatch.setenv("DOMAINLM_INJECT_OOM_AFTER_BACKWARD", "1")
    run(tmp_path / "oom", "--batch-size", "2", "--grad-accum", "2")
    err = capsys.readouterr().err
    assert err.count("out of memory at micro-batch 2 x accumulation 2; retrying the step") == 1
    wa = load_file(tmp_path / "oom" / "model.safetensors")
    wb = load_file(tmp_path / "small" / "model.safetensors")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6)
    la = [e["loss"] for e in metric_events(tmp_path / "oom") if "loss" in e]
    lb = [e["loss"] for e in metric_events(tmp_path / "small") if "loss" in e]
    assert len(la) == 3 and la == pytest.approx(lb, rel=1e-6)


def test_oom_at_micro_batch_one_is_a_clear_stop(
    tiny_model_dir: Path,
    corpus: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DOMAINLM_INJECT_OOM_ABOVE", "0")
    rc = cli_main(small_run(tiny_model_dir, corpus, tmp_path / "out", "--max-steps", "1"))
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("domainlm:")]
    assert rc == 1 and len(lines) == 1 and "out of memory" in lines[0]


# ----------------------------------------------------------------------------- checkpoints


def test_corrupted_or_unmarked_checkpoint_is_skipped_for_the_previous(
    tiny_model_dir: Path, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = small_run(tiny_model_dir, corpus, out, "--save-steps", "2")
    assert cli_main([*args, "--max-steps", "6"]) == 0
    # checkpoint-6: flip bytes in the middle of its weights; checkpoint-4: no marker (cut short).
    weights = out / "checkpoint-6" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 8] = bytes(b ^ 0xFF for b in data[len(data) // 2 :][:8])
    weights.write_bytes(bytes(data))
    (out / "checkpoint-4" / ckpt.MARKER).unlink()
    capsys.readouterr()
    assert cli_main([*args, "--max-steps", "7"]) == 0
    err = capsys.readouterr().err
    assert "skipping checkpoint-6: model.safetensors does not match its checksum" in err
    assert "skipping checkpoint-4: no completion marker" in err
    assert f"resuming from {out / 'checkpoint-2'} at step 2" in err
    steps = [e["step"] for e in metric_events(out) if "loss" in e]
    assert steps == list(range(1, 8))  # events after step 2 were replaced, none doubled


def test_rotation_deletes_only_after_the_new_checkpoint_is_complete(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from domainlm.model.loading import load_model

    loaded = load_model(str(tiny_model_dir))
    out = tmp_path / "out"
    out.mkdir()
    state = {"step": 1, "epoch": 0, "offset": 0}
    ckpt.save_checkpoint(out, 1, loaded.model, loaded.tokenizer, state)

    # A save that dies half-way (disk full while writing the training state) ...
    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError("No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(ckpt.torch, "save", disk_full)
        with pytest.raises(OSError):
            ckpt.save_checkpoint(out, 2, loaded.model, loaded.tokenizer, {**state, "step": 2})
    # ... leaves the old checkpoint intact and no checkpoint-2, only a temporary folder.
    assert [c.step for c in ckpt.list_checkpoints(out)] == [1]
    assert ckpt.checkpoint_problem(out / "checkpoint-1") is None
    assert not (out / "checkpoint-2").exists()

    # A complete save, then rotation to 1: checkpoint-1 goes, and only once 2 was complete.
    seen_when_deleting: list[str | None] = []
    real_rmtree = ckpt.shutil.rmtree

    def watching_rmtree(path: Path, *args: object, **kwargs: object) -> None:
        if Path(path).name == "checkpoint-1":
            seen_when_deleting.append(ckpt.checkpoint_problem(out / "checkpoint-2"))
        real_rmtree(path, *args, **kwargs)

    ckpt.save_checkpoint(out, 2, loaded.model, loaded.tokenizer, {**state, "step": 2})
    monkeypatch.setattr(ckpt.shutil, "rmtree", watching_rmtree)
    deleted = ckpt.rotate_checkpoints(out, keep=1)
    assert [p.name for p in deleted] == ["checkpoint-1"] and seen_when_deleting == [None]
    assert [c.step for c in ckpt.list_checkpoints(out)] == [2]
    assert not any(p.name.startswith(".checkpoint-2") for p in out.iterdir())
