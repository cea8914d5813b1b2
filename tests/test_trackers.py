"""--report-to (issue 16 item 3): what each tracker logged, read back through its own reader.

One tiny run logs to TensorBoard, MLflow (a file store in the output folder) and W&B (offline),
with no network. Each tracker must hold every value of metrics.jsonl (training loss, learning
rate, tokens/s, epoch; validation loss, perplexity, tokens) at the same step, under the names
`train/<key>` and `eval/<key without eval_>`, and the run's settings as in run_config.json:
- TensorBoard: tensorboard's EventAccumulator (scalars; the HPARAMS plugin's session info);
- MLflow: MlflowClient (get_metric_history, the run's params);
- W&B: the offline run file `run-<id>.wandb`, a LevelDB-style log of wandb's protobuf `Record`s
  (wandb has no reader for offline runs in recent versions), decoded here (`wandb_records`).
A tracker asked for and not installed is a one-line error before anything is written.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ModuleTemp, uneven_corpus, write_lines

from domainlm.cli import main as cli_main
from domainlm.config import TrainConfig
from domainlm.errors import UserError
from domainlm.run import trackers
from domainlm.run.metrics import read_events
from domainlm.run.train import train

ALL = [name for name in trackers.TRACKERS if trackers.installed(name)]


def offline_env(root: Path) -> dict[str, str]:
    """No network, and nothing written outside `root` by W&B."""
    return {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(root / "wandb-config"),
        "WANDB_CACHE_DIR": str(root / "wandb-cache"),
        "WANDB_DATA_DIR": str(root / "wandb-data"),
        "DOMAINLM_CACHE": str(root / "cache"),
    }


@pytest.fixture(scope="module")
def logged_run(tiny_model_dir: Path, module_tmp: ModuleTemp) -> Path:
    """One run: 6 steps, a loss line every step, validation at steps 0, 3 and 6."""
    root = module_tmp.mktemp("trackers")
    train_file = write_lines(root / "train.txt", uneven_corpus(40, seed=1))
    valid_file = write_lines(root / "valid.txt", uneven_corpus(8, seed=2))
    config = TrainConfig(
        model=str(tiny_model_dir),
        train_file=str(train_file),
        validation_file=str(valid_file),
        output_dir=str(root / "run"),
        block_size=32,
        batch_size=2,
        max_steps=6,
        save_steps=3,
        logging_steps=1,
        precision="fp32",
        quiet=True,
        report_to=ALL,
    )
    with pytest.MonkeyPatch.context() as patch:
        for name, value in offline_env(root).items():
            patch.setenv(name, value)
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT"):
            patch.delenv(name, raising=False)
        train(config)
    return root / "run"


def expected_series(run: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl -> {tracker name: [(step, value), ...]}, the names as documented."""
    series: dict[str, list[tuple[int, float]]] = {}
    for event in read_events(run / "metrics.jsonl"):
        for key, value in event.items():
            if key == "step" or isinstance(value, str):  # the validation data's fingerprint
                continue
            if "eval_ppl" in event:  # a validation: eval_loss -> eval/loss, epoch -> eval/epoch
                name = "eval/" + (key[len("eval_") :] if key.startswith("eval_") else key)
            else:
                name = "train/" + key
            if math.isfinite(value):  # a NaN loss stays in metrics.jsonl only
                series.setdefault(name, []).append((event["step"], float(value)))
    return series


def settings(run: Path) -> dict[str, Any]:
    return json.loads((run / "run_config.json").read_text())["config"]


