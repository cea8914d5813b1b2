"""Bad input (issue 5): one line naming the file or option and what to do, exit code 2, no
traceback, nothing written or deleted. Plus what is not an error: a very long single line."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import refuse_writes_in, uneven_corpus, write_lines

from domainlm.cli import main as cli_main


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_lines(folder / "train.txt", uneven_corpus(30, seed=0))
    write_lines(folder / "valid.txt", uneven_corpus(6, seed=1))
    return folder


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
    }


def refused(capsys: pytest.CaptureFixture[str], args: list[str], out: Path, *expected: str) -> str:
    """Run the CLI; assert exit 2, one error line holding `expected`, and out/ untouched."""
    before = snapshot(out)
    existed = out.exists()
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith("domainlm: error:")]
    assert len(lines) == 1, err
    for text in expected:
        assert text in lines[0], lines[0]
    assert out.exists() == existed and snapshot(out) == before, "the output dir was touched"
    return lines[0]


def args_for(model: Path | str, train: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", str(model), "--train-file", str(train), "--output-dir", str(out),
        "--block-size", "32", "--batch-size", "2", "--max-steps", "1", "--precision", "fp32",
        "--quiet", *extra,
    ]  # fmt: skip


def test_missing_file(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    missing = tmp_path / "nope.txt"
    refused(capsys, args_for(tiny_model_dir, missing, out), out, str(missing), "no such file")


def test_folder_without_text_files(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "notes.pdf").write_bytes(b"%PDF")
    out = tmp_path / "out"
    message = "no .txt, .jsonl, .parquet or .csv"
    refused(capsys, args_for(tiny_model_dir, folder, out), out, str(folder), message)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n\t\n"], ids=["empty", "blank-lines"])
def test_empty_or_blank_file(tiny_model_dir: Path, tmp_path: Path, capsys, content) -> None:
    train = tmp_path / "train.txt"
    train.write_bytes(content)
    out = tmp_path / "out"
    refused(capsys, args_for(tiny_model_dir, train, out), out, str(train), "no text in it")


def test_binary_file(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    train = tmp_path / "train.txt"
    train.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    out = tmp_path / "out"
    refused(capsys, args_for(tiny_model_dir, train, out), out, str(train), "binary")


def test_a_stray_nul_byte_names_its_lines(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    """A text file with NUL bytes on a few lines is refused with those lines' numbers (counted
    here by hand) and the way to remove them, not only "binary"."""
    train = tmp_path / "train.txt"
    lines = [b"plain line %d" % n for n in range(1, 13)]
    for number in (3, 7):
        lines[number - 1] += b"\x00tail"
    train.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    refused(
        capsys, args_for(tiny_model_dir, train, out), out, str(train),
        "NUL bytes on line(s) 3, 7;", "tr -d",
    )  # fmt: skip


def test_invalid_utf8_names_lines_and_replace_goes_on(
    tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    from domainlm.data.tokens import read_documents

    train = tmp_path / "train.txt"
    train.write_bytes(b"fine line\nbad \xff\xfe line\nok\nalso bad \xc3\n")
    out = tmp_path / "out"
    refused(
        capsys,
        args_for(tiny_model_dir, train, out),
        out,
        str(train),
        "line(s) 2, 4",
        "--encoding-errors replace",
    )
    docs = read_documents(train, encoding_errors="replace")
    assert docs == ["fine line", "bad \ufffd\ufffd line", "ok", "also bad \ufffd"]


def test_unknown_model_offline(tmp_path: Path, corpus: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    line = refused(
        capsys,
        args_for("no-such-org-xyz/no-such-model", corpus / "train.txt", out),
        out,
        "no-such-org-xyz/no-such-model",
        "hub",
        "local model folder",
        "scratch:",
    )
    assert "unreachable" in line


def test_block_size_over_context(
    tiny_model_dir: Path, corpus: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """The error alone: no memory warning for a block size the model cannot take, even where
    memory is short (the plan is made only once the block size is known good)."""
    import domainlm.model.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 1)  # no plan fits
    out = tmp_path / "out"
    args = args_for(tiny_model_dir, corpus / "train.txt", out, "--block-size", "512")
    before = snapshot(out)
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for text in ("domainlm: error: --block-size 512", "context of 256", "at most 256"):
        assert text in err[0], err[0]
    assert snapshot(out) == before
    assert cli_main(args_for(tiny_model_dir, corpus / "train.txt", out)) == 0  # planted short
    assert "warning: memory: this run needs" in capsys.readouterr().err  # memory is warned


@pytest.mark.parametrize(
    "flag,value",
    [("--batch-size", "0"), ("--lr", "-1"), ("--max-steps", "0"), ("--grad-accum", "-2"),
     ("--save-steps", "0"), ("--max-bad-steps", "0"), ("--lr", "nan"), ("--weight-decay", "inf"),
     ("--early-stopping-patience", "0"), ("--seed", "-1"), ("--seed", "99999999999999999999"),
     ("--adam-beta1", "1.5"), ("--adam-beta2", "-0.1"), ("--sample-max-new-tokens", "0")],
)  # fmt: skip
def test_zero_or_negative_numbers(corpus: Path, tmp_path: Path, capsys, flag, value) -> None:
    out = tmp_path / "out"
    args = args_for("scratch:tiny", corpus / "train.txt", out, flag, value)
    refused(capsys, args, out, flag)


def test_load_best_model_at_end_needs_every_checkpoint_evaluated(
    corpus: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    args = args_for("scratch:tiny", corpus / "train.txt", out, "--load-best-model-at-end",
                    "--save-steps", "3", "--eval-steps", "2")  # fmt: skip
    refused(capsys, args, out, "--save-steps 3 is not a multiple of --eval-steps 2")


def test_output_dir_is_a_file(tiny_model_dir: Path, corpus: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    out.write_text("my notes")
    refused(capsys, args_for(tiny_model_dir, corpus / "train.txt", out), out, str(out), "is a file")
    assert out.read_text() == "my notes"


def test_output_dir_not_writable(
    tiny_model_dir: Path, corpus: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    # Tests may run as root, for whom chmod does not forbid writing: the check itself is
    # os.access, so it is what is made to say no.
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode)
    )
    out = locked / "out"
    refused(capsys, args_for(tiny_model_dir, corpus / "train.txt", out), out, "not writable")


def test_resume_with_another_model_or_tokenizer(
    tiny_model_dir: Path, corpus: Path, tmp_path: Path, capsys
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    out = tmp_path / "out"
    train = corpus / "train.txt"
    assert cli_main(args_for(model, train, out, "--save-steps", "1")) == 0
    capsys.readouterr()
    refused(
        capsys,
        args_for("scratch:tiny", train, out, "--max-steps", "2"),
        out,
        "another model",
        "--output-dir",
    )
    # Same model folder, but its tokenizer changed (a token added): the ids would differ.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.add_tokens(["<domain-term>"])
    tokenizer.save_pretrained(model)
    refused(capsys, args_for(model, train, out, "--max-steps", "2"), out,
            "belongs to a run whose tokenizer gave other token ids")  # fmt: skip
    # --eos-token changed: named (it was "another tokenizer (86171d87... vs 5f2621b1...)")
    shutil.rmtree(model)
    shutil.copytree(tiny_model_dir, model)
    refused(capsys, args_for(model, train, out, "--max-steps", "2", "--eos-token", "!"), out,
            "or the end-of-document token: --eos-token")  # fmt: skip


def test_ten_megabyte_single_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A 10 MB single line: one document, many blocks, no error (about 9 s)."""
    check_long_line(tiny_model_dir, tmp_path, 10_000_000)


