"""`domainlm inspect`: counts match an obvious reference; --json keys; --strict; folders, blank."""

from __future__ import annotations

import json
import math

import pytest
from conftest import uneven_corpus, write_lines

from domainlm.cli import main
from domainlm.errors import UserError
from domainlm.inspect_data import InspectConfig, format_report, inspect_data
from domainlm.model.loading import gpt2_tokenizer, load_model

BLOCK = 32


def _reference_tokens(docs: list[str]) -> int:
    tok = gpt2_tokenizer()
    return sum(len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs)


def test_counts_match_reference(tmp_path, tiny_model_dir):
    docs = uneven_corpus(50, seed=4)
    train = write_lines(tmp_path / "train.txt", docs + ["", docs[0]])
    valid = write_lines(tmp_path / "valid.txt", [docs[1], "something not in train at all"])
    config = InspectConfig(
        train_file=str(train),
        validation_file=str(valid),
        model=str(tiny_model_dir),
        block_size=BLOCK,
        batch_size=2,
        grad_accum=3,
        nproc=2,
        epochs=2,
        time_steps=1,
    )
    report = inspect_data(config)
    tokens = _reference_tokens([*docs, docs[0]])
    blocks = math.ceil(tokens / BLOCK)
    assert report["documents"] == 51
    assert report["tokens"] == tokens
    assert report["blocks"] == blocks
    assert report["tokens_padded"] == blocks * BLOCK - tokens
    assert report["steps_per_epoch"] == math.ceil(blocks / 12)
    assert report["total_steps"] == 2 * report["steps_per_epoch"]
    assert report["duplicate_lines"] == 1 and report["file_counts_include_held_out"] is False
    assert report["leaked_lines"] == 1
    assert report["characters"] == len((train).read_text())
    lengths = [len(gpt2_tokenizer()(d)["input_ids"]) for d in docs]
    assert report["tokens_per_document"]["max"] == max(lengths)
    assert report["tokens_per_document"]["min"] == min(lengths)
    assert report["validation"]["documents"] == 2
    assert report["time"]["seconds_per_step"] > 0
    mem = report["memory"]
    params = sum(p.numel() for p in load_model(str(tiny_model_dir)).model.parameters())
    assert mem["weights_gib"] == pytest.approx(params * 4 / 1024**3)
    assert mem["total_gib"] > mem["activations_gib"] > 0
    assert mem["optimizer_gib"] == pytest.approx(2 * mem["weights_gib"])


def test_json_output_has_the_documented_keys(tmp_path, tiny_model_dir, capsys):
    docs = uneven_corpus(40, seed=5)
    train = write_lines(tmp_path / "train.txt", docs + [docs[2]])
    code = main(
        [
            "inspect",
            "--train-file",
            str(train),
            "--model",
            str(tiny_model_dir),
            "--block-size",
            str(BLOCK),
            "--time-steps",
            "0",
            "--json",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    for key in (
        "documents",
        "tokens",
        "blocks",
        "steps_per_epoch",
        "duplicate_lines",
        "leaked_lines",
    ):
        assert key in report
    assert report["duplicate_lines"] == 1 and report["file_counts_include_held_out"] is True
    # 41 documents, 5% held out (2): the held-out copy of docs[2] leaks only if it was drawn
    assert report["documents"] + report["validation"]["documents"] == 41
    assert "time" not in report


def test_strict_inspect_fails_on_problems(tmp_path, tiny_model_dir, capsys):
    train = write_lines(tmp_path / "train.txt", ["one line of text here", "one line of text here"])
    config = InspectConfig(
        train_file=str(train), model=str(tiny_model_dir), time_steps=0, strict=True
    )
    with pytest.raises(UserError, match="duplicate"):
        inspect_data(config)
    code = main(
        [
            "inspect",
            "--train-file",
            str(train),
            "--model",
            str(tiny_model_dir),
            "--time-steps",
            "0",
            "--strict",
        ]
    )
    assert code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_folder_and_blank_separated_documents(tmp_path, tiny_model_dir):
    folder = tmp_path / "books"
    (folder / "part").mkdir(parents=True)
    (folder / "a.txt").write_text("Chapter one.\nIt was late.\n\n\nChapter two.\r\nDawn.\r\n")
    (folder / "part" / "b.txt").write_text("A third\nparagraph here.\n")
    (folder / "notes.md").write_text("ignored: not a text suffix\n")
    report = inspect_data(
        InspectConfig(
            train_file=str(folder),
            validation_file=str(folder / "part" / "b.txt"),
            model=str(tiny_model_dir),
            doc_sep="blank",
            block_size=BLOCK,
            time_steps=0,
        )
    )
    docs = ["Chapter one.\nIt was late.", "Chapter two.\nDawn.", "A third\nparagraph here."]
    assert report["documents"] == 3
    assert report["tokens"] == _reference_tokens(docs)
    assert report["leaked_lines"] == 2  # both lines of b.txt are also in the folder


def test_the_data_report_reads_weights_only_to_time_steps(
    tmp_path, tiny_model_dir, monkeypatch, weight_reads
):
    """The counts, lint and memory line need the tokenizer and the model's shapes, not its
    weights: an 8B model's report must not first load 32 GB of float32 weights. The weights are
    read only to time real steps, and not at all when the plan says a step would not fit."""
    import domainlm.model.memory as memory

    train = write_lines(tmp_path / "train.txt", uneven_corpus(40, seed=6))
    reads = weight_reads
    settings = dict(train_file=str(train), model=str(tiny_model_dir), block_size=BLOCK)
    untimed = inspect_data(InspectConfig(**settings, time_steps=0))
    assert reads == [] and "time" not in untimed
    timed = inspect_data(InspectConfig(**settings, time_steps=1))
    assert len(reads) == 1 and timed["time"]["seconds_per_step"] > 0
    for key in ("documents", "tokens", "blocks", "memory", "lint"):
        assert untimed[key] == timed[key]
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1024)  # 1 KiB free
    short = inspect_data(InspectConfig(**settings, time_steps=1))
    assert len(reads) == 1 and "not timed" in short["time"]["skipped"]
    assert "time estimate: a full fine-tuning step of b=8" in format_report(short)


def test_the_time_estimate_reads_as_a_person_says_it() -> None:
    """`= 0.000178 h` for a short run; now seconds, minutes or hours, whichever fits."""
    from domainlm.inspect_data import hours_shown

    assert [hours_shown(h) for h in (0.000178, 0.2, 3.2)] == ["0.64 s", "12 min", "3.2 h"]


def test_a_validation_file_without_a_train_file_is_refused(tiny_model_dir, tmp_path, capsys):
    """It was ignored without a word: the memory plan alone was printed."""
    valid = tmp_path / "v.txt"
    valid.write_text("a line\n")
    assert main(["inspect", "--model", str(tiny_model_dir), "--validation-file", str(valid)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--validation-file is inspected with the --train-file" in err[0]