def test_expected_series_covers_every_metric(logged_run: Path) -> None:
    """The reference itself: all seven metrics, losses every step, validation at 0, 3, 6."""
    series = expected_series(logged_run)
    assert sorted(series) == [
        "eval/epoch", "eval/loss", "eval/ppl", "eval/tokens",
        "train/epoch", "train/loss", "train/lr", "train/tokens_per_s",
    ]  # fmt: skip
    assert [step for step, _ in series["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [step for step, _ in series["eval/ppl"]] == [0, 3, 6]
    assert settings(logged_run)["report_to"] == ALL


def test_the_whole_sets_score_beside_a_cut_one_has_names_of_its_own() -> None:
    """With --max-eval-tokens the whole set scored before and after training is logged as
    eval/whole_* (README's names), its epoch not a second eval/epoch point at that step."""
    from domainlm.run.trackers import tracker_metrics

    event = {"step": 6, "epoch": 0.5, "eval_whole_loss": 1.25, "eval_whole_ppl": 3.5,
             "eval_whole_tokens": 100}  # fmt: skip
    assert tracker_metrics(event) == {
        "eval/whole_loss": 1.25, "eval/whole_ppl": 3.5, "eval/whole_tokens": 100.0,
    }  # fmt: skip


# ----------------------------------------------------------------------------- TensorBoard


def test_tensorboard_holds_metrics_jsonl_and_the_settings(logged_run: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(logged_run / trackers.TENSORBOARD_DIR))
    events.Reload()
    expected = expected_series(logged_run)
    assert sorted(events.Tags()["scalars"]) == sorted(expected)
    for name, points in expected.items():
        # TensorBoard keeps scalars as float32
        assert [(s.step, s.value) for s in events.Scalars(name)] == [
            (step, float(np.float32(value))) for step, value in points
        ], name
    content = events.PluginTagToContent("hparams")
    info = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]
    ).session_start_info
    stored = {}
    for key, value in info.hparams.items():
        kind = value.WhichOneof("kind")
        stored[key] = value.number_value if kind == "number_value" else value.string_value
    reference = {}
    for key, value in settings(logged_run).items():
        number = isinstance(value, int | float) and not isinstance(value, bool)
        reference[key] = value if number or isinstance(value, str) else json.dumps(value)
    assert stored == reference


# ----------------------------------------------------------------------------- MLflow


