"""--early-stopping-patience: the run ends after N evaluations in a row without a new best.

The reference is a run without the flag (the same settings, so the same trajectory): its
metrics.jsonl says, by the rule written out below, where a patient run must stop, and its
checkpoint of that step holds the weights the early-stopped run must save as its model.
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import pytest
from conftest import uneven_corpus, write_lines
from safetensors.torch import load_file

from domainlm import TrainConfig, train
from domainlm.run.metrics import read_events

PATIENCE = 2
MAX_STEPS = 14


def settings(model: Path, train_file: Path, valid_file: Path, out: Path, **kw) -> TrainConfig:
    values = dict(
        model=str(model),
        train_file=str(train_file),
        validation_file=str(valid_file),
        output_dir=str(out),
        block_size=32,
        batch_size=2,
        lr=3e-2,  # large: the validation perplexity falls, then rises for a while
        scheduler="constant",  # a shorter run's rates are the longer one's (the resume below)
        warmup_steps=0,
        max_steps=MAX_STEPS,
        eval_steps=1,
        save_steps=1,
        logging_steps=4,  # the stop's step is logged too, though not a multiple
        precision="fp32",
        quiet=True,
    )
    values.update(kw)
    return TrainConfig(**values)


def stop_step_by_hand(evals: list[tuple[int, float]], patience: int) -> int | None:
    """The first step whose evaluation is the `patience`-th in a row not below the best
    before it (the evaluation before training counts), never the last step."""
    best, without_gain = float("inf"), 0
    for step, perplexity in evals:
        if perplexity < best:
            best, without_gain = perplexity, 0
        else:
            without_gain += 1
        if without_gain >= patience and step < MAX_STEPS:
            return step
    return None


def evals_of(out: Path) -> list[tuple[int, float]]:
    return [
        (e["step"], e["eval_ppl"]) for e in read_events(out / "metrics.jsonl") if "eval_ppl" in e
    ]


def files_and_times(folder: Path) -> dict[str, int]:
    """Every file below `folder` but the lock, with its modification time."""
    return {
        str(p): p.stat().st_mtime_ns
        for p in folder.rglob("*")
        if p.is_file() and p.name != ".domainlm.lock"
    }


def weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, Path]:
    return (
        write_lines(tmp_path / "train.txt", uneven_corpus(40, seed=0)),
        write_lines(tmp_path / "valid.txt", uneven_corpus(8, seed=5)),
    )


def test_a_patient_run_stops_where_the_rule_says_with_that_steps_model(
    tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    reference = tmp_path / "reference"
    train(settings(tiny_model_dir, *data, reference))
    stop = stop_step_by_hand(evals_of(reference), PATIENCE)
    assert stop is not None and stop < MAX_STEPS, evals_of(reference)  # the test means something

    out = tmp_path / "patient"
    capsys.readouterr()
    result = train(settings(tiny_model_dir, *data, out, early_stopping_patience=PATIENCE))
    err = capsys.readouterr().err
    assert result.steps == stop and result.stopped_early
    assert f"step {stop}: stopping early: {PATIENCE} evaluations in a row" in err
    assert f"stopped early at step {stop} (--early-stopping-patience)" in err
    # The model saved is step `stop`'s, bit for bit; its perplexity is the reference's there.
    expected = weights(reference / f"checkpoint-{stop}")
    got = weights(out)
    assert got.keys() == expected.keys()
    assert all((got[k] == expected[k]).all() for k in got)
    assert result.final_perplexity == dict(evals_of(reference))[stop]
    assert evals_of(out) == [(s, p) for s, p in evals_of(reference) if s <= stop]
    logged = [e["step"] for e in read_events(out / "metrics.jsonl") if "loss" in e]
    assert logged[-1] == stop and stop % 4, logged
    assert (out / f"checkpoint-{stop}").is_dir() and not (out / f"checkpoint-{stop + 1}").exists()
    best_step = min(evals_of(reference)[1:], key=lambda e: e[1])[0]
    assert result.best_checkpoint == out / f"checkpoint-{best_step}"
    results = json.loads((out / "eval_results.json").read_text())
    assert results["stopped_early"] == {"step": stop, "of_steps": MAX_STEPS}
    assert (
        f"Training stopped early at step {stop} of {MAX_STEPS}" in (out / "README.md").read_text()
    )

    # The same command again: finished, nothing to do, nothing written.
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    again = train(settings(tiny_model_dir, *data, out, early_stopping_patience=PATIENCE))
    err = capsys.readouterr().err
    assert f"finished at step {stop} (stopped early) already" in err
    assert "a larger --early-stopping-patience trains on" in err
    assert (again.steps, again.stopped_early) == (stop, True)
    assert again.final_perplexity == result.final_perplexity
    now = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    assert {k: v for k, v in now.items() if k != ".domainlm.lock"} == {
        k: v for k, v in stamps.items() if k != ".domainlm.lock"
    }
    # The folder, the data and the model spelled another way, or the folder copied elsewhere:
    # the same finished run (it trained on past its stop when the spelling differed).
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    stamps = files_and_times(out) | files_and_times(copy)
    for folder in (f"{out}/", str(copy)):
        spelled = settings(f"{tiny_model_dir}/./", f"{data[0].parent}/./{data[0].name}",
                           data[1], folder, early_stopping_patience=PATIENCE)  # fmt: skip
        assert train(spelled).steps == stop
        assert f"finished at step {stop} (stopped early) already" in capsys.readouterr().err
    assert files_and_times(out) | files_and_times(copy) == stamps

    # Interrupted one step before the stop and resumed: the patience counted so far is read
    # back from metrics.jsonl, and the run stops at the same step with the same weights.
    resumed = tmp_path / "resumed"
    train(settings(tiny_model_dir, *data, resumed, early_stopping_patience=PATIENCE,
                   max_steps=stop - 1))  # fmt: skip
    again = train(settings(tiny_model_dir, *data, resumed, early_stopping_patience=PATIENCE))
    assert again.resumed_from == resumed / f"checkpoint-{stop - 1}"
    assert (again.steps, again.stopped_early) == (stop, True)
    got = weights(resumed)
    assert all((got[k] == expected[k]).all() for k in got)

    # Started again with another --lr: early stopping still ends it where it ended, so the
    # warning says no step is left (it said "the steps from here use them").
    capsys.readouterr()
    other = train(settings(tiny_model_dir, *data, copy, early_stopping_patience=PATIENCE,
                           lr=1e-2))  # fmt: skip
    assert other.steps == stop
    assert "with other settings than the run's so far: --lr" in (err := capsys.readouterr().err)
    assert "; no step is left (run_config.json's" in err, err


def test_patience_longer_than_the_evaluations_is_said(
    tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    config = settings(
        tiny_model_dir, *data, out, max_steps=4, eval_steps=2, early_stopping_patience=2
    )
    result = train(config)
    assert "--early-stopping-patience 2: the run evaluates 1 times before its last step" in (
        capsys.readouterr().err
    )
    assert result.steps == 4 and not result.stopped_early


def test_a_run_stopped_after_a_cut_evaluation_scores_the_whole_validation_set(
    tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path
) -> None:
    """--max-eval-tokens cuts the evaluations the stop is decided on; the model's result is
    still the whole validation set's, logged beside the cut one at the same step."""
    out = tmp_path / "cut"
    result = train(
        settings(tiny_model_dir, *data, out, early_stopping_patience=PATIENCE, max_eval_tokens=64)
    )
    assert result.stopped_early
    events = read_events(out / "metrics.jsonl")
    cut = [e for e in events if "eval_ppl" in e]
    whole = [e for e in events if "eval_whole_ppl" in e]
    (cut_tokens,) = {e["eval_tokens"] for e in cut}  # one series, one token set
    assert [e["step"] for e in whole] == [0, result.steps] and cut[-1]["step"] == result.steps
    assert whole[-1]["eval_whole_tokens"] == result.eval_tokens > cut_tokens
    assert result.final_perplexity == whole[-1]["eval_whole_ppl"]
    assert result.initial_perplexity == whole[0]["eval_whole_ppl"]


