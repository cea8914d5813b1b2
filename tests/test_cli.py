"""The command line: seed (run_clm.py) spelling, YAML configs, help and error handling."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from domainlm.cli import build_parser, main, train_config_from_args
from domainlm.config import TrainConfig

SEED_COMMAND = """--model_name_or_path gpt2 --train_file train_en.txt --validation_file valid_en.txt
--do_train --do_eval --output_dir model --overwrite_output_dir --per_device_eval_batch_size 8
--per_device_train_batch_size 6 --num_train_epochs 10 --save_steps 1000 --save_total_limit 3
--learning_rate 3e-5 --block_size 512 --gradient_accumulation_steps 2 --max_steps 50
--warmup_steps 5 --logging_steps 7 --eval_steps 100 --seed 9 --bf16""".split()

NEW_COMMAND = """--model gpt2 --train-file train_en.txt --validation-file valid_en.txt
--output-dir model --overwrite-output-dir --eval-batch-size 8 --batch-size 6 --epochs 10
--save-steps 1000 --save-total-limit 3 --lr 3e-5 --block-size 512 --grad-accum 2 --max-steps 50
--warmup-steps 5 --logging-steps 7 --eval-steps 100 --seed 9 --precision bf16""".split()


def parse(args: list[str]) -> TrainConfig:
    return train_config_from_args(build_parser().parse_args(["train", *args]))


def test_seed_spelling_parses_to_the_same_config() -> None:
    seed = parse(SEED_COMMAND)
    assert seed == parse(NEW_COMMAND)
    assert (seed.batch_size, seed.eval_batch_size, seed.epochs, seed.grad_accum) == (6, 8, 10.0, 2)
    assert (seed.precision, seed.lr, seed.save_total_limit) == ("bf16", 3e-5, 3)


def test_yaml_config_and_flags_override_it(tmp_path: Path) -> None:
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        "model: scratch:tiny\ntrain_file: a.txt\noutput-dir: out\nlearning_rate: 0.001\n"
        "batch_size: 3\nsave_steps: 7\n"
    )
    config = parse(["--config", str(config_file), "--batch-size", "5"])
    assert (config.model, config.train_file, config.output_dir) == ("scratch:tiny", "a.txt", "out")
    assert (config.lr, config.batch_size, config.save_steps, config.eval_steps) == (0.001, 5, 7, 7)


def test_a_config_files_overwrite_is_turned_off_on_the_command_line(tmp_path: Path) -> None:
    """`--no-overwrite-output-dir` (the flag a stopped run's resume hint adds when a --config file
    set overwrite_output_dir: the file's run would otherwise start afresh)."""
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        "model: scratch:tiny\ntrain_file: a.txt\noutput_dir: o\noverwrite_output_dir: true\n"
    )
    assert parse(["--config", str(config_file)]).overwrite_output_dir is True
    for negation in ("--no-overwrite-output-dir", "--no_overwrite_output_dir"):
        # each spelling negates as itself (argparse made --no-overwrite_output_dir of the
        # second, and refused --no_overwrite_output_dir)
        assert parse(["--config", str(config_file), negation]).overwrite_output_dir is False
    lora = ["--config", str(config_file), "--lora"]
    assert parse([*lora, "--no-merge"]).merge is False  # a flag on by default
    assert parse([*lora, "--merge"]).merge is True
    train_help = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "--no-overwrite_output_dir" not in train_help


def test_config_paths_read_as_on_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config file's `~/x` is the home folder's, as a shell expands a flag's (it was a folder
    literally named "~" in the working folder); a relative path stays relative to the folder
    the command runs in, as the --config help says."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        "model: scratch:tiny\ntrain_file: ~/data/train.txt\noutput_dir: ~/runs/one\n"
        "validation_file: data/valid.txt\ncache_dir: ~/cache\n"
    )
    config = parse(["--config", str(config_file)])
    home = tmp_path / "home"
    assert (config.train_file, config.output_dir) == (
        f"{home}/data/train.txt",
        f"{home}/runs/one",
    )
    assert (config.validation_file, config.cache_dir) == ("data/valid.txt", f"{home}/cache")
    assert "relative to the folder the command runs in" in " ".join(
        build_parser()._subparsers._group_actions[0].choices["train"].format_help().split()
    )


