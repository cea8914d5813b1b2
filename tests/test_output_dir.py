"""--overwrite-output-dir (issue 12, item 1): only what domainlm's run file lists is removed.

A folder may also hold another tool's run (a Hugging Face Trainer's `checkpoint-500/` and
`trainer_state.json`): it survives. Names in `run_config.json` are trusted only when they are plain
names inside the folder, and removal happens on rank 0 while the other ranks wait.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import uneven_corpus, write_lines
from tiny_families import save_family_folder

from domainlm.cli import main as cli_main
from domainlm.errors import UserError
from domainlm.run import checkpoint as ckpt


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_lines(folder / "train.txt", uneven_corpus(30, seed=0))
    write_lines(folder / "valid.txt", uneven_corpus(6, seed=1))
    return folder


def seed_style(model: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    """The seed's run_clm.py spelling, with --overwrite_output_dir, on a tiny local model."""
    return [
        "train", "--model_name_or_path", str(model),
        "--train_file", str(corpus / "train.txt"),
        "--validation_file", str(corpus / "valid.txt"),
        "--do_train", "--do_eval", "--output_dir", str(out), "--overwrite_output_dir",
        "--per_device_train_batch_size", "2", "--block_size", "32", "--quiet",
        *extra,
    ]  # fmt: skip


def foreign_trainer_run(out: Path) -> dict[str, str]:
    """What a Hugging Face Trainer leaves in its output folder (contents made up, names real)."""
    files = {
        "checkpoint-500/trainer_state.json": '{"global_step": 500}',
        "checkpoint-500/optimizer.pt": "not ours",
        "trainer_state.json": '{"global_step": 500}',
        "training_args.bin": "not ours",
    }
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    return files


