"""A run resumed with other training settings says so and keeps a record: one warning naming each
change, run_config.json's "history" (run/resume.py's `resume_history`), and the model card's
list under its settings table. Before, the card showed only the last command's values, as if
the whole run had used them."""

from __future__ import annotations

import json
import math
from pathlib import Path

from conftest import uneven_corpus, write_lines

from domainlm import TrainConfig, train
from domainlm.run.metrics import read_events
from domainlm.run.resume import resume_history
from domainlm.run.schedule import steps_from_position


def config(model: Path, train_file: Path, out: Path, **kw: object) -> TrainConfig:
    values: dict[str, object] = dict(
        model=str(model), train_file=str(train_file), output_dir=str(out), block_size=32,
        batch_size=2, lr=1e-3, max_steps=4, save_steps=4, eval_steps=100, logging_steps=1,
        precision="fp32", quiet=True,
    )  # fmt: skip
    values.update(kw)
    return TrainConfig(**values)


def test_a_resume_with_other_settings_is_warned_and_recorded(tiny_model_dir, tmp_path, capsys):
    train_file = write_lines(tmp_path / "train.txt", uneven_corpus(40, seed=5))
    out = tmp_path / "run"
    train(config(tiny_model_dir, train_file, out))
    assert "history" not in json.loads((out / "run_config.json").read_text())
    capsys.readouterr()
    train(config(tiny_model_dir, train_file, out, max_steps=8, lr=5e-4))  # goes on from step 4
    warned = [x for x in capsys.readouterr().err.splitlines() if "other settings" in x]
    assert len(warned) == 1, warned
    assert "resuming at step 4" in warned[0]
    assert "--max-steps 4 -> 8, --lr 0.001 -> 0.0005" in warned[0]
    run = json.loads((out / "run_config.json").read_text())
    assert run["history"] == [{"step": 4, "changed": {"max_steps": [4, 8], "lr": [0.001, 0.0005]}}]
    assert run["config"]["lr"] == 5e-4
    card = (out / "README.md").read_text()
    assert "- from step 4: max_steps 4 -> 8, lr 0.001 -> 0.0005" in card
    assert "other settings" in (out / "report.html").read_text()
    # the steps after 4 did use the new rate: none logged above it, and before 4 some were
    rates = {e["step"]: e["lr"] for e in read_events(out / "metrics.jsonl") if "lr" in e}
    assert sorted(rates) == list(range(1, 9))
    assert max(rates[s] for s in range(5, 9)) <= 5e-4 < max(rates[s] for s in range(1, 5))
    capsys.readouterr()
    train(config(tiny_model_dir, train_file, out, max_steps=8, lr=5e-4))  # the same: no change
    assert "other settings" not in capsys.readouterr().err
    assert json.loads((out / "run_config.json").read_text())["history"] == run["history"]
    train(config(tiny_model_dir, train_file, out, max_steps=8, lr=2e-4))  # finished: no step left
    warned = [x for x in capsys.readouterr().err.splitlines() if "other settings" in x]
    assert len(warned) == 1 and "resuming at step 8" in warned[0], warned
    assert "--lr 0.0005 -> 0.0002; no step is left" in warned[0]
    history = json.loads((out / "run_config.json").read_text())["history"]
    assert history == [*run["history"], {"step": 8, "changed": {"lr": [0.0005, 0.0002]}}]


def test_a_resume_with_another_global_batch_says_so_and_what_keeps_it(
    tiny_model_dir, tmp_path, capsys
):
    """--batch-size 2 -> 1: the global batch halves (a warning naming the --grad-accum that
    keeps it); --grad-accum 2 then (2 blocks again, against 1 before): said too.
    Under torchrun the ranks are one more factor (tests/test_distributed.py::
    test_two_rank_checkpoint_resumed_by_one_rank: --grad-accum 2 on 1 rank keeps 2 ranks' batch,
    said as a note)."""
    train_file = write_lines(tmp_path / "train.txt", uneven_corpus(40, seed=5))
    out = tmp_path / "run"
    train(config(tiny_model_dir, train_file, out))
    capsys.readouterr()
    train(config(tiny_model_dir, train_file, out, max_steps=6, save_steps=2, batch_size=1))
    (warned,) = [x for x in capsys.readouterr().err.splitlines() if "other settings" in x]
    assert warned.startswith("warning: resuming at step 4")
    assert "--batch-size 2 -> 1, --max-steps 4 -> 6; the global batch goes from 2 to 1 " \
        "blocks (--grad-accum 2 keeps it at 2); the steps from here use them" in warned  # fmt: skip
    train(config(tiny_model_dir, train_file, out, max_steps=8, batch_size=1, grad_accum=2))
    (said,) = [x for x in capsys.readouterr().err.splitlines() if "other settings" in x]
    assert said.startswith("warning: resuming at step 6")  # max_steps moved too: a warning
    assert "--grad-accum 1 -> 2, --max-steps 6 -> 8; the global batch goes from 1 to 2" in said


