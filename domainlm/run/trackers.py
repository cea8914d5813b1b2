"""Experiment trackers (`--report-to`): TensorBoard, MLflow and W&B, each optional, all offline.

Every event that goes to metrics.jsonl goes to each tracker at the same step, from rank 0 only
(MetricsLog calls its listeners on rank 0), under one name per metrics.jsonl key:
`train/loss`, `train/lr`, `train/tokens_per_s`, `train/epoch` for a logging event,
`eval/loss`, `eval/ppl`, `eval/tokens`, `eval/epoch` for a validation (`tracker_metrics`).
Non-finite values (a NaN loss) stay in metrics.jsonl only: the trackers disagree on them.
The run's settings (TrainConfig, as in run_config.json) go along as hyperparameters.

- TensorBoard: event files in `<output_dir>/tensorboard/`, the settings in the HPARAMS tab.
- MLflow: `$MLFLOW_TRACKING_URI`, else a file store in `<output_dir>/mlruns/`; experiment
  `$MLFLOW_EXPERIMENT_NAME` or "domainlm"; one run named after the output folder; each
  setting a parameter (its JSON; strings as they are).
- W&B: `wandb.init(dir=<output_dir>)`, so the run files are in `<output_dir>/wandb/`; project
  `$WANDB_PROJECT` or "domainlm". `WANDB_MODE=offline` keeps it off the network (`wandb sync`
  uploads later).

Without --report-to a run writes TensorBoard events when tensorboard is installed, and nothing
else (as before trackers had a module of their own); `--report-to none` writes none. A tracker
that is named and not installed is a one-line error before anything is loaded or written; one
that cannot start (a bad MLFLOW_TRACKING_URI, W&B online without a login) is a one-line error
at the end of set-up, before the first step.
A resumed run opens a new MLflow / W&B run that starts at the resumed step; TensorBoard drops
the events a crashed run wrote after the checkpoint it resumes from (`purge_step`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from domainlm.config import REPORT_TO as REPORT_TO_CHOICES
from domainlm.errors import UserError

NONE = "none"
TRACKERS = tuple(name for name in REPORT_TO_CHOICES if name != NONE)
TENSORBOARD_DIR, MLRUNS_DIR, WANDB_DIR = "tensorboard", "mlruns", "wandb"
EXPERIMENT = "domainlm"  # MLflow experiment and W&B project unless the environment names one


def installed(name: str) -> bool:
    """Whether tracker `name`'s package can be imported (mlflow-skinny provides `mlflow`)."""
    return importlib.util.find_spec(name) is not None


def resolve_report_to(names: Iterable[str] | None) -> list[str]:
    """--report-to -> the trackers of this run, checked before a run loads or writes anything.

    None (the flag not given): ["tensorboard"] when tensorboard is installed, else []. ["none"]:
    []. Otherwise exactly the trackers named, each installed, or a UserError that names the
    extra to install.
    """
    if names is None:
        return ["tensorboard"] if installed("tensorboard") else []
    if isinstance(names, str):  # `report_to: wandb` in a --config file
        names = names.split()
    chosen = list(dict.fromkeys(names))  # in order, once each
    for name in chosen:
        if name not in REPORT_TO_CHOICES:
            raise UserError(f"--report-to {name}: choose from {', '.join(REPORT_TO_CHOICES)}")
    if NONE in chosen:
        if len(chosen) > 1:
            others = ", ".join(name for name in chosen if name != NONE)
            raise UserError(f"--report-to none cannot be combined with {others}")
        return []
    for name in chosen:
        if not installed(name):
            raise UserError(
                f"--report-to {name}: {name} is not installed (pip install 'domainlm[{name}]')"
            )
    return chosen


def tracker_outputs(names: list[str]) -> list[str]:
    """Entries the trackers `names` (resolved) write into the output folder (the run file's
    `written`, which --overwrite-output-dir may remove)."""
    outputs = []
    if "tensorboard" in names:
        outputs.append(TENSORBOARD_DIR)
    if "mlflow" in names and not os.environ.get("MLFLOW_TRACKING_URI"):
        outputs.append(MLRUNS_DIR)
    if "wandb" in names:
        outputs.append(WANDB_DIR)
    return outputs


