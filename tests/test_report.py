"""Samples while training, plots, the summary table, the model card and loggers (issue 8)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ModuleTemp, refuse_writes_in, uneven_corpus, write_lines

from domainlm import TrainConfig, train
from domainlm.cli import main
from domainlm.errors import UserError
from domainlm.run.checkpoint import read_run_file, remove_owned_files
from domainlm.run.report import CARD_MARKER, PLOTS, plot_runs, read_run, run_report

PROMPTS = ["the cat", "a dog"]


@pytest.fixture(scope="module")
def runs(module_tmp: ModuleTemp) -> tuple[Path, Path]:
    """Two short runs, the same but for --sample-prompts (and the learning rate of a third...).

    The model has dropout on (GPT-2's 0.1): a sampler that left the model in eval mode, or that
    drew from the training's RNG, would change the losses after its first sample.
    """
    from domainlm.model.loading import save_scratch_folder

    base = module_tmp.mktemp("report-runs")
    model_dir = save_scratch_folder("tiny", base / "model", seed=0)
    train_file = write_lines(base / "train.txt", uneven_corpus(40))
    valid_file = write_lines(base / "valid.txt", uneven_corpus(6, seed=1))
    common = dict(
        model=str(model_dir),
        train_file=str(train_file),
        validation_file=str(valid_file),
        block_size=32,
        batch_size=2,
        max_steps=4,
        save_steps=2,
        logging_steps=1,
        lr=1e-3,
        precision="fp32",
        quiet=True,
        cache_dir=str(base / "cache"),
    )
    sampled = base / "sampled"
    train(
        TrainConfig(
            output_dir=str(sampled),
            sample_prompts=PROMPTS,
            sample_every=2,
            sample_max_new_tokens=6,
            **common,
        )
    )
    plain = base / "plain"
    train(TrainConfig(output_dir=str(plain), **common))
    return sampled, plain


def train_losses(run: Path) -> list[float]:
    return [e["loss"] for e in read_run(run).train]


def test_samples_while_training_leave_the_run_unchanged(runs: tuple[Path, Path]) -> None:
    sampled, plain = runs
    records = [json.loads(line) for line in (sampled / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in records] == [
        (2, "the cat"),
        (2, "a dog"),
        (4, "the cat"),
        (4, "a dog"),
    ]
    assert all(isinstance(r["text"], str) for r in records)
    assert not (plain / "samples.jsonl").exists()
    # the sampler draws from its own generator inside a forked RNG and puts the model back in
    # train mode: the same losses to the bit, with dropout on
    assert json.loads((sampled / "config.json").read_text())["resid_pdrop"] == 0.1
    assert train_losses(sampled) == train_losses(plain)
    assert read_run(sampled).evals == read_run(plain).evals


def decode_png(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    return imread(path)


def test_plots_are_written_valid_and_show_curves(runs: tuple[Path, Path]) -> None:
    sampled, _ = runs
    for name in PLOTS:
        image = decode_png(sampled / name)
        assert image.shape[:2] == (500, 800)
        rgb = image[..., :3].reshape(-1, 3)
        # not blank: many distinct colours (curve, axes, text), and the curve's blue is there
        assert len(np.unique(rgb, axis=0)) > 50
        blue = (rgb[:, 2] > 0.6) & (rgb[:, 0] < 0.3)
        assert blue.sum() > 100, name


def test_model_card(runs: tuple[Path, Path]) -> None:
    sampled, _ = runs
    card = (sampled / "README.md").read_text()
    assert card.startswith("---\n") and CARD_MARKER in card
    meta = yaml.safe_load(card.split("---\n")[1])
    results = json.loads((sampled / "eval_results.json").read_text())
    assert meta["pipeline_tag"] == "text-generation"
    metric = meta["model-index"][0]["results"][0]["metrics"][0]
    assert metric["type"] == "perplexity" and metric["value"] == round(results["perplexity"], 4)
    assert meta["domainlm_data"]["train_documents"] == 40
    assert meta["domainlm_data"]["validation_documents"] == 6
    assert f"{results['initial_perplexity']:.3f} before training" in card
    assert f"{results['perplexity']:.3f} after" in card
    assert "| lr | 0.001 |" in card and "| block_size | 32 |" in card
    assert "](validation_perplexity.png)" in card


def test_report_files_are_owned_by_the_run(runs: tuple[Path, Path], tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(runs[0], copy)
    written = set(read_run_file(copy)["written"])
    assert {"README.md", "samples.jsonl", "report.html", *PLOTS} <= written
    (copy / "notes.txt").write_text("mine")
    remove_owned_files(copy)  # what --overwrite-output-dir does
    left = {p.name for p in copy.iterdir()}
    assert not left & {"README.md", "samples.jsonl", "report.html", *PLOTS}
    assert "notes.txt" in left


def test_report_over_two_runs(
    runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    assert main(["report", str(runs[0]), str(runs[1]), "--output", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| sampled |" in table and "| plain |" in table
    assert sorted(p.name for p in out.iterdir()) == sorted([*PLOTS, "summary.md", "report.html"])
    assert [line[:2] for line in (out / "summary.md").read_text().splitlines()].count("| ") == 3
    # two curves overlaid: matplotlib's first two colours (blue, orange) are both drawn
    rgb = decode_png(out / "training_loss.png")[..., :3].reshape(-1, 3)
    orange = (rgb[:, 0] > 0.9) & (rgb[:, 1] > 0.4) & (rgb[:, 1] < 0.6) & (rgb[:, 2] < 0.2)
    assert orange.sum() > 100


def test_runs_in_folders_of_one_name_are_told_apart(
    runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """experiments/*/out: each run is named by as much of its path as tells it apart, in the
    summary, the plots' legends and the page (all were `out`)."""
    import shutil

    folders = [tmp_path / "exp_a" / "out", tmp_path / "exp_b" / "out"]
    for run, folder in zip(runs, folders, strict=True):
        shutil.copytree(run, folder)
    out = tmp_path / "report"
    assert main(["report", *map(str, folders), "--output", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| exp_a/out |" in table and "| exp_b/out |" in table
    page = (out / "report.html").read_text()
    assert "<h2>Run exp_a/out" in page and "<h2>Run exp_b/out" in page
    assert "<th>exp_a/out</th><th>exp_b/out</th>" in page
    assert main(["report", str(runs[0]), str(folders[1]), "--output", str(tmp_path / "r2")]) == 0
    assert "| sampled |" in capsys.readouterr().out  # names that differ stay as they are


def test_report_refuses_a_folder_that_is_no_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(UserError, match="not a training run"):
        run_report([tmp_path], out)
    with pytest.raises(UserError, match="nothere: no such folder; give a run's --output-dir"):
        run_report([tmp_path / "nothere"], out)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match="metrics.jsonl: a file, not a folder; give the run's"):
        run_report([tmp_path / "metrics.jsonl"], out)
    assert not out.exists()


def test_a_checkpoint_and_a_run_without_its_metrics_are_said_as_what_they_are(
    runs: tuple[Path, Path], tmp_path: Path
) -> None:
    """Not "not a training run": a run's checkpoint names the run to give instead, and a run
    whose metrics.jsonl is gone says that is what is missing."""
    out, run = tmp_path / "out", runs[0]
    checkpoint = run / "checkpoint-2"
    with pytest.raises(UserError, match=f"a checkpoint of the run in {run}; give the run's"):
        run_report([checkpoint], out)
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("metrics.jsonl", "checkpoint-*"))
    with pytest.raises(UserError, match="a training run without its metrics.jsonl"):
        run_report([bare], out)
    assert not out.exists()


def test_a_report_is_not_written_into_a_runs_checkpoint_folder(
    runs: tuple[Path, Path], tmp_path: Path
) -> None:
    """--output run/checkpoint-2 (or a checkpoint-N the run has not written yet) is refused:
    report files there made the checkpoint look like the user's."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs[1], run)
    before = sorted(p.name for p in (run / "checkpoint-2").iterdir())
    for target in (run / "checkpoint-2", run / "checkpoint-90"):
        with pytest.raises(UserError, match="is a checkpoint folder of the run in"):
            run_report([run], target)
    assert sorted(p.name for p in (run / "checkpoint-2").iterdir()) == before
    assert not (run / "checkpoint-90").exists()


def test_a_foreign_readme_is_kept(runs: tuple[Path, Path], tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(runs[1], copy)
    (copy / "README.md").write_text("my own notes\n")
    run_report([copy])
    assert (copy / "README.md").read_text() == "my own notes\n"
    assert (copy / "summary.md").is_file()


def test_an_edited_card_is_kept_and_an_unedited_one_rewritten(
    runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A card the user edited (`domainlm report` rewrote it before, edits lost) is kept with a
    note; unedited, or with the edit undone, it is written again."""
    copy = tmp_path / "run"
    shutil.copytree(runs[1], copy)
    card = copy / "README.md"
    card.unlink()
    run_report([copy])
    written = card.read_text()
    run_report([copy])
    assert card.read_text() == written  # unedited: written again, the same for the same run
    card.write_text(written + "\nMY OWN NOTES\n")
    capsys.readouterr()
    run_report([copy])
    assert card.read_text() == written + "\nMY OWN NOTES\n"
    assert f"note: {card} was edited since domainlm wrote it; kept" in capsys.readouterr().err
    card.write_text(written.replace("# ", "# my title ", 1))  # an edit inside the text
    run_report([copy])
    assert card.read_text() == written.replace("# ", "# my title ", 1)
    assert "was edited since" in capsys.readouterr().err
    card.write_text(written)  # the edit undone: the card is ours again, and rewritten
    (copy / "eval_results.json").write_text(
        (copy / "eval_results.json").read_text().replace('"perplexity": ', '"perplexity": 1', 1)
    )
    run_report([copy])
    assert card.read_text() != written and "was edited since" not in capsys.readouterr().err


def test_without_matplotlib_plots_are_skipped(runs, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    assert plot_runs([read_run(runs[0])], tmp_path) == []
    assert "matplotlib cannot be imported" in capsys.readouterr().err


def test_a_run_stopped_before_its_first_validation_claims_no_result(
    runs: tuple[Path, Path], tmp_path: Path
) -> None:
    """A run stopped early: metrics.jsonl holds the step-0 validation and some training steps,
    no later validation, no eval_results.json, no model. "Perplexity after" must not be the
    untrained figure, and no model card is written into a folder without a model."""
    import json

    stopped = tmp_path / "stopped"
    stopped.mkdir()
    rows = [json.loads(x) for x in (runs[1] / "metrics.jsonl").read_text().splitlines()]
    kept = [r for r in rows if r.get("step", 0) <= 2 and ("loss" in r or r.get("step") == 0)]
    assert any("eval_ppl" in r for r in kept) and any("loss" in r for r in kept)
    (stopped / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    run_file = json.loads((runs[1] / "run_config.json").read_text())
    run_file.pop("finished", None)  # never finished
    (stopped / "run_config.json").write_text(json.dumps(run_file))
    # Ctrl-C after step 3, between logging steps: its checkpoint, no validation in it.
    (stopped / "checkpoint-3").mkdir()
    (stopped / "checkpoint-3" / "checkpoint.json").write_text('{"step": 3, "files": {}}')
    run_report([stopped])
    before = next(r["eval_ppl"] for r in kept if "eval_ppl" in r)
    row = [x.strip() for x in (stopped / "summary.md").read_text().splitlines()[-1].split("|")]
    header = [x.strip() for x in (stopped / "summary.md").read_text().splitlines()[-3].split("|")]
    after = row[header.index("perplexity after")]
    assert after != f"{before:.3f}" and after in ("?", "-", ""), row
    # the step it stopped after, not the last one logged, and said to be unfinished; no "best"
    # from the untrained model's figure alone
    assert row[header.index("steps")] == "3 (not finished)", row
    assert row[header.index("best perplexity (step)")] == "?", row
    assert not (stopped / "README.md").exists()


def test_an_unfinished_runs_page_names_the_step_of_its_latest_figure(
    runs: tuple[Path, Path], tmp_path: Path
) -> None:
    """A run killed after an evaluation: report.html gives that figure as the one at its step,
    "not finished", not as the figure "after" training."""
    import json
    import shutil

    killed = tmp_path / "killed"
    shutil.copytree(runs[1], killed)
    (killed / "eval_results.json").unlink()
    run_file = json.loads((killed / "run_config.json").read_text())
    run_file.pop("finished", None)
    (killed / "run_config.json").write_text(json.dumps(run_file))
    last = max(e["step"] for e in read_run(killed).evals)
    run_report([killed], tmp_path / "page")
    page = (tmp_path / "page" / "report.html").read_text()
    assert f"</b> at step {last} (not finished)" in page and "</b> after" not in page


def test_the_cards_settings_show_what_auto_resolved_to() -> None:
    """A block size left to domainlm showed as `| block_size | None |`, the run's 128 nowhere;
    now as the resolved precision is: `auto (128)`. A given value is shown as it is."""
    from domainlm.run.report import card_training_section

    config = {"block_size": None, "precision": "auto", "lr": 0.001, "eval_stride": None}
    took = {"block_size": 128, "precision": "bf16", "eval_stride": 127}
    rows = set(card_training_section(config, [], took))
    assert {"| block_size | auto (128) |", "| precision | auto (bf16) |", "| lr | 0.001 |"} <= rows
    assert "| eval_stride | auto (127) |" in rows
    given = card_training_section({"block_size": 64, "precision": "fp32"}, [], {"block_size": 64})
    assert {"| block_size | 64 |", "| precision | fp32 |"} <= set(given)


def test_a_report_into_a_read_only_folder_is_one_line(
    runs: tuple[Path, Path], tmp_path: Path, capsys, monkeypatch
) -> None:
    """`report RUN --output ROFS/rep` was an OSError traceback from mkdir; now one line, exit 2,
    nothing made. Tests may run as root, for whom chmod does not forbid writing, so the
    read-only file system is injected: the writability probe (tempfile.mkstemp) raises EROFS
    in the locked folder (conftest.refuse_writes_in)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    refuse_writes_in(monkeypatch, locked)
    for output in (locked / "rep", locked):
        assert main(["report", str(runs[1]), "--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert err.splitlines() == [
            f"domainlm: error: --output {output}: cannot write in the folder {locked} "
            "(Read-only file system); name a writable place"
        ], err
    assert list(locked.iterdir()) == []


def test_a_run_named_twice_is_one_and_a_runs_folder_does_not_take_a_comparison(
    runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`report a ./a` listed the run twice; `report a b --output b` replaced b's own report
    with the comparison (another run's folder was refused, a compared one not); more than 10
    runs drew the 1st and the 11th in one colour."""
    from domainlm.run.report import run_colours

    out = tmp_path / "report"
    again = runs[0].parent / ".." / runs[0].parent.name / runs[0].name
    assert main(["report", str(runs[0]), str(again), "--output", str(out)]) == 0
    capsys.readouterr()
    assert [line[:2] for line in (out / "summary.md").read_text().splitlines()].count("| ") == 2
    before = (runs[1] / "report.html").read_bytes()
    assert main(["report", str(runs[0]), str(runs[1]), "--output", str(runs[1])]) == 2
    err = capsys.readouterr().err
    assert "its own report would be replaced by the comparison" in err
    assert (runs[1] / "report.html").read_bytes() == before
    assert len(set(run_colours(20))) == 20 and len(set(run_colours(10))) == 10