def walk_to_the_end(blocks: int, epochs: float, steps: list[tuple[int, int]]) -> int:
    """The slow reference: take global batches of blocks one step at a time, as the data cursor
    does (an epoch's last batch takes what is left), `n` steps at a batch of `size` for each
    (n, size) of `steps`; then, at the last size, step on until the blocks taken reach where a
    run at that size from step 0 ends after `epochs`. The steps taken after the given ones."""

    def take(position: tuple[int, int], size: int) -> tuple[int, int]:
        epoch, offset = position
        if offset >= blocks:
            epoch, offset = epoch + 1, 0
        return epoch, min(offset + size, blocks)

    position = (0, 0)
    for n, size in steps:
        for _ in range(n):
            position = take(position, size)
    size = steps[-1][1]
    end = (0, 0)
    for _ in range(math.ceil(epochs * math.ceil(blocks / size))):
        end = take(end, size)
    flat = lambda at: at[0] * blocks + at[1]  # noqa: E731
    more = 0
    while flat(position) < flat(end):
        position, more = take(position, size), more + 1
    return more


def test_an_epochs_run_resumed_at_another_batch_ends_at_its_last_epochs_end():
    """With --epochs, the steps left after a resume are counted from the data position at the
    new global batch (other ranks, --batch-size, --grad-accum): the run ends where its epochs
    end, not at the new batch's step count from step 0. Checked against walking the blocks."""
    for blocks in (1, 7, 20, 33):
        for epochs in (1.0, 2.0, 1.5, 3.25):
            for old, new in ((4, 4), (4, 2), (2, 4), (3, 5), (5, 1)):
                total_at_old = math.ceil(epochs * math.ceil(blocks / old))
                for taken in range(0, total_at_old + 1):
                    settings = config(Path("m"), Path("t"), Path("o"), batch_size=new, max_steps=None,
                                      epochs=epochs)  # fmt: skip
                    position = (0, 0)
                    for _ in range(taken):  # where the old batch leaves the cursor
                        e, o = position
                        e, o = (e + 1, 0) if o >= blocks else (e, o)
                        position = (e, min(o + old, blocks))
                    epoch, offset = position
                    expected = walk_to_the_end(blocks, epochs, [(taken, old), (0, new)])
                    got = steps_from_position(settings, 1, blocks, epoch, offset)
                    assert got == expected, (blocks, epochs, old, new, taken)


def test_an_epochs_run_resumed_at_half_the_batch_trains_to_its_last_epochs_end(
    tiny_model_dir, tmp_path
):
    """One epoch at --batch-size 4, then --epochs 2 at --batch-size 2: the second epoch takes as
    many blocks as the first, in about twice the steps, and the run ends at its end (before, the
    steps were counted from step 0 at the new batch, and the run trained on into a third epoch)."""
    train_file = write_lines(tmp_path / "train.txt", uneven_corpus(40, seed=5))
    out = tmp_path / "run"
    first = dict(max_steps=None, epochs=1.0, batch_size=4, save_steps=100, logging_steps=1)
    train(config(tiny_model_dir, train_file, out, **first))
    one_epoch = [e for e in read_events(out / "metrics.jsonl") if "loss" in e]
    train(config(tiny_model_dir, train_file, out, **{**first, "epochs": 2.0, "batch_size": 2}))
    steps = [e for e in read_events(out / "metrics.jsonl") if "loss" in e]
    assert one_epoch[-1]["epoch"] == 1.0
    assert steps[-1]["epoch"] == 2.0 and all(e["epoch"] <= 2.0 for e in steps)
    first_steps, second_steps = one_epoch[-1]["step"], steps[-1]["step"] - one_epoch[-1]["step"]
    assert 2 * first_steps - 1 <= second_steps <= 2 * first_steps  # 2 blocks a step, not 4
    # The same command again: finished, nothing to do (its step count is not this batch's from
    # step 0, which the check once compared with: it read the weights and wrote them again).
    model_file = out / "model.safetensors"
    written = model_file.stat().st_mtime_ns
    again = train(
        config(tiny_model_dir, train_file, out, **{**first, "epochs": 2.0, "batch_size": 2})
    )
    assert again.steps == steps[-1]["step"] and model_file.stat().st_mtime_ns == written


