"""Values of a --config file are checked against TrainConfig's field types; precision flags agree.

YAML reads `5e-5` (an exponent without a dot) as a string, so float fields take strings that parse
as numbers; anything of the wrong type is one `domainlm: error:` line, exit code 2, nothing written.
A key given twice is refused (YAML itself keeps the last silently); one string is a list of one.
`--bf16`/`--fp16` are spellings of `--precision bf16/fp16`: two that disagree are refused.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import uneven_corpus, write_lines

from domainlm.cli import build_parser, main, train_config_from_args
from domainlm.config import TrainConfig


def parse(args: list[str]) -> TrainConfig:
    return train_config_from_args(build_parser().parse_args(["train", *args]))


@pytest.fixture
def run_files(tmp_path: Path, tiny_model_dir: Path) -> dict[str, Path]:
    """A real model and corpus, so a check that is missing shows up as a run that goes ahead."""
    train_file = write_lines(tmp_path / "train.txt", uneven_corpus(40))
    return {"model": tiny_model_dir, "train_file": train_file, "output_dir": tmp_path / "out"}


def write_config(run_files: dict[str, Path], extra: str) -> Path:
    config_file = run_files["train_file"].parent / "run.yaml"
    base = "".join(f"{key}: {path}\n" for key, path in run_files.items())
    config_file.write_text(base + "max_steps: 1\nblock_size: 32\n" + extra + "\n")
    return config_file


def test_yaml_exponent_without_a_dot_is_a_number(run_files: dict[str, Path]) -> None:
    config_file = write_config(run_files, "lr: 5e-5\nweight_decay: 1e-2\nsave_steps: '7'")
    config = parse(["--config", str(config_file)])
    assert (config.lr, config.weight_decay, config.save_steps) == (5e-05, 0.01, 7)
    assert isinstance(config.lr, float) and isinstance(config.save_steps, int)
    assert (config.max_steps, config.block_size, config.sample_prompts) == (1, 32, None)


def test_yaml_lists_and_bools_of_the_right_type_are_kept(run_files: dict[str, Path]) -> None:
    config_file = write_config(run_files, "report_to: [none]\ncompile: true\nvalidation_file:")
    config = parse(["--config", str(config_file)])
    assert (config.report_to, config.compile, config.validation_file) == (["none"], True, None)
    # YAML's merge key, and one string for a list, as on the command line (`--report-to x`).
    config = parse(["--config", str(write_config(run_files, "<<: {lr: 2.0e-4, batch_size: 3}"))])
    assert (config.lr, config.batch_size) == (2e-4, 3)
    config = parse(["--config", str(write_config(run_files, "report_to: tensorboard"))])
    assert config.report_to == ["tensorboard"]


def test_command_line_numbers_still_parse_and_override_the_file(
    run_files: dict[str, Path],
) -> None:
    config_file = write_config(run_files, "lr: 5e-5\nbatch_size: 3")
    config = parse(["--config", str(config_file), "--lr", "3e-4", "--weight-decay", "1e-2"])
    assert (config.lr, config.weight_decay, config.batch_size) == (3e-4, 0.01, 3)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('batch_size: "four"', "batch_size must be an integer, got 'four'"),
        ("batch-size: 4.5", "batch-size must be an integer, got 4.5"),
        ("lr: fast", "lr must be a number, got 'fast'"),
        ("learning_rate: .nan", "learning_rate must be a number, got nan"),
        ("weight_decay: [0.1]", "weight_decay must be a number, got [0.1]"),
        ("compile: 'yes'", "compile must be true or false, got 'yes'"),
        ("save_steps: true", "save_steps must be an integer, got True"),
        ("text_column: 3", "text_column must be a string, got 3"),
        ("report_to: 3", "report_to must be a list of strings, got 3"),
        (
            "report_to: [tensorboard, 3]",
            "report_to must be a list of strings, got ['tensorboard', 3]",
        ),
        ("lr: 1e-4\nlr: 1e-3", "not valid YAML ('lr' is given twice, again on line 7)"),
        ("? [a]\n: 1", "not valid YAML (a key must be a name, not a list)"),
        ("{a: 1}: 2", "not valid YAML (a key must be a name, not a dict)"),
        ("bf16: 'on'", "bf16 must be true or false, got 'on'"),
    ],
)
def test_wrong_type_in_yaml_is_one_line_and_writes_nothing(
    run_files: dict[str, Path], capsys: pytest.CaptureFixture, line: str, message: str
) -> None:
    config_file = write_config(run_files, line)
    code = main(["train", "--config", str(config_file)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == f"domainlm: error: --config {config_file}: {message}"
    assert not run_files["output_dir"].exists()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--precision", "fp32", "--bf16"], ("--precision fp32", "--bf16")),
        (["--bf16", "--precision", "fp32"], ("--precision fp32", "--bf16")),
        (["--bf16", "--fp16"], ("--bf16", "--fp16")),
        (["--fp16", "--bf16"], ("--bf16", "--fp16")),
        (["--fp16", "--precision", "bf16"], ("--precision bf16", "--fp16")),
    ],
)
def test_conflicting_precision_flags_are_one_line_naming_both(
    run_files: dict[str, Path], capsys: pytest.CaptureFixture, flags: list[str], named: tuple
) -> None:
    config_file = write_config(run_files, "")
    code = main(["train", "--config", str(config_file), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and err.startswith("domainlm: error: ")
    assert f"{named[0]} and {named[1]} ask for different precisions" in err
    assert not run_files["output_dir"].exists()


def test_conflicting_precision_keys_in_yaml_are_refused(
    run_files: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    config_file = write_config(run_files, "precision: fp32\nbf16: true")
    code = main(["train", "--config", str(config_file)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert f"--config {config_file}: precision fp32 and bf16 ask for different" in err
    assert not run_files["output_dir"].exists()


@pytest.mark.parametrize(
    "flags",
    [["--precision", "bf16", "--bf16"], ["--bf16", "--bf16"], ["--fp16", "--precision", "fp16"]],
)
def test_the_same_precision_twice_is_fine(run_files: dict[str, Path], flags: list[str]) -> None:
    config = parse(["--config", str(write_config(run_files, "")), *flags])
    assert config.precision == flags[-1].lstrip("-")


def test_a_command_line_precision_overrides_the_files(run_files: dict[str, Path]) -> None:
    config_file = write_config(run_files, "bf16: true")
    assert parse(["--config", str(config_file), "--precision", "fp32"]).precision == "fp32"
    assert parse(["--config", str(config_file)]).precision == "bf16"