def test_overwrite_keeps_a_foreign_trainer_run_and_removes_our_earlier_run(
    tiny_model_dir: Path, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model"
    out.mkdir()
    foreign = foreign_trainer_run(out)
    # Our first run beside it: checkpoint-3 (and a save of checkpoint-6 cut short).
    first = seed_style(tiny_model_dir, corpus, out, "--max_steps", "3", "--save_steps", "3")
    assert cli_main(first) == 0
    assert (out / "checkpoint-3" / ckpt.MARKER).is_file()
    assert "checkpoint-3" in ckpt.read_run_file(out)["written"]
    ckpt.record_written(out, "checkpoint-6")  # as save_training_checkpoint does before a save
    (out / ".checkpoint-6.tmp").mkdir()
    (out / ".checkpoint-6.tmp" / "model.safetensors").write_text("cut short")
    (out / f".{ckpt.RUN_FILE}.tmp").write_text("{")  # a run-file update cut short
    capsys.readouterr()

    # A run refused at its last check, one that needs the weights (--packing docs, an OPT model,
    # whose attention ignores restarting position ids), removes nothing of the earlier run.
    opt = save_family_folder("opt", tmp_path / "opt")
    refused = seed_style(opt, corpus, out, "--max_steps", "2", "--packing", "docs")
    assert cli_main(refused) == 2
    assert "domainlm: error: --packing docs:" in capsys.readouterr().err
    assert (out / "checkpoint-3" / ckpt.MARKER).is_file() and (out / ".checkpoint-6.tmp").is_dir()

    # The seed's command again, another length: our earlier run goes, the Trainer's stays.
    second = seed_style(tiny_model_dir, corpus, out, "--max_steps", "2", "--save_steps", "2")
    assert cli_main(second) == 0
    assert "removed" in capsys.readouterr().err
    for name, text in foreign.items():
        assert (out / name).read_text() == text, name
    assert not (out / "checkpoint-3").exists() and not (out / ".checkpoint-6.tmp").exists()
    assert not (out / f".{ckpt.RUN_FILE}.tmp").exists()
    assert (out / "checkpoint-2" / ckpt.MARKER).is_file()
    assert "checkpoint-500" not in ckpt.read_run_file(out)["written"]


def test_overwrite_refuses_another_tools_files_of_the_names_this_run_writes(
    tiny_model_dir: Path, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another tool's checkpoint-3 where a 3-step run saves its last checkpoint is refused (any
    step of the run may be saved: an interrupt saves there), as a foreign config.json is; one
    beyond the run's steps stays (checkpoint-500 above). A run_config.json that is not a domainlm
    run's is the user's file: refused too. Nothing is written or removed by a refused run."""
    out = tmp_path / "model"
    (out / "checkpoint-3").mkdir(parents=True)
    state = out / "checkpoint-3" / "trainer_state.json"
    state.write_text('{"global_step": 3}')
    command = seed_style(tiny_model_dir, corpus, out, "--max_steps", "3")
    assert cli_main(command) == 2
    err = capsys.readouterr().err
    assert (
        f"domainlm: error: --output-dir {out} holds checkpoint-3, which domainlm did not write"
        in err
    )
    assert state.read_text() == '{"global_step": 3}' and not (out / ckpt.RUN_FILE).exists()

    (out / "checkpoint-3").rename(out / "checkpoint-4")  # beyond the run's 3 steps
    (out / ckpt.RUN_FILE).write_text("USER CONTENT")
    assert cli_main(command) == 2
    err = capsys.readouterr().err
    assert f"--output-dir {out} holds run_config.json, which domainlm did not write" in err
    assert (out / ckpt.RUN_FILE).read_text() == "USER CONTENT"

    (out / ckpt.RUN_FILE).unlink()
    mine = out / ckpt.FINAL_STAGING / "notes.txt"  # the final save's staging name, a user's
    mine.parent.mkdir()
    mine.write_text("MINE")
    assert cli_main(command) == 2
    assert f"holds {ckpt.FINAL_STAGING}, which domainlm did not write" in capsys.readouterr().err
    assert mine.read_text() == "MINE"

    shutil.rmtree(mine.parent)
    assert cli_main(command) == 0
    assert (out / "checkpoint-3" / ckpt.MARKER).is_file()
    assert (out / "checkpoint-4" / "trainer_state.json").read_text() == '{"global_step": 3}'


@pytest.mark.parametrize("bad", ["../outside", "ABSOLUTE", "sub/../../outside", "..", ""])
def test_run_file_names_outside_the_folder_delete_nothing(
    tiny_model_dir: Path,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    bad: str,
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep")
    out = tmp_path / "model"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    name = str(outside) if bad == "ABSOLUTE" else bad
    run_file = {"identity": {}, "written": ["metrics.jsonl", name]}
    (out / ckpt.RUN_FILE).write_text(json.dumps(run_file))

    with pytest.raises(UserError, match="not a name inside the folder; nothing was removed"):
        ckpt.remove_owned_files(out)
    rc = cli_main(seed_style(tiny_model_dir, corpus, out, "--max_steps", "1"))
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("domainlm:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err
    assert (outside / "precious.txt").read_text() == "keep"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", ckpt.RUN_FILE]


def test_a_listed_symlink_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep")
    out = tmp_path / "model"
    out.mkdir()
    (out / "checkpoint-1").symlink_to(outside, target_is_directory=True)
    (out / "mine.txt").write_text("ours")
    (out / ckpt.RUN_FILE).write_text(json.dumps({"written": ["checkpoint-1", "mine.txt"]}))
    assert ckpt.remove_owned_files(out) == ["mine.txt"]
    assert (outside / "precious.txt").read_text() == "keep"
    assert (out / "checkpoint-1").is_symlink()


def test_only_rank_zero_removes_and_every_rank_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from domainlm.config import TrainConfig
    from domainlm.model import distributed
    from domainlm.run.metrics import Console
    from domainlm.run.resume import clear_earlier_run, decide_resume

    out = tmp_path / "model"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    (out / ckpt.RUN_FILE).write_text(json.dumps({"written": ["metrics.jsonl"]}))
    waited: list[int] = []
    monkeypatch.setattr(distributed, "barrier", lambda ctx: waited.append(ctx.rank))
    config = TrainConfig(
        model="scratch:tiny", train_file="t.txt", output_dir=str(out), overwrite_output_dir=True
    )
    for rank in (1, 0):
        ctx = distributed.DistContext(rank=rank, world_size=2)
        assert decide_resume(config, out, {}, Console(enabled=False), ctx) is None
        assert (out / "metrics.jsonl").exists()  # deciding removes nothing
        clear_earlier_run(config, out, Console(enabled=False), ctx)
        assert (out / "metrics.jsonl").exists() == (rank == 1)  # rank 1 removed nothing
    assert waited == [1, 0]