def test_cut_evaluations_compare_like_with_like_and_the_result_is_the_whole_sets(
    tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path
) -> None:
    """With --max-eval-tokens every checkpoint, the last one too, is ranked by the cut figure
    of its step (the best checkpoint, rotation and --load-best-model-at-end compare them), while
    the figures before and after training are the whole set's: those of the same run without
    the flag (the evaluations change nothing in the training)."""
    reference = train(settings(tiny_model_dir, *data, tmp_path / "whole", max_steps=4))
    out = tmp_path / "cut"
    result = train(settings(tiny_model_dir, *data, out, max_steps=4, max_eval_tokens=64))
    series = {e["step"]: e for e in read_events(out / "metrics.jsonl") if "eval_ppl" in e}
    (cut_tokens,) = {e["eval_tokens"] for e in series.values()}  # whole windows: about 64
    assert sorted(series) == [0, 1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        marker = json.loads((out / f"checkpoint-{step}" / "checkpoint.json").read_text())
        assert marker["eval_perplexity"] == series[step]["eval_ppl"], step
    assert result.initial_perplexity == reference.initial_perplexity
    assert result.final_perplexity == reference.final_perplexity
    assert result.eval_tokens == reference.eval_tokens > cut_tokens
    results = json.loads((out / "eval_results.json").read_text())
    assert results["initial_perplexity"] == reference.initial_perplexity
    card = (out / "README.md").read_text()
    assert f"{reference.initial_perplexity:.3f} before training" in card
    page = html.unescape((out / "report.html").read_text())  # the best checkpoint's cut figure
    assert f"on {cut_tokens:,} tokens (--max-eval-tokens))" in page
    # `report` of the run unfinished (no eval_results.json yet): both figures the cut ones.
    from domainlm.run.report import read_run

    finished = read_run(out)
    assert (finished.initial_perplexity(), finished.final_perplexity()) == (
        reference.initial_perplexity, reference.final_perplexity,
    )  # fmt: skip
    shutil.copytree(out, tmp_path / "unfinished")
    (tmp_path / "unfinished" / "eval_results.json").unlink()
    unfinished = read_run(tmp_path / "unfinished")
    assert (unfinished.initial_perplexity(), unfinished.final_perplexity()) == (
        series[0]["eval_ppl"], series[4]["eval_ppl"],
    )  # fmt: skip


def test_load_best_model_at_end_saves_the_best_checkpoints_weights_and_score(
    tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    """With --load-best-model-at-end the model folder is the lowest-perplexity checkpoint's,
    bit for bit, and its result is that checkpoint's whole-set score, as logged at its step."""
    out = tmp_path / "best"
    result = train(
        settings(tiny_model_dir, *data, out, early_stopping_patience=PATIENCE,
                 load_best_model_at_end=True)
    )  # fmt: skip
    evals = evals_of(out)
    best_step, best_perplexity = min(evals[1:], key=lambda e: (e[1], -e[0]))
    assert best_step < result.steps and result.stopped_early  # the last step is not the best
    assert result.model_step == best_step
    assert result.final_perplexity == best_perplexity  # scored again on the restored weights
    expected, got = weights(out / f"checkpoint-{best_step}"), weights(out)
    assert all((got[k] == expected[k]).all() for k in expected)
    results = json.loads((out / "eval_results.json").read_text())
    assert results["perplexity"] == best_perplexity
    assert results["model_checkpoint"] == {"step": best_step, "last_step_perplexity": evals[-1][1]}
    card = (out / "README.md").read_text()
    assert f"The model is checkpoint-{best_step}'s, the lowest validation perplexity" in card
    page = html.unescape((out / "report.html").read_text())
    assert f"The model is checkpoint-{best_step}'s, the lowest validation perplexity" in page
    assert f"Training stopped early at step {result.steps} of {MAX_STEPS}" in page
    assert f"the model saved is checkpoint-{best_step}'s" in capsys.readouterr().err


def test_load_best_model_at_end_with_lora_saves_the_best_checkpoints_adapters(
    tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path
) -> None:
    """Validated on text unlike the training text (numbers), so the adapters' best
    checkpoint comes before the last step."""
    numbers = [" ".join(str((7 * i + 3 * j) % 1000) for j in range(12)) for i in range(8)]
    valid = write_lines(tmp_path / "numbers.txt", numbers)
    out = tmp_path / "lora"
    result = train(
        settings(tiny_model_dir, data[0], valid, out, lora=True, lr=0.3,
                 load_best_model_at_end=True)
    )  # fmt: skip
    evals = evals_of(out)
    best_step, best_perplexity = min(evals[1:], key=lambda e: (e[1], -e[0]))
    assert best_step < MAX_STEPS and result.model_step == best_step, evals
    assert result.final_perplexity == best_perplexity
    adapters = "adapter_model.safetensors"
    expected = load_file(out / f"checkpoint-{best_step}" / adapters)
    got = load_file(out / adapters)
    assert got.keys() == expected.keys() and all((got[k] == expected[k]).all() for k in got)
    assert (out / "merged" / "model.safetensors").is_file()


def test_a_stopped_run_started_again_on_other_validation_data_trains_no_step(
    tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path
) -> None:
    """A run that stopped early, started again with an edited validation file (not the same
    run any more, so it resumes) or a larger --max-steps: its patience ran out at the step it
    resumes from, so it ends there again, no step trained: the model is that step's, scored on
    the validation file given (it trained on to the next evaluation)."""
    out = tmp_path / "patient"
    first = train(settings(tiny_model_dir, *data, out, early_stopping_patience=PATIENCE))
    assert first.stopped_early
    stop, model = first.steps, weights(out)
    edited = write_lines(tmp_path / "valid2.txt", uneven_corpus(8, seed=6))
    for changed in (
        settings(tiny_model_dir, data[0], edited, out, early_stopping_patience=PATIENCE),
        settings(tiny_model_dir, *data, out, early_stopping_patience=PATIENCE,
                 max_steps=MAX_STEPS + 10),
    ):  # fmt: skip
        again = train(changed)
        assert (again.steps, again.stopped_early) == (stop, True)
        trained = [e["step"] for e in read_events(out / "metrics.jsonl") if "loss" in e]
        assert max(trained) == stop and not (out / f"checkpoint-{stop + 1}").exists()
        now = weights(out)
        assert all((now[k] == model[k]).all() for k in model)
    edited_result = json.loads((out / "eval_results.json").read_text())
    assert edited_result["stopped_early"]["step"] == stop


def test_a_run_resumed_on_other_validation_data_ranks_only_its_figures(
    tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path
) -> None:
    """Resumed with another validation file: early stopping counts from the first evaluation of
    the new data, and the best checkpoint (--load-best-model-at-end, rotation, the report) is the
    best on it. Before, the old data's lower figures were the best ever after: the run stopped
    `patience` evaluations into the new data and saved an old checkpoint's weights."""
    import random

    from domainlm.run.report import read_run, summary_rows

    rng = random.Random(1)
    other = write_lines(tmp_path / "other.txt",
                        ["".join(rng.choice("qxzjkwv#@!") for _ in range(60)) for _ in range(8)])  # fmt: skip
    out, kw = tmp_path / "run", dict(early_stopping_patience=3, load_best_model_at_end=True)
    train(settings(tiny_model_dir, *data, out, max_steps=4, lr=1e-3, **kw))
    result = train(settings(tiny_model_dir, data[0], other, out, max_steps=16, lr=1e-3, **kw))
    evals = [(e["step"], e["eval_ppl"]) for e in read_events(out / "metrics.jsonl")
             if "eval_ppl" in e and e["step"] > 4]  # fmt: skip
    best, without_gain, stop = float("inf"), 0, None  # the rule, by hand, on the new data
    for step, perplexity in evals:
        best, without_gain = (perplexity, 0) if perplexity < best else (best, without_gain + 1)
        if without_gain >= 3 and step < 16:
            stop = step
            break
    assert evals[-1][0] == (stop or 16)
    lowest = min(evals, key=lambda e: (e[1], -e[0]))
    assert result.model_step == lowest[0] and result.model_step > 4
    run = read_run(out)
    (row,) = summary_rows([run])
    assert f"({lowest[0]})" in " ".join(row)


def test_a_cut_that_holds_the_whole_set_is_not_scored_twice(
    tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path
) -> None:
    """--max-eval-tokens at least the validation set: the first evaluation shows the cut holds
    every token, and the end scores nothing a second time, in one run or resumed."""
    out = tmp_path / "all"
    train(settings(tiny_model_dir, *data, out, max_steps=2, max_eval_tokens=10**6))
    train(settings(tiny_model_dir, *data, out, max_steps=4, max_eval_tokens=10**6))
    events = read_events(out / "metrics.jsonl")
    assert [e["step"] for e in events if "eval_whole_ppl" in e] == [0]  # logged once, at start
    assert [e["step"] for e in events if "eval_ppl" in e] == [0, 1, 2, 3, 4]
    # Resumed on a validation file grown past the cut: step 0's "the cut holds all" was of the
    # other data; every evaluation from here is cut again (all were the whole set's).
    grown = write_lines(tmp_path / "grown.txt", uneven_corpus(60, seed=11))
    cut = 300
    train(settings(tiny_model_dir, data[0], data[1], out, max_steps=4, max_eval_tokens=cut))
    train(settings(tiny_model_dir, data[0], grown, out, max_steps=6, max_eval_tokens=cut))
    events = read_events(out / "metrics.jsonl")
    later = [e["eval_tokens"] for e in events if "eval_ppl" in e and e["step"] > 4]
    whole = [e["eval_whole_tokens"] for e in events if "eval_whole_ppl" in e and e["step"] == 6]
    assert len(later) == 2 and later[0] == later[1] < whole[0]  # a cut (to whole windows)
    assert later[0] < 2 * cut < whole[0]