def test_mlflow_holds_metrics_jsonl_and_the_settings(
    logged_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it
    client = MlflowClient(tracking_uri=(logged_run / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("domainlm")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == logged_run.name
    assert run.info.status == "FINISHED"
    expected = expected_series(logged_run)
    assert sorted(run.data.metrics) == sorted(expected)
    for name, points in expected.items():
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted((m.step, m.value) for m in history) == points, name
    reference = {
        key: value if isinstance(value, str) else json.dumps(value)
        for key, value in settings(logged_run).items()
    }
    assert run.data.params == reference


# ----------------------------------------------------------------------------- W&B


def wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf Records of a W&B run file: a 7-byte header (":W&B", magic 0xBEE1,
    version 0), then 32 KiB blocks of LevelDB log records (crc32, length, type, data), a
    Record split across blocks as FIRST, MIDDLE..., LAST."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if (checksum, length, kind) == (0, 0, 0):  # zero padding at the end
            break
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == checksum
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL, FIRST / MIDDLE, LAST
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(pending)
            pending = b""


def wandb_history_and_config(run: Path) -> tuple[dict[str, list[tuple[int, float]]], dict]:
    (run_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    series: dict[str, list[tuple[int, float]]] = {}
    config: dict[str, Any] = {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            for name, value in items.items():
                if not name.startswith("_"):  # _step, _runtime, _timestamp: wandb's own
                    series.setdefault(name, []).append((items["_step"], float(value)))
        updates = record.config.update if kind == "config" else []
        updates = record.run.config.update if kind == "run" else updates
        for item in updates:
            config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    config.pop("_wandb", None)
    return series, config


def test_wandb_offline_holds_metrics_jsonl_and_the_settings(logged_run: Path) -> None:
    pytest.importorskip("wandb")
    series, config = wandb_history_and_config(logged_run)
    expected = expected_series(logged_run)
    assert sorted(series) == sorted(expected)
    for name, points in expected.items():
        assert series[name] == points, name
    assert config == settings(logged_run)


# ----------------------------------------------------------------------------- choosing trackers


def test_a_tracker_not_installed_is_one_line_before_anything_is_written(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    train_file = write_lines(tmp_path / "train.txt", uneven_corpus(10))
    out = tmp_path / "out"
    for name in trackers.TRACKERS:
        monkeypatch.setitem(sys.modules, name, None)  # find_spec: not installed
        args = ["train", "--model", str(tiny_model_dir), "--train-file", str(train_file)]
        args += ["--output-dir", str(out), "--report-to", "tensorboard", name]
        assert cli_main(args) == 2
        err = capsys.readouterr().err
        assert err.strip() == (
            f"domainlm: error: --report-to {name}: {name} is not installed "
            f"(pip install 'domainlm[{name}]')"
        )
        assert not out.exists()
        monkeypatch.delitem(sys.modules, name)


def test_a_tracker_that_cannot_start_stops_the_run_before_its_first_step(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    train_file = write_lines(tmp_path / "train.txt", uneven_corpus(10))
    out = tmp_path / "out"
    args = ["train", "--model", str(tiny_model_dir), "--train-file", str(train_file)]
    args += ["--output-dir", str(out), "--block-size", "32", "--report-to", "mlflow"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("domainlm: error:")]
    assert line.startswith("domainlm: error: --report-to mlflow: could not start: ")
    assert "Traceback" not in err
    assert not (out / "metrics.jsonl").exists()  # not even the validation before step 1


def test_wandb_without_an_account_names_its_offline_mode(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """W&B's online mode needs an API key: the one line says how to log without one."""
    pytest.importorskip("wandb")

    def no_key(output_dir: Path, config: dict) -> None:
        raise RuntimeError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(trackers, "open_wandb", no_key)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    train_file = write_lines(tmp_path / "train.txt", uneven_corpus(10))
    args = ["train", "--model", str(tiny_model_dir), "--train-file", str(train_file),
            "--output-dir", str(tmp_path / "out"), "--block-size", "32", "--report-to", "wandb"]  # fmt: skip
    assert cli_main(args) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("domainlm:")]
    assert line.endswith("No API key configured. Use `wandb login` to log in; to log without an "
                         "account or network, set WANDB_MODE=offline")  # fmt: skip


def test_a_tracker_that_cannot_start_leaves_the_folder_as_it_was(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """W&B failing to start (no API key) after making its folder: the run takes back its run
    file and that folder, so a retry with another model or other settings is not refused as
    "another run"; a folder the user made and their file in it stay."""
    pytest.importorskip("wandb")

    def half_made(output_dir: Path, config: dict) -> None:
        (output_dir / "wandb" / "run-1").mkdir(parents=True)
        raise RuntimeError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(trackers, "open_wandb", half_made)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    train_file = write_lines(tmp_path / "train.txt", uneven_corpus(10))
    base = ["train", "--model", str(tiny_model_dir), "--train-file", str(train_file),
            "--max-steps", "1", "--report-to", "none"]  # fmt: skip
    new_dir, users_dir = tmp_path / "new", tmp_path / "users"
    users_dir.mkdir()
    (users_dir / "notes.txt").write_text("mine\n")
    for out, extra in ((new_dir, []), (users_dir, ["--overwrite-output-dir"])):
        args = [*base[:-1], "wandb", "--output-dir", str(out), "--block-size", "32", *extra]
        assert cli_main(args) == 2
        assert "could not start" in capsys.readouterr().err
    assert not new_dir.exists()
    assert sorted(p.name for p in users_dir.iterdir()) == ["notes.txt"]
    # the retry: another block size, no tracker; trains instead of refusing the folder
    args = [*base, "--output-dir", str(new_dir), "--block-size", "16"]
    assert cli_main(args) == 0, capsys.readouterr().err
    assert (new_dir / "model.safetensors").is_file()


def test_unknown_tracker_is_refused_before_anything_is_written(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """From Python (and a --config file), where argparse's choices do not apply."""
    train_file = write_lines(tmp_path / "train.txt", uneven_corpus(10))
    config = TrainConfig(
        model=str(tiny_model_dir),
        train_file=str(train_file),
        output_dir=str(tmp_path / "out"),
        report_to=["nosuchlogger"],
    )
    with pytest.raises(UserError, match="--report-to nosuchlogger: choose from"):
        train(config)
    assert not (tmp_path / "out").exists()


def test_report_to_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="--report-to nosuch: choose from tensorboard, mlflow"):
        trackers.resolve_report_to(["nosuch"])
    with pytest.raises(UserError, match="none cannot be combined with mlflow"):
        trackers.resolve_report_to(["none", "mlflow"])
    with pytest.raises(UserError, match="none cannot be combined with tensorboard, mlflow$"):
        trackers.resolve_report_to(["tensorboard", "none", "mlflow"])  # none anywhere
    assert trackers.resolve_report_to(["none"]) == []
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert trackers.resolve_report_to(None) == []  # the default: TensorBoard if installed
    monkeypatch.delitem(sys.modules, "tensorboard")
    if trackers.installed("tensorboard"):
        assert trackers.resolve_report_to(None) == ["tensorboard"]
    for name in ALL:
        assert trackers.resolve_report_to([name, name]) == [name]


def test_report_to_none_writes_no_tracker_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    train_file = write_lines(tmp_path / "train.txt", uneven_corpus(20))
    out = tmp_path / "out"
    args = ["train", "--model", str(tiny_model_dir), "--train-file", str(train_file)]
    args += ["--output-dir", str(out), "--block-size", "32", "--max-steps", "1", "--quiet"]
    assert cli_main([*args, "--report-to", "none"]) == 0
    names = {p.name for p in out.iterdir()}
    assert not names & {trackers.TENSORBOARD_DIR, trackers.MLRUNS_DIR, trackers.WANDB_DIR}
    assert settings(out)["report_to"] == ["none"]


# ----------------------------------------------------------------------------- two ranks


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_ranks_log_once_from_rank_0(tiny_model_dir: Path, tmp_path: Path) -> None:
    """torchrun --nproc_per_node=2: one MLflow run, one W&B run, one TensorBoard event file,
    each holding metrics.jsonl once (rank 1 logs nothing)."""
    train_file = write_lines(tmp_path / "train.txt", uneven_corpus(40, seed=1))
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", **offline_env(tmp_path))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master-port={free_port()}",
        "-m", "domainlm", "train", "--model", str(tiny_model_dir), "--train-file", str(train_file),
        "--output-dir", str(out), "--block-size", "32", "--batch-size", "2", "--max-steps", "4",
        "--save-steps", "2", "--logging-steps", "1", "--quiet", "--report-to", *ALL,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = expected_series(out)
    if "wandb" in ALL:
        assert len(list((out / "wandb").glob("offline-run-*"))) == 1
        assert wandb_history_and_config(out)[0] == expected
    if "tensorboard" in ALL:
        assert len(list((out / "tensorboard").iterdir())) == 1
    if "mlflow" in ALL:
        from mlflow.tracking import MlflowClient

        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
        (run,) = client.search_runs([client.get_experiment_by_name("domainlm").experiment_id])
        for name, points in expected.items():
            history = client.get_metric_history(run.info.run_id, name)
            assert sorted((m.step, m.value) for m in history) == points, name


# ----------------------------------------------------------------------------- failure and resume


def test_a_failed_run_then_its_resume(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run stopped by bad steps (their NaN losses not sent) ends its MLflow run FAILED;
    resumed, a new MLflow run holds the steps after the checkpoint, and what TensorBoard's reader
    shows equals metrics.jsonl (the first run's steps past the checkpoint dropped: by the
    writer's purge_step, and by the reader itself, which drops steps that come again)."""
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from domainlm.errors import TrainingAborted

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    train_file = write_lines(tmp_path / "train.txt", uneven_corpus(40, seed=1))
    out = tmp_path / "run"
    config = TrainConfig(
        model=str(tiny_model_dir), train_file=str(train_file), output_dir=str(out),
        block_size=32, batch_size=2, max_steps=6, save_steps=2, logging_steps=1,
        precision="fp32", quiet=True, max_bad_steps=2, report_to=["tensorboard", "mlflow"],
    )  # fmt: skip
    monkeypatch.setenv("DOMAINLM_INJECT_NAN_STEPS", "4,5")  # stops after step 5
    with pytest.raises(TrainingAborted):
        train(config)
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    experiment_id = client.get_experiment_by_name("domainlm").experiment_id
    (failed,) = client.search_runs([experiment_id])
    assert failed.info.status == "FAILED"
    monkeypatch.delenv("DOMAINLM_INJECT_NAN_STEPS")
    resumed = train(config).resumed_from  # the newest checkpoint: the bad steps are skipped
    assert resumed is not None
    resumed_step = int(resumed.name.removeprefix("checkpoint-"))
    runs = client.search_runs([experiment_id], order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in runs] == ["FAILED", "FINISHED"]
    expected = expected_series(out)
    for name, points in expected.items():
        history = client.get_metric_history(runs[1].info.run_id, name)
        assert sorted((m.step, m.value) for m in history) == [
            p for p in points if p[0] > resumed_step
        ]
    events = EventAccumulator(str(out / trackers.TENSORBOARD_DIR))
    events.Reload()
    for name, points in expected.items():
        assert [(s.step, s.value) for s in events.Scalars(name)] == [
            (step, float(np.float32(value))) for step, value in points
        ], name