def test_a_config_file_that_cannot_be_read_whole_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Two --config files (argparse kept the last: the first was not even read), a Latin-1 file
    (a UnicodeDecodeError traceback), a folder: one line each, exit 2, nothing written."""
    first, second, latin = tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "latin.yaml"
    first.write_text("model: scratch:tiny\nbatch_sise: 3\n")
    second.write_text("model: scratch:tiny\n")
    latin.write_bytes("# café\nmodel: scratch:tiny\n".encode("latin-1"))
    base = ["train", "--train-file", "x", "--output-dir", str(tmp_path / "out")]
    for configs, expected in [
        ([first, second], f"--config given 2 times ({first}, {second}); give one file"),
        ([latin], f"--config {latin}: not UTF-8 text (byte 5); save it as UTF-8"),
        ([tmp_path], f"--config {tmp_path}: a folder, not a YAML file"),
    ]:
        flags = [part for path in configs for part in ("--config", str(path))]
        assert main([*base, *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "out").exists()


def test_unknown_yaml_key_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config_file = tmp_path / "run.yaml"
    config_file.write_text("model: scratch:tiny\nbatch_sise: 3\n")
    code = main(["train", "--config", str(config_file), "--train-file", "x", "--output-dir", "o"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "unknown option 'batch_sise'" in err
    # One option set twice (two spellings), and a value outside its choices: the file named.
    for text, expected in [
        ("lr: 1e-3\nlearning_rate: 2e-3\n", "'lr' and 'learning_rate' both set lr; keep one"),
        ("scheduler: cosine_with_restarts\n", "scheduler must be one of cosine, linear, constant"),
    ]:
        config_file.write_text("model: scratch:tiny\n" + text)
        code = main(
            ["train", "--config", str(config_file), "--train-file", "x", "--output-dir", "o"]
        )
        err = capsys.readouterr().err.strip()
        assert code == 2 and err == f"domainlm: error: --config {config_file}: {expected}" + (
            ", got 'cosine_with_restarts'" if "scheduler" in text else ""
        )


def test_an_unknown_flag_is_one_line_naming_the_command(capsys: pytest.CaptureFixture) -> None:
    """An option no command takes: one line with the command's name (not the top level's usage),
    and for a run_clm.py flag with no equivalent, what to use here."""
    base = ["train", "--model", "scratch:tiny", "--train-file", "t.txt"]
    assert main([*base, "--warmup_ratio", "0.1"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "domainlm train: error: unrecognized arguments: --warmup_ratio 0.1 (run_clm.py's; here "
        "use: --warmup_ratio -> --warmup-steps (a number of steps))"
    ]
    assert main(["generate", "--model", "m", "--bogus"]) == 2
    assert capsys.readouterr().err == (
        "domainlm generate: error: unrecognized arguments: --bogus; see --help\n"
    )


def test_run_clm_flags_name_what_to_use_here_on_the_command_line_and_in_yaml(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Every run_clm.py flag of SEED_FLAGS_INSTEAD (--validation_split_percentage, --fsdp,
    --no_cuda, --dataset_name, ...), given as a flag or as a --config key, is one line with what
    to use here (a YAML key got only "unknown option"), and every flag a hint names is one that
    `domainlm train` takes."""
    import re

    from domainlm.cli import SEED_FLAGS_INSTEAD

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    train_flags = set(re.findall(r"--[a-z][a-z-]*", capsys.readouterr().out))
    config_file = tmp_path / "run.yaml"
    base = ["train", "--model", "scratch:tiny", "--train-file", "x", "--output-dir", "o"]
    for name, instead in SEED_FLAGS_INSTEAD.items():
        if not instead.startswith("domainlm "):  # another command's flags
            assert set(re.findall(r"--[a-z][a-z-]*", instead)) <= train_flags, instead
        assert main([*base, f"--{name}", "1"]) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"domainlm train: error: unrecognized arguments: --{name} 1 (run_clm.py's; here use: "
            f"--{name} -> {instead})"
        ]
        config_file.write_text(f"model: scratch:tiny\n{name}: 1\n")
        assert main([*base, "--config", str(config_file)]) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"domainlm: error: --config {config_file}: unknown option '{name}' (run_clm.py's; "
            f"here use: {instead})"
        ]
    assert {"validation_split_percentage", "fsdp", "no_cuda", "keep_linebreaks"} <= set(
        SEED_FLAGS_INSTEAD
    )
    assert not Path("o").exists()
    # The table names train's flags: another command gets no hint it lacks the flag for
    # (`perplexity --torch_dtype` was told to use --load-dtype, which perplexity refuses).
    for command in (["perplexity", "--model", "scratch:tiny", "--text", "a"], ["demo"]):
        assert main([*command, "--torch_dtype", "bf16"]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.endswith("unrecognized arguments: --torch_dtype bf16; see --help"), line


def test_a_value_of_the_wrong_type_is_one_line_not_the_usage(
    capsys: pytest.CaptureFixture,
) -> None:
    """argparse printed ~40 lines of usage before the error line."""
    for argv, error in [
        (["train", "--num_train_epochs", "abc"],
         "domainlm train: error: argument --epochs/--num_train_epochs: invalid float value: 'abc'"),
        (["perplexity", "--file", "x"],
         "domainlm perplexity: error: the following arguments are required: --model"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        assert stopped.value.code == 2
        assert capsys.readouterr().err.splitlines() == [f"{error}; see --help"]


class WriteRecorder:
    """A stand-in stderr that keeps each write apart."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_the_error_line_is_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """Python's stderr is unbuffered: `print` writes a line's text and its end apart, and two
    torchrun ranks sharing a pipe glued their error lines into one (a flaky CI run). Each line is
    one write, so the pipe keeps it whole."""
    recorder = WriteRecorder()
    monkeypatch.setattr(sys, "stderr", recorder)
    base = ["train", "--model", "scratch:tiny", "--train-file", "x", "--output-dir", "o"]
    assert main([*base, "--batch-size", "0"]) == 2
    assert main([*base, "--bogus"]) == 2
    lines = [w for w in recorder.writes if w]
    assert len(lines) == 2 and all(w.endswith("\n") and w.count("\n") == 1 for w in lines)
    assert lines[0].startswith("domainlm: error: ") and lines[1].startswith("domainlm train: error")


def test_non_positive_numbers_are_refused(capsys: pytest.CaptureFixture) -> None:
    code = main(
        [
            "train",
            "--model",
            "scratch:tiny",
            "--train-file",
            "x",
            "--output-dir",
            "o",
            "--batch-size",
            "0",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--batch-size must be a positive number" in err and "\n" not in err


def test_help_texts_come_from_the_config_docstrings() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "domainlm", "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--grad-accum" in result.stdout and "Micro-batches accumulated" in result.stdout
    assert "--per_device_train_batch_size" in result.stdout


def test_version_names_the_package_and_the_libraries_a_bug_report_needs() -> None:
    """`domainlm --version` prints the installed package's version (pyproject.toml reads it from
    domainlm/__init__.py, one place) and torch's and transformers', then exits 0."""
    import importlib.metadata

    import torch
    import transformers

    done = subprocess.run([sys.executable, "-m", "domainlm", "--version"], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert line.startswith(f"domainlm {importlib.metadata.version('domainlm')} (")
    assert f"torch {torch.__version__}" in line
    assert f"transformers {transformers.__version__}" in line


def test_help_and_messages_name_the_flag_and_the_thing_that_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """generate --help: no train-only alias (--per_device_train_batch_size) for --batch-size,
    and --repetition-penalty says it multiplies negative logits and leaves the start token
    out; --max-grad-norm -1 names that flag alone (not --weight-decay too); the stride check
    names the command's flag; `export CKPT a-file` says it is a file."""
    from domainlm.errors import UserError
    from domainlm.evaluation.windows import check_window

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--per_device_train_batch_size" not in text and "--batch-size" in text
    assert "and multiply their negative ones by it" in text
    assert "the start token in front of the prompt (BOS, or EOS) does not count as seen" in text

    base = ["train", "--model", "scratch:tiny", "--train-file", "t.txt", "--output-dir", "o"]
    for flag in ("--max-grad-norm", "--weight-decay"):
        assert main([*base, flag, "-1"]) == 2
        assert capsys.readouterr().err == f"domainlm: error: {flag} must be 0 or more, got -1.0\n"
    with pytest.raises(UserError, match=r"^--eval-stride must be between 1 and block size - 1"):
        check_window(256, 500, stride_flag="--eval-stride")

    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    assert main(["export", str(tmp_path / "checkpoint-2"), str(notes)]) == 2
    assert capsys.readouterr().err == (
        f"domainlm: error: {notes} is a file, not a folder; give a new folder to export to\n"
    )
    assert notes.read_text() == "mine" and not Path("o").exists()
