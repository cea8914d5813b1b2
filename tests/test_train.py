"""`domainlm train` end to end on CPU with tiny models (issue 2, acceptance)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import uneven_corpus, write_lines
from safetensors.torch import load_file

from domainlm import TrainConfig, train
from domainlm.errors import UserError
from domainlm.run.metrics import read_events
from domainlm.run.schedule import learning_rate


def reference_perplexity(model, tokens: np.ndarray, block: int, stride: int) -> tuple[float, int]:
    """Slow and obvious: one window at a time, full logits, float64 log-softmax."""
    total, count = 0.0, 0
    for a in range(1, len(tokens), stride):
        b = min(a + stride, len(tokens))
        s = max(0, a - (block - stride))
        ids = torch.tensor(tokens[s:b].astype(np.int64))[None]  # the last input predicts nothing
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        for t in range(a, b):
            total -= float(logp[t - 1 - s, int(tokens[t])])
        count += b - a
    return math.exp(total / count), count


def stream_of(path: Path, tokenizer, eos: int) -> np.ndarray:
    ids = [eos]
    for line in path.read_text().splitlines():
        if line.strip():
            ids += tokenizer(line, add_special_tokens=False).input_ids + [eos]
    return np.array(ids)


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, Path]:
    docs = uneven_corpus(80, seed=1)
    return write_lines(tmp_path / "train.txt", docs[:70]), write_lines(
        tmp_path / "valid.txt", docs[70:]
    )


def base_config(model: Path | str, train_file: Path, out: Path, **kw) -> TrainConfig:
    values = dict(
        model=str(model),
        train_file=str(train_file),
        output_dir=str(out),
        block_size=32,
        batch_size=4,
        lr=3e-3,
        max_steps=12,
        save_steps=4,
        eval_steps=4,
        logging_steps=2,
        precision="fp32",
        quiet=True,
        warmup_steps=2,
    )
    values.update(kw)
    return TrainConfig(**values)


def test_end_to_end_files_limit_loss_and_reload(
    tiny_model_dir: Path, corpus, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train_file, valid_file = corpus
    out = tmp_path / "run"
    result = train(
        base_config(
            tiny_model_dir, train_file, out, validation_file=str(valid_file), save_total_limit=2
        )
    )
    from domainlm.run.report import PLOTS
    from domainlm.run.trackers import resolve_report_to

    names = {p.name for p in out.iterdir()}
    expected = {
        "checkpoint-8",
        "checkpoint-12",  # newest two; the best (lowest perplexity) is one of them
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "eval_results.json",
        "metrics.jsonl",
        "run_config.json",
        "README.md",
        "report.html",
        *PLOTS,
    }
    if resolve_report_to(None):  # the default: TensorBoard events when it is installed
        expected.add("tensorboard")
    assert names == expected
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    for ckpt in checkpoints:
        files = {p.name for p in (out / ckpt).iterdir()}
        assert {
            "model.safetensors",
            "config.json",
            "training_state.pt",
            "checkpoint.json",
            "tokenizer.json",
        } <= files

    events = read_events(out / "metrics.jsonl")
    train_steps = [e["step"] for e in events if "loss" in e]
    eval_steps = [e["step"] for e in events if "eval_ppl" in e]
    assert train_steps == [2, 4, 6, 8, 10, 12]
    assert eval_steps == [0, 4, 8, 12]
    assert all({"epoch", "lr", "tokens_per_s"} <= e.keys() for e in events if "loss" in e)
    losses = [e["loss"] for e in events if "loss" in e]
    assert losses[-1] < losses[0] - 1.0, losses

    results = json.loads((out / "eval_results.json").read_text())
    assert set(results) >= {
        "eval_loss",
        "perplexity",
        "eval_tokens",
        "initial_perplexity",
        "train_runtime",
        "train_tokens",
    }
    assert results["perplexity"] < results["initial_perplexity"]
    assert result.final_perplexity == pytest.approx(results["perplexity"])
    assert results["train_tokens"] == 12 * 4 * 32 or results["train_tokens"] <= 12 * 4 * 32

    # The final folder loads with transformers alone and gives the same logits as the weights.
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("the cat sat on the mat", return_tensors="pt").input_ids
    weights = load_file(out / "model.safetensors")
    assert torch.equal(model.transformer.wte.weight, weights["transformer.wte.weight"])
    same = AutoModelForCausalLM.from_pretrained(out / "checkpoint-12").eval()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, same(ids).logits, atol=0, rtol=0)

    # Validation perplexity equals the slow reference on the final model, to 1e-5 relative.
    ppl, count = reference_perplexity(model, stream_of(valid_file, tokenizer, 50256), 32, 31)
    assert results["eval_tokens"] == count
    assert results["perplexity"] == pytest.approx(ppl, rel=1e-5)


def test_grad_accumulation_gives_the_same_gradient(tiny_model_dir: Path, tmp_path: Path) -> None:
    """batch 4 x accum 1 == batch 2 x accum 2 == batch 1 x accum 4 (fp32, dropout off), with
    documents of uneven length and a partial last block: the loss is normalised by the target
    tokens of the whole window, not per micro-batch."""
    from transformers import AutoModelForCausalLM

    from domainlm.data.blocks import BlockDataset
    from domainlm.data.tokens import tokenize_documents
    from domainlm.model.distributed import SINGLE
    from domainlm.model.loading import gpt2_tokenizer
    from domainlm.model.loss import CausalLMLoss
    from domainlm.run.step import accumulate_gradients

    stream = tokenize_documents(uneven_corpus(12, seed=5), gpt2_tokenizer(), 50256, np.uint16)
    dataset = BlockDataset(stream, block_size=16)
    last = len(dataset) - 1
    assert dataset.targets_in(last) < 16
    blocks = np.array([3, last, 0, 5])  # includes the partial block
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    grads = []
    for batch_size, accum in [(4, 1), (2, 2), (1, 4)]:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        module = CausalLMLoss(model).train()
        nll, targets = accumulate_gradients(
            module, dataset, blocks, batch_size, accum, SINGLE, torch.device("cpu"), "fp32", scaler
        )
        assert targets == sum(dataset.targets_in(int(b)) for b in blocks)
        grads.append([p.grad.clone() for p in model.parameters()])
    for other in grads[1:]:
        for g_ref, g in zip(grads[0], other, strict=True):
            torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5 * float(g_ref.abs().max()))


def test_grad_accumulation_end_to_end(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The same through `train`: the logged (token-weighted) losses of every step agree. The
    gradient test above is the exact one; weights are not compared elementwise after AdamW, which
    divides each update by the gradient's own scale, so parameters whose gradient is zero in exact
    arithmetic (the attention key bias: softmax ignores a constant shift) move by rounding noise."""
    train_file = write_lines(tmp_path / "t.txt", uneven_corpus(30, seed=5))
    common = dict(
        block_size=16,
        max_steps=3,
        save_steps=100,
        eval_steps=100,
        validation_split=0.1,
        logging_steps=1,
    )
    runs = []
    for name, batch_size, accum in [("a", 4, 1), ("b", 2, 2)]:
        out = tmp_path / name
        train(
            base_config(
                tiny_model_dir, train_file, out, batch_size=batch_size, grad_accum=accum, **common
            )
        )
        events = read_events(out / "metrics.jsonl")
        runs.append([e["loss"] for e in events if "loss" in e])
    assert len(runs[0]) == 3
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)
    assert runs[0][-1] < runs[0][0]