def test_a_resume_on_other_validation_data_compares_with_no_figure_of_the_old(
    tiny_model_dir, tmp_path, capsys
):
    """Each evaluation records the validation data it scored. A run resumed with another
    validation file has no before-training figure on it: the summary, eval_results.json and the
    report give the after figure alone and say why (before, the step-0 figure of the old file
    was set beside the new one's). Resumed on the same data, the figure stays."""
    from domainlm.run.report import read_run

    train_file = write_lines(tmp_path / "train.txt", uneven_corpus(40, seed=5))
    valid = write_lines(tmp_path / "valid.txt", uneven_corpus(8, seed=6))
    other = write_lines(tmp_path / "other.txt", uneven_corpus(5, seed=9))
    out, same = tmp_path / "run", tmp_path / "same"
    for folder in (out, same):
        train(config(tiny_model_dir, train_file, folder, validation_file=str(valid), save_steps=2))
    before = json.loads((out / "eval_results.json").read_text())["initial_perplexity"]
    capsys.readouterr()
    train(config(tiny_model_dir, train_file, same, validation_file=str(valid), max_steps=6))
    assert json.loads((same / "eval_results.json").read_text())["initial_perplexity"] == before
    capsys.readouterr()
    train(config(tiny_model_dir, train_file, out, validation_file=str(other), max_steps=6,
                 quiet=False))  # fmt: skip
    err = capsys.readouterr().err
    results = json.loads((out / "eval_results.json").read_text())
    assert before is not None and results["initial_perplexity"] is None
    assert "the validation data is not what was scored before training" in err
    summary = [x for x in err.splitlines() if x.startswith("validation perplexity")]
    assert summary and "->" not in summary[-1]
    evals = [e for e in read_events(out / "metrics.jsonl") if "eval_ppl" in e]
    assert len({e["validation"] for e in evals if e["step"] <= 4}) == 1
    assert {e["validation"] for e in evals if e["step"] > 4} - {evals[0]["validation"]}
    assert read_run(out).initial_perplexity() is None
    from domainlm.run.report import run_report

    run_report([out], tmp_path / "page")
    page = (tmp_path / "page" / "report.html").read_text()
    assert "before training" not in page and f"{results['perplexity']:.3f}</b> after" in page
    for folder in (out, same):  # as an unfinished run reads: from its evaluations alone
        (folder / "eval_results.json").unlink()
    assert read_run(out).initial_perplexity() is None
    assert read_run(same).initial_perplexity() == evals[0]["eval_ppl"]


def test_a_finished_run_scored_again_on_other_validation_data_logs_that_figure(
    tiny_model_dir, tmp_path, capsys
):
    """A finished run started again with another validation file has no step to train; its final
    evaluation on the new data is logged beside the old one of that step (it was not: the report
    named the old data's figure the best), and --load-best-model-at-end says that no checkpoint
    was scored on this data (not that none has a figure)."""
    from domainlm.run.report import read_run, summary_rows

    train_file = write_lines(tmp_path / "train.txt", uneven_corpus(40, seed=5))
    valid = write_lines(tmp_path / "valid.txt", uneven_corpus(8, seed=6))
    other = write_lines(tmp_path / "other.txt", uneven_corpus(5, seed=9))
    out = tmp_path / "run"
    kw = dict(save_steps=2, eval_steps=2, load_best_model_at_end=True)
    train(config(tiny_model_dir, train_file, out, validation_file=str(valid), **kw))
    capsys.readouterr()
    result = train(config(tiny_model_dir, train_file, out, validation_file=str(other),
                          quiet=False, **kw))  # fmt: skip
    warned = [x for x in capsys.readouterr().err.splitlines() if "--load-best-model-at-end" in x]
    assert warned and "was scored on this validation data" in warned[0]
    at_4 = [e for e in read_events(out / "metrics.jsonl") if "eval_ppl" in e and e["step"] == 4]
    assert len(at_4) == 2 and at_4[0]["validation"] != at_4[1]["validation"]
    assert at_4[1]["eval_ppl"] == result.final_perplexity
    (row,) = summary_rows([read_run(out)])
    assert f"{result.final_perplexity:.3f} (4)" in " ".join(row)


