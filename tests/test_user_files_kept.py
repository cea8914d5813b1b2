"""What a command writes never replaces a file of the user's: `demo --output-dir`,
`report --output` and `perplexity --per-line` refuse a file there that they did not write (one
line, exit 2, the file intact), and replace their own when run again; checkpoint rotation keeps a
checkpoint that holds a user's file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ModuleTemp, uneven_corpus, write_lines

from domainlm.cli import main as cli_main
from domainlm.demo import DEMO_MARKER


def refused(capsys: pytest.CaptureFixture[str], args: list[str], *expected: str) -> str:
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("domainlm: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def test_a_demo_stopped_with_ctrl_c_continues_where_it_stopped(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """The demo's stop line says that the same command continues from the newest checkpoint:
    it does (it used to remove the checkpoints and train from step 0); a demo run to its end is
    trained again from the start."""
    import os
    import signal

    from domainlm.run import guard

    out = tmp_path / "demo"
    demo = ["demo", "--output-dir", str(out), "--preset", "scratch:tiny", "--max-steps", "4"]
    calls = {"n": 0}

    def ctrl_c_after_step_2() -> None:  # fit calls guard.step_delay once per step
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with monkeypatch.context() as patch:
        patch.setattr(guard, "step_delay", ctrl_c_after_step_2)
        assert cli_main(demo) == 130
    err = capsys.readouterr().err
    assert "stopped after step 2" in err and "it continues from the newest checkpoint" in err
    assert cli_main(demo) == 0
    err = capsys.readouterr().err
    assert f"resuming from {out / 'model' / 'checkpoint-2'} at step 2" in err, err
    assert "removed" not in err
    assert "finished" in json.loads((out / "model" / "run_config.json").read_text())
    assert cli_main(demo) == 0  # finished: the demo runs again from the start
    assert "removed" in capsys.readouterr().err


def test_a_demo_killed_while_writing_its_corpus_is_still_the_demos(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """The demo's marker is written before its corpus: stopped while writing data/train.txt,
    the folder is still the demo's, and the next demo rewrites it (it refused the half-written
    file as a user's, in every later demo there)."""
    out = tmp_path / "demo"
    real = Path.write_text

    def cut_short(self: Path, text: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.name == "train.txt":
            real(self, text[:100], *args, **kwargs)
            raise KeyboardInterrupt  # as a kill there: nothing after it runs
        return real(self, text, *args, **kwargs)

    demo = ["demo", "--output-dir", str(out), "--preset", "scratch:tiny", "--max-steps", "1"]
    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_text", cut_short)
        assert cli_main(demo) == 130
    capsys.readouterr()
    assert cli_main(demo) == 0, capsys.readouterr().err
    assert (out / "model" / "model.safetensors").is_file()


def test_demo_keeps_a_users_data_and_rewrites_its_own(tmp_path: Path, capsys, monkeypatch) -> None:
    folder = tmp_path / "u"
    (folder / "data").mkdir(parents=True)
    mine = folder / "data" / "train.txt"
    mine.write_text("MINE\n")
    demo = ["demo", "--output-dir", str(folder), "--preset", "scratch:tiny"]
    refused(capsys, [*demo, "--max-steps", "1"], f"{mine} exists and was not written by")
    assert mine.read_text() == "MINE\n" and not (folder / "model").exists()
    refused(capsys, [*demo, "--max-steps", "0"], "--max-steps must be a positive number")
    (tmp_path / "afile").write_text("MINE\n")  # --output-dir a file: one line, the file kept
    refused(capsys, ["demo", "--output-dir", str(tmp_path / "afile"), "--preset", "scratch:tiny"],
            f"cannot create {tmp_path / 'afile' / 'data'} (Not a directory)")  # fmt: skip
    assert (tmp_path / "afile").read_text() == "MINE\n"
    own = tmp_path / "demo"
    refused(capsys, ["demo", "--output-dir", str(own), "--preset", "scratch:nope"],
            "unknown preset scratch:nope")  # fmt: skip
    assert not own.exists()  # refused before its corpus is written
    adapter = tmp_path / "adapter"  # a LoRA adapter folder (its config alone): likewise
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "scratch:tiny"}')
    refused(capsys, ["demo", "--output-dir", str(own), "--preset", str(adapter)],
            "is a LoRA adapter folder: the demo trains a whole model")  # fmt: skip
    assert not own.exists()
    monkeypatch.chdir(adapter)  # an empty --output-dir: the working folder, not filled
    refused(capsys, ["demo", "--output-dir", "", "--preset", "scratch:tiny"],
            "--output-dir is empty")  # fmt: skip
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub model not in the cache, offline: likewise
    refused(capsys, ["demo", "--output-dir", str(own), "--preset", "nobody/no-such-model"],
            "could not read the config of nobody/no-such-model")  # fmt: skip
    assert not own.exists()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert cli_main(["demo", "--output-dir", str(own), "--preset", "scratch:tiny",
                     "--max-steps", "1"]) == 0  # fmt: skip
    assert (own / DEMO_MARKER).is_file() and (own / "model" / "model.safetensors").is_file()
    assert "--warmup-steps" not in capsys.readouterr().err  # not a flag the user gave
    (own / "data" / "valid.txt").write_text("edited by the demo's owner\n")
    assert cli_main(["demo", "--output-dir", str(own), "--preset", "scratch:tiny",
                     "--max-steps", "1"]) == 0  # its own folder: rewritten  # fmt: skip
    assert (own / "data" / "valid.txt").read_text() != "edited by the demo's owner\n"