def test_resume_auto_continues_and_other_runs_are_protected(
    tiny_model_dir: Path, corpus, tmp_path: Path, capsys: pytest.CaptureFixture, weight_reads
) -> None:
    train_file, valid_file = corpus
    out = tmp_path / "run"
    cfg = dict(validation_file=str(valid_file), max_steps=4, save_steps=2)
    train(base_config(tiny_model_dir, train_file, out, **cfg))
    assert weight_reads == [str(tiny_model_dir)]
    extended = train(base_config(tiny_model_dir, train_file, out, **{**cfg, "max_steps": 6}))
    assert extended.resumed_from == out / "checkpoint-4"
    # Resumed, full fine-tuning reads the checkpoint's weights alone, not the model's first.
    assert weight_reads[1:] == [str(out / "checkpoint-4")]
    steps = [e["step"] for e in read_events(out / "metrics.jsonl")]
    assert steps == sorted(steps) and steps.count(6) == 2 and steps.count(4) == 2

    # The same command once more (--quiet changed: the command's, not the run's): the run is
    # done; it says so and does nothing: no step, no evaluation, no file written (the final
    # model's bytes and times unchanged), and it does not say it saved the model.
    events = read_events(out / "metrics.jsonl")
    files = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    rerun = {**cfg, "max_steps": 6, "quiet": not base_config(tiny_model_dir, train_file, out).quiet}
    again = train(base_config(tiny_model_dir, train_file, out, **rerun))
    err = capsys.readouterr().err
    assert "finished at step 6 already, with these settings and data: nothing to do" in err
    assert f"model in {out}, as the earlier run saved it" in err and "model saved" not in err
    assert again.final_perplexity == extended.final_perplexity
    assert (again.steps, again.eval_tokens) == (6, extended.eval_tokens)
    assert read_events(out / "metrics.jsonl") == events
    assert len(weight_reads) == 2  # no weights read: the tokenizer and the config said it all
    lock = ".domainlm.lock"  # taken and released by every run
    now = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file()}
    assert {k: v for k, v in now.items() if k != lock} == {
        k: v for k, v in files.items() if k != lock
    }
    # The validation file edited (same path, same flags): the final model is scored on it and
    # written again, no step.
    write_lines(valid_file, uneven_corpus(12, seed=9))
    rescored = train(base_config(tiny_model_dir, train_file, out, **{**cfg, "max_steps": 6}))
    assert "reached step 6 already, and this command's settings make 6 steps: nothing left " \
        "to train" in capsys.readouterr().err  # fmt: skip
    assert rescored.final_perplexity != extended.final_perplexity
    assert [e for e in read_events(out / "metrics.jsonl") if "loss" in e] == [
        e for e in events if "loss" in e
    ]
    # Fewer steps than the run took: the step it reached, and no word of the schedule, which
    # no step is left to follow.
    train(base_config(tiny_model_dir, train_file, out, **{**cfg, "max_steps": 4}))
    err = capsys.readouterr().err
    assert "reached step 6 already, and this command's settings make 4 steps" in err
    assert "learning-rate schedule" not in err

    # A folder of someone else's files is refused, and nothing in it is touched.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        train(base_config(tiny_model_dir, train_file, foreign, **cfg))
    # --overwrite-output-dir writes beside them and removes only what domainlm wrote.
    train(base_config(tiny_model_dir, train_file, foreign, overwrite_output_dir=True, **cfg))
    train(base_config(tiny_model_dir, train_file, foreign, overwrite_output_dir=True, **cfg))
    assert (foreign / "notes.txt").read_text() == "mine"
    assert (foreign / "model.safetensors").is_file()

    # ... but never over files of the names a run writes that domainlm did not write: another
    # tool's model (the seed's run_clm.py output folder), the user's own tokenizer.
    trainer_out = tmp_path / "trainer_out"
    trainer_out.mkdir()
    theirs = {"model.safetensors": b"their weights", "tokenizer.json": b"{}", "notes.txt": b"x"}
    for name, content in theirs.items():
        (trainer_out / name).write_bytes(content)
    with pytest.raises(UserError, match="holds model.safetensors, tokenizer.json, which domainlm"):
        train(
            base_config(tiny_model_dir, train_file, trainer_out, overwrite_output_dir=True, **cfg)
        )
    assert {p.name: p.read_bytes() for p in trainer_out.iterdir()} == theirs


