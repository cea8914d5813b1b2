"""Resume keeps what the interrupted run had (issue 12, items 5 and 6): the model loader's
--trust-remote-code, and the open training-loss window of metrics.jsonl."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from conftest import uneven_corpus, write_lines

from domainlm import TrainConfig, train
from domainlm.errors import TrainingAborted
from domainlm.run import guard
from domainlm.run.metrics import read_events


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, Path]:
    docs = uneven_corpus(50, seed=3)
    return write_lines(tmp_path / "train.txt", docs[:42]), write_lines(
        tmp_path / "valid.txt", docs[42:]
    )


def config(model: Path | str, corpus: tuple[Path, Path], out: Path, **kw: object) -> TrainConfig:
    values: dict[str, object] = dict(
        model=str(model),
        train_file=str(corpus[0]),
        validation_file=str(corpus[1]),
        output_dir=str(out),
        block_size=32,
        batch_size=2,
        grad_accum=2,
        lr=1e-3,
        max_steps=9,
        save_steps=4,
        eval_steps=100,
        logging_steps=3,
        precision="fp32",
        quiet=True,
    )
    values.update(kw)
    return TrainConfig(**values)


def events(out: Path) -> list[dict]:
    rows = read_events(out / "metrics.jsonl")
    for row in rows:
        row.pop("tokens_per_s", None)  # the only field that depends on timing
    return rows


def stop_after_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """SIGTERM this process after `step` (the run's own graceful stop: it saves that step)."""
    calls = iter(range(1, 10_000))

    def delay() -> None:
        if next(calls) == step:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(guard, "step_delay", delay)


def test_metrics_after_a_resume_match_an_uninterrupted_run_with_logging_every_3_steps(
    tiny_model_dir: Path, corpus: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Logging every 3 steps; interrupted after step 5 (checkpoints 4 and 5 hold open windows)."""
    reference = tmp_path / "reference"
    reference_tokens = train(config(tiny_model_dir, corpus, reference)).train_tokens
    logged = [e["step"] for e in events(reference) if "loss" in e]
    assert logged == [3, 6, 9]

    stopped = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        stop_after_step(patch, 5)
        with pytest.raises(TrainingAborted, match="stopped after step 5"):
            train(config(tiny_model_dir, corpus, stopped))
    assert (stopped / "checkpoint-4").is_dir() and (stopped / "checkpoint-5").is_dir()
    stopped_seconds = {  # the run's training seconds up to each checkpoint, as saved
        step: torch.load(stopped / f"checkpoint-{step}" / "training_state.pt")["totals"]["seconds"]
        for step in (4, 5)
    }
    assert 0 < stopped_seconds[4] < stopped_seconds[5]

    # Resumed from checkpoint-5 (the stop's own save) and from checkpoint-4 (a --save-steps save).
    from_four = tmp_path / "from-four"
    shutil.copytree(stopped, from_four)
    shutil.rmtree(from_four / "checkpoint-5")
    for out, step in ((stopped, 5), (from_four, 4)):
        result = train(config(tiny_model_dir, corpus, out))
        assert result.resumed_from == out / f"checkpoint-{step}"
        assert events(out) == events(reference)  # same steps, same losses, same perplexities
        # the whole run's training tokens, not only the resumed process's (steps 5-9 or 6-9)
        assert result.train_tokens == reference_tokens > 0
        results = json.loads((out / "eval_results.json").read_text())
        assert results["train_tokens"] == reference_tokens
        assert result.train_runtime > stopped_seconds[step]  # the first part's time included


def test_resume_loads_the_checkpoint_with_trust_remote_code(
    tiny_model_dir: Path, corpus: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    train(config(tiny_model_dir, corpus, out, max_steps=2, save_steps=2))
    train_module = sys.modules["domainlm.run.train"]  # the module (domainlm.train: the function)
    calls: list[tuple[str, dict]] = []
    real_load = train_module.load_model

    def recording_load(spec: str, **kwargs: object):
        calls.append((spec, kwargs))
        return real_load(spec, **kwargs)

    monkeypatch.setattr(train_module, "load_model", recording_load)
    result = train(config(tiny_model_dir, corpus, out, max_steps=3, trust_remote_code=True))
    assert result.resumed_from == out / "checkpoint-2"
    loads = {spec: kwargs.get("trust_remote_code") for spec, kwargs in calls}
    assert loads == {str(tiny_model_dir): True, str(out / "checkpoint-2"): True}