def test_an_epochs_run_stopped_early_at_another_batch_is_finished_when_started_again(
    tiny_model_dir, tmp_path
):
    """--epochs, resumed at another batch and stopped early by --early-stopping-patience: the same
    command again is "nothing to do" (the check capped the stop's step at this batch's count from
    step 0, never matched, and wrote the model and every report file again)."""
    train_file = write_lines(tmp_path / "train.txt", uneven_corpus(40, seed=5))
    valid = write_lines(tmp_path / "valid.txt", uneven_corpus(8, seed=6))
    out = tmp_path / "run"
    base = dict(validation_file=str(valid), epochs=3.0, eval_steps=1, save_steps=1)
    train(config(tiny_model_dir, train_file, out, **base, batch_size=1, max_steps=40))
    later = dict(**base, batch_size=4, max_steps=None, lr=3.0, early_stopping_patience=1)
    stopped = train(config(tiny_model_dir, train_file, out, **later))
    blocks = round(1 / next(e for e in read_events(out / "metrics.jsonl") if "loss" in e)["epoch"])
    assert stopped.stopped_early and stopped.steps > 40
    assert stopped.steps > 3 * -(-blocks // 4)  # past this batch's count from step 0
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    again = train(config(tiny_model_dir, train_file, out, **later))
    assert again.steps == stopped.steps and again.stopped_early
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == written


def test_a_longer_run_records_only_its_step_count(tiny_model_dir, tmp_path, capsys):
    train_file = write_lines(tmp_path / "train.txt", uneven_corpus(40, seed=5))
    out = tmp_path / "run"
    train(config(tiny_model_dir, train_file, out))
    train(config(tiny_model_dir, train_file, out, max_steps=6))  # a longer run, nothing else
    run = json.loads((out / "run_config.json").read_text())
    assert run["history"] == [{"step": 4, "changed": {"max_steps": [4, 6]}}]
    assert "- from step 4: max_steps 4 -> 6" in (out / "README.md").read_text()


def previous(history: list[dict], **settings: object) -> dict:
    """A run file's contents: the last command's settings and the history so far."""
    base = config(Path("m"), Path("t.txt"), Path("o")).to_dict()
    return {"config": {**base, **settings}, "history": history}


def test_history_joins_changes_at_one_step_and_drops_retrained_steps():
    """Written out by hand: a second resume at the same step joins the first change (and a
    setting set back is no change); a resume from an earlier checkpoint drops the later entries
    and compares with what trained up to its step."""
    at_4 = {"step": 4, "changed": {"lr": [0.001, 0.0005]}}
    later = config(Path("m"), Path("t.txt"), Path("o"), lr=5e-4, batch_size=4)
    history, changed = resume_history(previous([at_4], lr=5e-4), later, 4)
    assert changed == {"batch_size": [2, 4], "lr": [0.001, 0.0005]}
    assert history == [{"step": 4, "changed": {"batch_size": [2, 4], "lr": [0.001, 0.0005]}}]
    back = config(Path("m"), Path("t.txt"), Path("o"), lr=1e-3)  # lr set back at step 4
    assert resume_history(previous([at_4], lr=5e-4), back, 4) == ([], {})
    at_8 = {"step": 8, "changed": {"batch_size": [2, 4], "lr": [0.0005, 0.0002]}}
    from_6 = config(Path("m"), Path("t.txt"), Path("o"), lr=5e-4, batch_size=8)
    history, changed = resume_history(previous([at_4, at_8], lr=2e-4, batch_size=4), from_6, 6)
    assert changed == {"batch_size": [2, 8]}  # up to step 6 it trained with batch 2, lr 5e-4
    assert history == [at_4, {"step": 6, "changed": {"batch_size": [2, 8]}}]
    from_2 = config(Path("m"), Path("t.txt"), Path("o"), lr=2e-4, batch_size=4)
    history, changed = resume_history(previous([at_4, at_8], lr=2e-4, batch_size=4), from_2, 2)
    assert changed == {"batch_size": [2, 4], "lr": [0.001, 0.0002]}  # both changes undone
    assert history == [{"step": 2, "changed": changed}]
    assert resume_history(None, from_6, 6) == ([], {})  # no run file: nothing to compare
    broken = [{"step": "4"}, {"step": 4, "changed": {"lr": 1}}, "x"]  # hand-edited: left out
    assert resume_history(previous(broken, lr=5e-4, batch_size=8), from_6, 6) == ([], {})


def test_a_setting_that_was_not_given_is_shown_unset():
    """A run of --epochs resumed with --max-steps: "max_steps (unset) -> 40", not Python's None,
    in the warning and on the model card."""
    from domainlm.run.report import history_lines
    from domainlm.run.resume import changes_shown

    changed = {"max_steps": [None, 40]}
    assert changes_shown(changed) == "--max-steps (unset) -> 40"
    assert history_lines([{"step": 36, "changed": changed}]) == [
        "from step 36: max_steps (unset) -> 40"
    ]