def check_long_line(tiny_model_dir: Path, tmp_path: Path, size: int) -> None:
    from domainlm.data.blocks import BlockDataset
    from domainlm.data.tokens import load_token_stream
    from domainlm.model.loading import load_model, tokenizer_fingerprint

    words = np.random.default_rng(0).choice(["alpha", "beta", "gamma", "delta"], size // 5)
    train = tmp_path / "long.txt"
    train.write_text(" ".join(words)[:size] + "\n")
    loaded = load_model(str(tiny_model_dir))
    fingerprint = tokenizer_fingerprint(loaded.tokenizer, loaded.eos_id)
    stream = load_token_stream(train, loaded.tokenizer, loaded.eos_id, fingerprint).stream
    assert stream.num_documents == 1
    dataset = BlockDataset(stream, 64)
    assert len(dataset) == -(-stream.num_predicted // 64) > 1000
    assert sum(dataset.targets_in(i) for i in range(len(dataset))) == stream.num_predicted


def test_same_train_and_validation_file_warns_of_leakage(
    tiny_model_dir: Path, corpus: Path, tmp_path: Path, capsys
) -> None:
    from domainlm.config import TrainConfig
    from domainlm.model.loading import load_model, tokenizer_fingerprint
    from domainlm.run.metrics import Console
    from domainlm.run.train import load_streams

    train = str(corpus / "train.txt")
    config = TrainConfig(
        model=str(tiny_model_dir), train_file=train, validation_file=train, output_dir="unused"
    )
    loaded = load_model(str(tiny_model_dir))
    fingerprint = tokenizer_fingerprint(loaded.tokenizer, loaded.eos_id)
    load_streams(config, loaded, fingerprint, Console())
    err = capsys.readouterr().err
    assert "warning: the validation file is the training file" in err and "leakage" in err


def test_unreachable_hub_fails_fast_with_one_line(tmp_path: Path, corpus: Path) -> None:
    """Without HF_HUB_OFFLINE, a hub that cannot be reached is one line within seconds, not a
    minute of huggingface_hub's retry messages."""
    import os
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens on the discard port
    out = tmp_path / "out"
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "domainlm", *args_for("gpt2", corpus / "train.txt", out)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "is unreachable" in result.stderr and "scratch:" in result.stderr
    assert elapsed < 30 and not out.exists()


def test_a_model_folder_without_tokenizer_files_is_refused(
    tiny_model_dir: Path, corpus: Path, tmp_path: Path, capsys
) -> None:
    """transformers builds an empty tokenizer of the config's type from such a folder: every
    text would be zero tokens, and the run would train on EOS tokens alone."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (model / name).unlink(missing_ok=True)
    out = tmp_path / "out"
    refused(capsys, args_for(model, corpus / "train.txt", out), out, "has no usable tokenizer")
    scores = ["perplexity", "--model", str(model), "--file", str(corpus / "valid.txt")]
    refused(capsys, scores, out, "has no usable tokenizer", "copy the tokenizer files")


def test_a_truncated_weights_file_is_refused_in_one_line(
    tiny_model_dir: Path, corpus: Path, tmp_path: Path, capsys
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # an interrupted copy
    out = tmp_path / "out"
    refused(capsys, args_for(model, corpus / "train.txt", out), out, "damaged or incomplete")
    scores = ["perplexity", "--model", str(model), "--file", str(corpus / "valid.txt")]
    refused(capsys, scores, out, f"could not read the weights of {model}")
    assert weights.stat().st_size == 1000  # nothing rewritten


def test_per_line_scores_never_overwrite_the_text_scored(
    tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    import json

    data = tmp_path / "data"
    data.mkdir()
    texts = data / "valid.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in uneven_corpus(4, seed=2)))
    before = texts.read_bytes()
    for source, target in ((texts, texts), (data, data / "valid.jsonl"), (data, data / "s.csv")):
        argv = ["perplexity", "--model", str(tiny_model_dir), "--file", str(source),
                "--per-line", str(target), "--quiet"]  # fmt: skip
        refused(capsys, argv, data, "is the text being scored", "name another file")
    assert texts.read_bytes() == before


def test_resume_on_other_training_data_is_refused(
    tiny_model_dir: Path, corpus: Path, tmp_path: Path, capsys
) -> None:
    """A checkpoint's place in the data (epoch, offset) belongs to the stream it was trained
    on: another file, an edited one, or another --doc-sep must not resume silently from it."""
    out = tmp_path / "out"
    train, valid = corpus / "train.txt", ("--validation-file", str(corpus / "valid.txt"))
    assert cli_main(args_for(tiny_model_dir, train, out, "--save-steps", "1", *valid)) == 0
    capsys.readouterr()
    other = write_lines(tmp_path / "other.txt", uneven_corpus(30, seed=7))
    edited = write_lines(tmp_path / "edited.txt", train.read_text().splitlines()[:-1])
    for data, extra in ((other, ()), (edited, ()), (train, ("--doc-sep", "blank"))):
        argv = args_for(tiny_model_dir, data, out, "--max-steps", "2", *valid, *extra)
        refused(capsys, argv, out, "belongs to a run on other training data", "--model")
    # the same data, copied to another name, resumes
    same = tmp_path / "same.txt"
    shutil.copyfile(train, same)
    assert cli_main(args_for(tiny_model_dir, same, out, "--max-steps", "2", *valid)) == 0
    assert "resuming from" in capsys.readouterr().err


def test_resume_from_an_earlier_checkpoint_of_the_folder_is_refused(
    tiny_model_dir: Path, corpus: Path, tmp_path: Path, capsys
) -> None:
    """Going on from checkpoint-2 in a folder that holds checkpoint-4 would leave two histories
    in one folder (metrics, best checkpoint, the next plain resume picking checkpoint-4); from
    another --output-dir it is a branch of its own."""
    out = tmp_path / "out"
    train, valid = corpus / "train.txt", ("--validation-file", str(corpus / "valid.txt"))
    assert (
        cli_main(
            args_for(tiny_model_dir, train, out, "--max-steps", "4", "--save-steps", "2", *valid)
        )
        == 0
    )
    capsys.readouterr()
    back = ("--max-steps", "3", "--resume", str(out / "checkpoint-2"), *valid)
    refused(
        capsys,
        args_for(tiny_model_dir, train, out, *back),
        out,
        "holds later checkpoints of that run (checkpoint-4)",
    )
    branch = tmp_path / "branch"
    assert cli_main(args_for(tiny_model_dir, train, branch, "--save-steps", "1", *back)) == 0
    assert f"resuming from {out / 'checkpoint-2'} at step 2" in capsys.readouterr().err
    assert sorted(p.name for p in branch.glob("checkpoint-*")) == ["checkpoint-3"]


def test_a_cache_dir_that_is_a_file_or_cannot_be_made(corpus: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    cache = tmp_path / "cache.txt"
    cache.write_text("mine")
    args = args_for("scratch:tiny", corpus / "train.txt", out, "--cache-dir", str(cache))
    refused(capsys, args, out, f"the token cache {cache} is a file", "--cache-dir")
    assert cache.read_text() == "mine"
    below_a_file = cache / "sub"
    args = args_for("scratch:tiny", corpus / "train.txt", out, "--cache-dir", str(below_a_file))
    refused(capsys, args, out, f"cannot create the token cache folder {below_a_file}")


def test_a_file_given_as_a_folder_is_named_a_file(corpus: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    text = corpus / "valid.txt"
    args = args_for(text, corpus / "train.txt", out)
    refused(capsys, args, out, f"model folder {text} is a file, not a folder")
    args = args_for("scratch:tiny", corpus / "train.txt", out, "--resume", str(text))
    refused(capsys, args, out, f"--resume {text}", "a file, not a checkpoint folder")


def test_resume_from_another_models_checkpoint_names_the_fix(
    tiny_model_dir: Path, corpus: Path, tmp_path: Path, capsys
) -> None:
    """A --resume checkpoint of another run says to give another --resume, not to change
    --output-dir (which would not help)."""
    first = tmp_path / "first"
    assert cli_main(args_for(tiny_model_dir, corpus / "train.txt", first)) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    args = args_for("scratch:tiny", corpus / "train.txt", out,
                    "--resume", str(first / "checkpoint-1"))  # fmt: skip
    line = refused(capsys, args, out, "belongs to a run with another model")
    assert line.endswith("pass --resume a checkpoint of a run with this command's settings "
                         "(or drop --resume)")  # fmt: skip


def test_a_llama_folder_without_tokenizer_files_is_refused(tmp_path: Path, corpus: Path, capsys):
    """Without any tokenizer file transformers fails to build a Llama's tokenizer (a cut-off
    message before); the line says what is missing and what to do."""
    from tiny_families import save_family_folder

    model = save_family_folder("llama", tmp_path / "llama")
    for path in model.iterdir():
        if "tokenizer" in path.name or path.name in ("vocab.json", "merges.txt"):
            path.unlink()
    out = tmp_path / "out"
    refused(capsys, args_for(model, corpus / "train.txt", out), out, "has no usable tokenizer",
            "copy the tokenizer files")  # fmt: skip


def test_inspect_refuses_a_run_of_no_steps(corpus: Path, tmp_path: Path, capsys) -> None:
    base = ["inspect", "--model", "scratch:tiny", "--train-file", str(corpus / "train.txt"),
            "--time-steps", "0"]  # fmt: skip
    refused(capsys, [*base, "--epochs", "-3"], tmp_path / "none", "--epochs must be positive")
    refused(
        capsys,
        [*base, "--max-steps", "0"],
        tmp_path / "none",
        "--max-steps must be a positive number",
    )
    refused(capsys, [*base, "--seed", "-1"], tmp_path / "none", "--seed must be a whole number")
    for share in ("0", "1", "-0.5", "1.5"):  # as train refuses them (inspect printed "-50%")
        refused(capsys, [*base, f"--validation-split={share}"], tmp_path / "none",
                f"--validation-split must be between 0 and 1, e.g. 0.05, got {float(share)}")  # fmt: skip


def test_generate_refuses_invalid_utf8_prompts_and_nan_settings(
    tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"hello world\nbad \xff\xfe bytes\nfine\n")
    base = ["generate", "--model", str(tiny_model_dir), "--max-new-tokens", "2"]
    refused(capsys, [*base, "--prompts-file", str(prompts)], tmp_path / "none",
            f"--prompts-file {prompts}: invalid UTF-8 on line(s) 2")  # fmt: skip
    for flag in ("--temperature", "--repetition-penalty"):
        refused(capsys, [*base, "--prompt", "a", flag, "nan"], tmp_path / "none", flag)
    refused(capsys, [*base, "--prompt", "a", "--seed", "-1"], tmp_path / "none", "--seed must be")
    scores = ["perplexity", "--model", str(tiny_model_dir), "--text", "a b", "--seed", "-1"]
    refused(capsys, scores, tmp_path / "none", "--seed must be a whole number")


def test_resume_with_another_seed_is_refused(corpus: Path, tmp_path: Path, capsys) -> None:
    """The seed orders the blocks of every epoch: a run resumed with another one would repeat
    some blocks and skip others, so it is refused, naming the seed to give; the run's own seed
    resumes (and a run recorded before the seed was part of its identity resumes too)."""
    import json

    out = tmp_path / "out"
    args = args_for("scratch:tiny", corpus / "train.txt", out, "--seed", "3")
    assert cli_main(args) == 0
    capsys.readouterr()
    longer = args_for("scratch:tiny", corpus / "train.txt", out, "--max-steps", "2")
    refused(capsys, [*longer, "--seed", "7"], out, "belongs to a run with --seed 3",
            "give --seed 3 again")  # fmt: skip
    run_file = out / "run_config.json"
    record = json.loads(run_file.read_text())
    del record["identity"]["seed"]  # as written before
    run_file.write_text(json.dumps(record))
    assert cli_main([*longer, "--seed", "3"]) == 0
    assert "resuming from" in capsys.readouterr().err


def test_output_into_a_pipe_its_reader_closed_ends_quietly(tiny_model_dir: Path) -> None:
    """`domainlm perplexity ... --json | head -0`: the reader is gone before the command
    writes. It ends with exit code 141 (128 + SIGPIPE, as `yes | head` ends `yes`) and says
    nothing: no BrokenPipeError traceback."""
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "domainlm", "perplexity", "--model", str(tiny_model_dir),
             "--text", "the cat sat on the mat", "--json", "--quiet"],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (141, "")


def test_a_run_without_its_final_model_names_its_newest_checkpoint(
    tiny_model_dir: Path, corpus: Path, tmp_path: Path, capsys
) -> None:
    """perplexity, generate and inspect given a run folder that has checkpoints but no final
    model yet (training, or stopped) say so and name the newest checkpoint, which works."""
    run = tmp_path / "run"
    assert cli_main(args_for(tiny_model_dir, corpus / "train.txt", run, "--max-steps", "2",
                             "--save-steps", "1")) == 0  # fmt: skip
    for name in ("config.json", "model.safetensors"):  # as while it trains
        (run / name).unlink()
    capsys.readouterr()
    hint = f"--model {run / 'checkpoint-2'}"
    for command in (["perplexity", "--text", "a b c"], ["generate", "--prompt", "a"],
                    ["inspect"]):  # fmt: skip
        line = refused(capsys, [command[0], "--model", str(run), *command[1:]], run,
                       "is a training run without its final model yet", hint)  # fmt: skip
        assert line.endswith(hint)
    assert cli_main(["perplexity", "--model", str(run / "checkpoint-2"), "--text", "a b c"]) == 0


@pytest.mark.parametrize("command", ["train", "perplexity"])
def test_a_json_array_file_is_refused_with_how_to_convert(
    tiny_model_dir: Path, tmp_path: Path, capsys, command
) -> None:
    """A .json file is read as JSON Lines (run_clm.py's meaning); one holding a JSON array is
    refused in one line saying so and how to convert it, by training and by perplexity alike."""
    data = tmp_path / "train.json"
    data.write_text('[{"text": "first document"}, {"text": "second document"}]\n')
    out = tmp_path / "out"
    args = args_for(tiny_model_dir, data, out)
    if command == "perplexity":
        args = ["perplexity", "--model", str(tiny_model_dir), "--file", str(data), "--quiet"]
    refused(capsys, args, out, str(data), "JSON Lines is expected", "jq -c '.[]'")


def test_gbk_text_is_told_to_convert_with_iconv(tiny_model_dir: Path, tmp_path: Path, capsys):
    """Chinese text saved as GBK: the refusal names iconv's conversion first (--encoding-errors
    replace would train on U+FFFD), still with the lines; Latin-1 text keeps the plain advice."""
    train = tmp_path / "train.txt"
    train.write_bytes("第一行中文文本\nplain ascii line\n第二行的内容，很好\n".encode("gbk"))
    out = tmp_path / "out"
    refused(
        capsys, args_for(tiny_model_dir, train, out), out, "invalid UTF-8 on line(s) 1, 3;",
        f"iconv -f gb18030 -t utf-8 {train} > {train}.utf8.txt", "--encoding-errors replace",
    )  # fmt: skip
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café résumé naïve\ndéjà vu\n".encode("latin-1"))
    line = refused(capsys, args_for(tiny_model_dir, latin, out), out, "--encoding-errors replace")
    assert "iconv" not in line and "GB18030" not in line


def compressed_or_wide(text: bytes) -> dict[str, tuple[bytes, str]]:
    """name -> (the file's bytes, what the one-line refusal must say)."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("train.txt", text)
    zstd = b"\x28\xb5\x2f\xfd\x24\x0c\x61\x00\x00" + text  # a zstd frame header, then bytes
    return {
        "gzip": (
            gzip.compress(text),
            "is gzip-compressed, not text; decompress it first: gzip -dc",
        ),
        "bzip2": (
            bz2.compress(text),
            "is bzip2-compressed, not text; decompress it first: bzip2 -dc",
        ),
        "xz": (lzma.compress(text), "is xz-compressed, not text; decompress it first: xz -dc"),
        "zstd": (zstd, "is zstd-compressed, not text; decompress it first: zstd -dc"),
        "zip": (archive.getvalue(), "is a zip archive, not text; decompress it first: unzip"),
        "utf-16-le": (text.decode().encode("utf-16"), "is UTF-16 text (it starts with a UTF-16"),
        "utf-16-be": (b"\xfe\xff" + text.decode().encode("utf-16-be"), "iconv -f utf-16 -t utf-8"),
        "utf-32": (
            text.decode().encode("utf-32"),
            "UTF-32 byte-order mark), not UTF-8; convert it: iconv -f utf-32",
        ),
    }


@pytest.mark.parametrize("kind", list(compressed_or_wide(b"x")))
def test_compressed_and_utf16_files_are_named_for_what_they_are(
    tiny_model_dir: Path, tmp_path: Path, capsys, kind
) -> None:
    """Not "binary ... remove its NUL bytes (tr -d '\\000')", advice that would ruin them."""
    text = "".join(f"line {n} of the text\n" for n in range(40)).encode()
    content, message = compressed_or_wide(text)[kind]
    train = tmp_path / "train.txt"
    train.write_bytes(content)
    out = tmp_path / "out"
    line = refused(capsys, args_for(tiny_model_dir, train, out), out, str(train), message)
    assert "tr -d" not in line and "binary" not in line


def test_old_mac_line_ends_in_a_single_document_are_named(
    tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    """A file of CR-only line ends is one line, so one document: the refusal (no validation file
    to hold out from it) says why and how to convert; a real one-line file does not."""
    train = tmp_path / "cr.txt"
    train.write_bytes(b"line one\rline two\rline three\r")
    out = tmp_path / "out"
    refused(
        capsys, args_for(tiny_model_dir, train, out), out, "single document",
        "carriage return(s) with no line feed", f"tr '\\r' '\\n' < {train}", "--validation-file",
    )  # fmt: skip
    one = tmp_path / "one.txt"
    one.write_bytes(b"just one line of text\r\n")
    line = refused(capsys, args_for(tiny_model_dir, one, out), out, "single document")
    assert "carriage return" not in line


def test_per_line_scores_in_a_read_only_folder_or_under_a_file_are_refused_before_scoring(
    tiny_model_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """--per-line in a read-only folder is one line before any model is loaded or scored (it
    was an OSError traceback after scoring everything); under a file, it says it is a file."""
    from domainlm.evaluation import perplexity

    def no_loading(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(perplexity, "load_any_model", no_loading)
    text = write_lines(tmp_path / "valid.txt", uneven_corpus(4, seed=2))
    locked = tmp_path / "locked"
    locked.mkdir()
    refuse_writes_in(monkeypatch, locked)
    base = ["perplexity", "--model", str(tiny_model_dir), "--file", str(text), "--quiet"]
    target = locked / "s.jsonl"
    refused(capsys, [*base, "--per-line", str(target)], locked,
            f"--per-line {target}: cannot write in the folder {locked}", "Read-only file system")  # fmt: skip
    under_a_file = text / "s.jsonl"
    refused(capsys, [*base, "--per-line", str(under_a_file)], tmp_path,
            f"--per-line {under_a_file}: {text} is a file, not a folder")  # fmt: skip


def test_a_missing_checkpoint_of_a_local_run_folder_is_said_not_to_exist(
    tmp_path: Path, corpus: Path, capsys, monkeypatch
) -> None:
    """`--model run/checkpoint-99` with run/ a run folder here is a local path: "does not
    exist", and the hub is not asked (it said the model is not in the Hugging Face cache and the
    hub is unreachable). An owner/name whose owner is no folder here, or a plain folder (./Qwen/
    holding other models), is still a hub id."""
    from domainlm.model import loading

    asked: list[bool] = []
    monkeypatch.setattr(loading, "hub_reachable", lambda *a, **k: asked.append(True) or False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run_config.json").write_text("{}")
    (tmp_path / "owner").mkdir()  # a plain folder
    text = str(corpus / "valid.txt")
    argv = ["perplexity", "--model", "run/checkpoint-99", "--file", text, "--quiet"]
    refused(capsys, argv, tmp_path / "run",
            "model folder run/checkpoint-99 does not exist; give a hub id, a folder or scratch:")  # fmt: skip
    assert asked == []
    argv = ["perplexity", "--model", "no-such-org-xyz/m", "--file", text, "--quiet"]
    refused(capsys, argv, tmp_path / "run", "'no-such-org-xyz/m' is not in the local Hugging Face")
    assert asked == [True]
    argv = ["perplexity", "--model", "owner/m", "--file", text, "--quiet"]
    refused(capsys, argv, tmp_path / "run", "'owner/m' is not in the local Hugging Face")
    assert asked == [True, True]
    # inspect's memory plan reads the config alone, by the same rule (it asked the hub)
    refused(capsys, ["inspect", "--model", "run/checkpoint-99"], tmp_path / "run",
            "model folder run/checkpoint-99 does not exist")  # fmt: skip


def test_the_data_folder_as_output_dir_is_refused(
    tiny_model_dir: Path, corpus: Path, tmp_path: Path, capsys
) -> None:
    """`--train-file data --output-dir data` (allowed with --overwrite-output-dir, "to write
    beside its files") made the run's metrics.jsonl training data: every later command there
    failed on it. Refused before anything is written, spelled either way; so is the
    --validation-file folder."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(corpus / "train.txt", data / "a.txt")
    for out in (data, tmp_path / "data" / "."):
        refused(capsys, args_for(tiny_model_dir, data, out, "--overwrite-output-dir"), data,
                f"--output-dir {out} is the --train-file folder")  # fmt: skip
    flags = ("--validation-file", str(data), "--overwrite-output-dir")
    refused(capsys, args_for(tiny_model_dir, corpus / "train.txt", data, *flags), data,
            "is the --validation-file folder")  # fmt: skip
