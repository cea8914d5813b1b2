"""What the user sees and what is logged: console messages, the progress bar, metrics.jsonl."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from domainlm.errors import say_line
from domainlm.evaluation.windows import NLLSum


class MetricsLog:
    """`metrics.jsonl`: one JSON object per logging or eval event (rank 0 only).

    On resume, events after the resumed step (written after the checkpoint) are dropped first,
    so the file continues with no duplicated or missing steps.
    """

    def __init__(
        self, path: Path, enabled: bool = True, resume_step: int = 0, validation: str | None = None
    ) -> None:
        self.path = path
        self.enabled = enabled
        # The validation data's fingerprint (data/tokens.py: stream_fingerprint), in every
        # evaluation's event: a resumed run scored on other data compares with none before it.
        self.validation = validation
        self.events: list[dict[str, Any]] = []
        # called with every event on rank 0: TensorBoard / MLflow / W&B (report.EventLoggers)
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        if not enabled:
            return
        if resume_step > 0 and path.is_file():
            kept = [e for e in read_events(path) if e.get("step", 0) <= resume_step]
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(json.dumps(e) + "\n" for e in kept))
            os.replace(tmp, path)
            self.events = kept
        elif resume_step == 0 and path.exists():
            path.unlink()

    def _write(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(event) + "\n")
            for listener in self.listeners:
                listener(event)

    def log_train(
        self,
        step: int,
        epoch: float,
        loss: float,
        lr: float,
        tokens_per_s: float,
        peak_gpu_memory_gib: float | None = None,
    ) -> None:
        event = {
            "step": step,
            "epoch": round(epoch, 4),
            "loss": loss,
            "lr": lr,
            "tokens_per_s": round(tokens_per_s, 1),
        }
        if peak_gpu_memory_gib is not None:  # on a GPU: this rank's peak of live tensors so far
            event["peak_gpu_memory_gib"] = round(peak_gpu_memory_gib, 3)
        self._write(event)

    def log_eval(self, step: int, epoch: float, result: NLLSum) -> None:
        self._write(
            {
                "step": step,
                "epoch": round(epoch, 4),
                "eval_loss": result.nll,
                "eval_ppl": result.perplexity,
                "eval_tokens": result.tokens,
                **self.scored_on(),
            }
        )

    def log_whole_eval(self, step: int, epoch: float, result: NLLSum) -> None:
        """The whole validation set's score where --max-eval-tokens cut the step's evaluation
        (before training and at the end): keys of their own, never a point of eval_ppl's series."""
        self._write(
            {
                "step": step,
                "epoch": round(epoch, 4),
                "eval_whole_loss": result.nll,
                "eval_whole_ppl": result.perplexity,
                "eval_whole_tokens": result.tokens,
                **self.scored_on(),
            }
        )

    def scored_on(self) -> dict[str, str]:
        return {"validation": self.validation} if self.validation else {}

    def initial_perplexity(self) -> float | None:
        """The whole validation set's perplexity before training (the step-0 evaluation's, or
        its eval_whole_ppl where --max-eval-tokens cut it), when it scored today's validation
        data."""
        return initial_perplexity(self.events, self.validation)


def scored(event: dict[str, Any], validation: str | None) -> bool:
    """Whether the evaluation `event` scored the validation data of fingerprint `validation`
    (None: any data; an event from before evaluations recorded theirs: assumed so)."""
    return validation is None or event.get("validation", validation) == validation


def initial_perplexity(events: list[dict[str, Any]], validation: str | None = None) -> float | None:
    """The whole validation set's perplexity at step 0 in metrics.jsonl's `events`, if logged;
    with `validation` (a fingerprint), only where the step-0 evaluation scored that data."""
    at_start = [e for e in events if e.get("step") == 0 and scored(e, validation)]
    for key in ("eval_whole_ppl", "eval_ppl"):
        for event in at_start:
            if key in event:
                return event[key]
    return None


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events of a metrics.jsonl, up to a line cut short by a crash."""
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            break  # a line cut by a crash ends the usable log
    return events


class Console:
    """Messages and the progress bar, printed by rank 0 only."""

    def __init__(self, enabled: bool = True, quiet: bool = False) -> None:
        self.enabled = enabled
        self.quiet = quiet
        self._bar: Any = None

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(f"{message}\n", file=sys.stderr, end="")  # one write: see say_line
        else:
            say_line(message)

    def warn(self, message: str) -> None:
        self.info(f"warning: {message}")

    def progress(self, total: int, initial: int) -> Any:
        if not self.enabled or self.quiet:
            return None
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=total,
            initial=initial,
            unit="step",
            dynamic_ncols=True,
            desc="training",
            file=sys.stderr,
        )
        return self._bar

    def step(self, bar: Any, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        if bar is None:
            self.info(f"step {step}: loss {loss:.4f}, lr {lr:.3g}, {tokens_per_s:,.0f} tokens/s")
            return
        bar.set_postfix(
            loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False
        )
        bar.update(step - bar.n)

    def advance(self, bar: Any, step: int) -> None:
        if bar is not None:
            bar.update(step - bar.n)

    def close(self, bar: Any) -> None:
        if bar is not None:
            bar.close()
        self._bar = None

    def summary(self, result: Any, saved_now: bool = True) -> None:
        """The run's outcome; `saved_now` False: a finished run's, its model saved before."""
        before = result.initial_perplexity
        after = result.final_perplexity
        lines = [
            f"model saved to {result.output_dir}"
            if saved_now
            else f"model in {result.output_dir}, as the earlier run saved it"
        ]
        if after is not None:
            change = f"{before:.3f} -> {after:.3f}" if before is not None else f"{after:.3f}"
            lines.append(f"validation perplexity {change} ({result.eval_tokens:,} tokens)")
        model_step = getattr(result, "model_step", None)
        if getattr(result, "stopped_early", False):
            whose = (
                f"checkpoint-{model_step}'s"
                if model_step is not None
                else "that step's; the best checkpoint holds the lowest validation perplexity"
            )
            lines.append(
                f"stopped early at step {result.steps} (--early-stopping-patience): the model "
                f"saved is {whose}"
            )
        elif model_step is not None:
            lines.append(f"the model saved is checkpoint-{model_step}'s (--load-best-model-at-end)")
        if result.best_checkpoint is not None:
            lines.append(f"best checkpoint: {result.best_checkpoint}")
        for line in lines:
            self.info(line)