@pytest.fixture(scope="module")
def run_folder(tiny_model_dir: Path, module_tmp: ModuleTemp) -> Path:
    root = module_tmp.mktemp("kept")
    train = write_lines(root / "train.txt", uneven_corpus(30, seed=0))
    valid = write_lines(root / "valid.txt", uneven_corpus(6, seed=1))
    out = root / "run"
    assert cli_main(["train", "--model", str(tiny_model_dir), "--train-file", str(train),
                     "--validation-file", str(valid), "--output-dir", str(out),
                     "--block-size", "32", "--batch-size", "2", "--max-steps", "2",
                     "--precision", "fp32", "--quiet"]) == 0  # fmt: skip
    return out


def test_report_keeps_a_users_files_and_another_runs_report(
    run_folder: Path, tmp_path: Path, capsys
) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "summary.md").write_text("mine\n")
    refused(capsys, ["report", str(run_folder), "--output", str(folder)],
            "summary.md there was not written by domainlm")  # fmt: skip
    assert (folder / "summary.md").read_text() == "mine\n"
    assert sorted(p.name for p in folder.iterdir()) == ["summary.md"]
    other = tmp_path / "other"
    (other).mkdir()
    (other / "run_config.json").write_text("{}")
    (other / "report.html").write_text("<!DOCTYPE html>\n<title>other - domainlm report</title>")
    refused(capsys, ["report", str(run_folder), "--output", str(other)],
            "is another training run's folder")  # fmt: skip
    fresh = tmp_path / "fresh"
    for _ in range(2):  # its own files: replaced
        assert cli_main(["report", str(run_folder), "--output", str(fresh)]) == 0
    assert (fresh / "report.html").is_file() and (fresh / "summary.md").is_file()
    assert cli_main(["report", str(run_folder)]) == 0  # the run's own folder: refreshed


def test_per_line_scores_keep_a_users_file_and_replace_their_own(
    run_folder: Path, tmp_path: Path, capsys
) -> None:
    metrics = run_folder / "metrics.jsonl"
    before = metrics.read_bytes()
    valid = run_folder.parent / "valid.txt"
    base = ["perplexity", "--model", str(run_folder), "--file", str(valid), "--quiet"]
    refused(capsys, [*base, "--per-line", str(metrics)],
            f"--per-line {metrics} exists and is not a per-line scores file")  # fmt: skip
    assert metrics.read_bytes() == before
    notes = tmp_path / "notes.csv"
    notes.write_text("a,b\n1,2\n")
    refused(capsys, [*base, "--per-line", str(notes)], "name another file")
    assert notes.read_text() == "a,b\n1,2\n"
    for suffix in ("jsonl", "csv"):
        scores = tmp_path / f"scores.{suffix}"
        for _ in range(2):  # written, then replaced by the same command
            assert cli_main([*base, "--per-line", str(scores)]) == 0
        lines = scores.read_text().splitlines()
        assert len(lines) == 6 + (suffix == "csv")
        if suffix == "jsonl":
            assert json.loads(lines[0])["line"] == 1
    capsys.readouterr()


@pytest.mark.parametrize("async_save", [False, True])
def test_rotation_keeps_a_checkpoint_holding_a_users_file(
    tiny_model_dir: Path, tmp_path: Path, capsys, async_save: bool
) -> None:
    train = write_lines(tmp_path / "train.txt", uneven_corpus(30, seed=0))
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--train-file", str(train),
            "--output-dir", str(out), "--block-size", "32", "--batch-size", "2",
            "--save-steps", "1", "--save-total-limit", "1", "--precision", "fp32", "--quiet",
            *(["--async-save"] if async_save else [])]  # fmt: skip
    assert cli_main([*args, "--max-steps", "1"]) == 0
    notes = out / "checkpoint-1" / "NOTES.md"
    notes.write_text("the checkpoint I sent to review\n")
    before = {p.name: p.read_bytes() for p in (out / "checkpoint-1").iterdir()}
    capsys.readouterr()
    assert cli_main([*args, "--max-steps", "4"]) == 0
    err = capsys.readouterr().err
    # checkpoint-2 and -3 rotated away as usual; checkpoint-1 stays whole, said once.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-4"]
    assert {p.name: p.read_bytes() for p in (out / "checkpoint-1").iterdir()} == before
    kept = [x for x in err.splitlines() if "checkpoint-1 is kept past --save-total-limit" in x]
    assert len(kept) == 1 and "NOTES.md" in kept[0], err