def test_learning_rate_schedule() -> None:
    kw = dict(peak=1.0, warmup_steps=4, total_steps=14)
    assert [learning_rate(s, kind="constant", **kw) for s in (0, 3, 4, 13)] == [0.2, 0.8, 1.0, 1.0]
    assert learning_rate(4, kind="linear", **kw) == 1.0
    assert learning_rate(9, kind="linear", **kw) == pytest.approx(0.5)
    assert learning_rate(14, kind="linear", **kw) == pytest.approx(0.0)
    assert learning_rate(9, kind="cosine", **kw) == pytest.approx(0.5)
    assert learning_rate(14, kind="cosine", min_ratio=0.1, **kw) == pytest.approx(0.1)


def test_schedule_surprises_are_said(
    tiny_model_dir: Path, corpus, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Warmup as long as the run (the rate never reaches --lr), and a resume whose --max-steps
    stretches a decaying schedule (the rate jumps at the resume): each said in one line, with
    the rates the schedule gives (learning_rate, the step loop's own function)."""
    train_file, valid_file = corpus
    out = tmp_path / "run"
    cfg = dict(validation_file=str(valid_file), save_steps=2, eval_steps=100)
    train(
        base_config(tiny_model_dir, train_file, out, **{**cfg, "warmup_steps": 10, "max_steps": 2})
    )
    err = capsys.readouterr().err
    assert "--warmup-steps 10 is at least the run's 2 steps" in err
    assert f"it ends at {3e-3 * 2 / 11:.3g}" in err  # step 1 of 10 warmup steps: peak x 2/11
    out2 = tmp_path / "run2"
    train(base_config(tiny_model_dir, train_file, out2, **{**cfg, "max_steps": 4}))
    assert "never reaches" not in capsys.readouterr().err
    train(base_config(tiny_model_dir, train_file, out2, **{**cfg, "max_steps": 8}))
    err = capsys.readouterr().err
    was = learning_rate(4, peak=3e-3, warmup_steps=2, total_steps=4, kind="linear")
    now = learning_rate(4, peak=3e-3, warmup_steps=2, total_steps=8, kind="linear")
    assert (
        f"schedule now spans 8 steps, not 4: the rate at step 4 changes from {was:.3g} to {now:.3g}"
        in err
    )