def tracker_metrics(event: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl event -> {tracker name: value}: every finite value but the step, named
    `train/<key>` for a logging event and `eval/<key without eval_>` for a validation (the
    whole set's score beside a --max-eval-tokens one: eval/whole_loss, whole_ppl, whole_tokens,
    without a second eval/epoch)."""
    kind = "eval" if any(key.startswith("eval_") for key in event) else "train"
    beside = any(key.startswith("eval_whole_") for key in event)  # its step's epoch is logged
    return {
        f"{kind}/{key.removeprefix('eval_')}": float(value)
        for key, value in event.items()
        if key != "step" and not (beside and key == "epoch")
        and isinstance(value, int | float) and math.isfinite(value)
    }  # fmt: skip


def param_text(value: Any) -> str:
    """A setting as an MLflow parameter (strings only): a string as it is, else its JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def hparam_value(value: Any) -> str | int | float:
    """A setting as a TensorBoard hparam: numbers and strings as they are; booleans, None and
    lists as their JSON (torch would store a bool as 1.0 and drop a None)."""
    if isinstance(value, str) or (isinstance(value, int | float) and not isinstance(value, bool)):
        return value
    return json.dumps(value)


class Trackers:
    """Sends metrics.jsonl events and the settings to the trackers `names` (resolved; rank 0).

    `open()` starts each tracker's run (rank 0, at the end of set-up, so a tracker that cannot
    start stops the run before its first step); `close()` ends them (also after an error: then
    the MLflow run is FAILED).
    """

    def __init__(
        self, names: list[str], output_dir: Path, config: dict[str, Any], start_step: int
    ) -> None:
        self.names, self.output_dir = list(names), output_dir
        self.config, self.start_step = config, start_step
        self._tb: Any = None
        self._mlflow: tuple[Any, str] | None = None  # (MlflowClient, run id)
        self._wandb: Any = None
        self._opened = False

    def open(self) -> None:
        """Each tracker's run; one that cannot start (a bad MLFLOW_TRACKING_URI, W&B online
        without a login) is a one-line error naming it."""
        self._opened = True
        for name in self.names:
            try:
                if name == "tensorboard":
                    self._tb = open_tensorboard(self.output_dir, self.config, self.start_step)
                elif name == "mlflow":
                    self._mlflow = open_mlflow(self.output_dir, self.config)
                elif name == "wandb":
                    self._wandb = open_wandb(self.output_dir, self.config)
            except Exception as exc:  # the tracker's own exception types vary
                self.close(failed=True)  # those already started
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                hint = ""
                if name == "wandb" and "WANDB_MODE" not in os.environ:
                    hint = "; to log without an account or network, set WANDB_MODE=offline"
                    reason = reason.rstrip(".")
                raise UserError(f"--report-to {name}: could not start: {reason}{hint}") from exc

    def log(self, event: dict[str, Any]) -> None:
        """One metrics.jsonl event: {step, epoch, loss, lr, tokens_per_s} or {step, epoch,
        eval_loss, eval_ppl, eval_tokens}."""
        if not self.names:
            return
        if not self._opened:
            self.open()
        step, values = int(event["step"]), tracker_metrics(event)
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._mlflow is not None:
            from mlflow.entities import Metric

            client, run_id = self._mlflow
            now = _now_ms()
            metrics = [Metric(key, value, now, step) for key, value in values.items()]
            client.log_batch(run_id, metrics=metrics)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self, failed: bool = False) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._mlflow is not None:
            client, run_id = self._mlflow
            client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")
        if self._wandb is not None:
            self._wandb.finish(exit_code=1 if failed else 0)
        self._tb = self._mlflow = self._wandb = None


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def open_tensorboard(output_dir: Path, config: dict[str, Any], start_step: int) -> Any:
    """A SummaryWriter on <output_dir>/tensorboard with the settings written as hparams."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    # purge_step drops events a crashed run wrote after the checkpoint it resumes from
    writer = SummaryWriter(
        str(output_dir / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None
    )
    if start_step == 0:  # a resumed run's settings are in the events already
        experiment, start, end = hparams({k: hparam_value(v) for k, v in config.items()}, {})
        for summary in (experiment, start, end):
            writer.file_writer.add_summary(summary)
    return writer


def open_mlflow(output_dir: Path, config: dict[str, Any]) -> tuple[Any, str]:
    """A new MLflow run (client, run id) with every setting as a parameter."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = (output_dir / MLRUNS_DIR).resolve().as_uri()
        # MLflow 3 refuses file stores unless asked (a database needs SQLAlchemy, which
        # mlflow-skinny leaves out); an explicit MLFLOW_ALLOW_FILE_STORE=false still wins.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=uri)
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    run = client.create_run(experiment_id, run_name=output_dir.resolve().name)
    params = [Param(k, param_text(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in config.items()]
    client.log_batch(run.info.run_id, params=params)
    return client, run.info.run_id


def open_wandb(output_dir: Path, config: dict[str, Any]) -> Any:
    """A new W&B run in <output_dir>/wandb/ with the settings as its config."""
    import wandb

    return wandb.init(
        project=os.environ.get("WANDB_PROJECT") or EXPERIMENT,
        name=output_dir.resolve().name,
        config=config,
        dir=str(output_dir),
    )