def small_run(model: Path, tmp_path: Path) -> tuple[list[str], Path]:
    """`train` arguments of a small run saving every 2 steps (--max-steps left to the test),
    and its output folder."""
    train = write_lines(tmp_path / "train.txt", uneven_corpus(30, seed=0))
    out = tmp_path / "run"
    args = ["train", "--model", str(model), "--train-file", str(train), "--output-dir", str(out),
            "--block-size", "32", "--batch-size", "2", "--save-steps", "2", "--precision", "fp32",
            "--quiet"]  # fmt: skip
    return args, out


def test_a_resume_refuses_a_users_folder_named_like_a_checkpoint_it_would_write(
    tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    """A folder of the user's named checkpoint-6 in a run that will save step 6: continuing the
    run is refused in one line, the folder intact (the save replaced it, notes and all)."""
    args, out = small_run(tiny_model_dir, tmp_path)
    assert cli_main([*args, "--max-steps", "4"]) == 0
    (out / "checkpoint-6").mkdir()
    (out / "checkpoint-6" / "notes.txt").write_text("mine\n")
    capsys.readouterr()
    refused(
        capsys,
        [*args, "--max-steps", "8"],
        f"--output-dir {out} holds checkpoint-6, which domainlm did not write",
    )
    assert (out / "checkpoint-6" / "notes.txt").read_text() == "mine\n"
    assert not (out / "checkpoint-8").exists()


def test_a_report_written_into_a_run_does_not_stop_its_resume(
    tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    """`domainlm report RUN` writes summary.md (and, for a run not finished yet, plots and
    report.html) into the run's folder; the run's next command resumed it no more ("holds
    summary.md, which domainlm did not write"). A report's own files are known by their
    contents; a user's file that train would write over is still refused."""
    args, out = small_run(tiny_model_dir, tmp_path)
    assert cli_main([*args, "--max-steps", "2"]) == 0
    assert cli_main(["report", str(out)]) == 0 and (out / "summary.md").is_file()
    assert cli_main([*args, "--max-steps", "4"]) == 0
    (out / "summary.md").write_text("my own summary\n")  # train never writes one: left alone
    assert cli_main([*args, "--max-steps", "6"]) == 0
    assert (out / "summary.md").read_text() == "my own summary\n"
    (out / "samples.jsonl").write_text("mine\n")  # a name a run writes: refused
    capsys.readouterr()
    refused(capsys, [*args, "--max-steps", "8"], "holds samples.jsonl, which domainlm did not")


def test_an_epochs_resume_at_a_larger_batch_refuses_a_users_folder_at_its_true_last_step(
    tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    """An --epochs run resumed at twice the batch counts its steps from the data position: its
    last step lies beyond the new batch's count from step 0, and a user's folder named for it is
    refused as well, not written over."""
    train = write_lines(tmp_path / "train.txt", uneven_corpus(30, seed=0))
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--train-file", str(train),
            "--output-dir", str(out), "--block-size", "32", "--save-steps", "100",
            "--precision", "fp32", "--quiet"]  # fmt: skip
    assert cli_main([*args, "--epochs", "1", "--batch-size", "2"]) == 0
    steps = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    last = steps + -(-steps // 2)  # an epoch in 2-block steps, then one in 4-block steps
    assert last > 2 * -(-steps // 2)  # beyond 2 epochs' steps at 4 blocks a step from step 0
    (out / f"checkpoint-{last}").mkdir()
    (out / f"checkpoint-{last}" / "notes.txt").write_text("mine\n")
    capsys.readouterr()
    refused(
        capsys,
        [*args, "--epochs", "2", "--batch-size", "4"],
        f"--output-dir {out} holds checkpoint-{last}, which domainlm did not write",
    )
    assert (out / f"checkpoint-{last}" / "notes.txt").read_text() == "mine\n"


def test_a_demo_preset_with_a_shorter_context_trains_at_its_context(tmp_path: Path) -> None:
    """The demo trains at 256 tokens a block; a --preset folder of 128 positions was refused
    with "--block-size 256 is larger than the context ...", naming a flag the demo lacks."""
    from domainlm.model.loading import save_scratch_folder

    model = save_scratch_folder("tiny", tmp_path / "short", seed=0, n_positions=128)
    out = tmp_path / "demo"
    assert (
        cli_main(["demo", "--output-dir", str(out), "--preset", str(model), "--max-steps", "2"])
        == 0
    )
    run = json.loads((out / "model" / "run_config.json").read_text())
    assert run["identity"]["block_size"] == 128
