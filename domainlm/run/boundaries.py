"""What happens at a step boundary, one object per concern, each owning its state.

- `Progress`: the loss window (NLL and tokens since the last logged step, and its tokens/s),
  metrics.jsonl and the progress bar. The window is saved in checkpoints for an exact resume.
- `Evaluation`: validation perplexity before training, at --eval-steps and at the end; the last
  result goes with the checkpoint of its step (which the best checkpoint is chosen by).
- `EarlyStopping`: --early-stopping-patience, from the evaluations so far (metrics.jsonl's on
  resume: the decision is the same as without the interruption).
- `Checkpoints`: checkpoint-<step> at --save-steps and at the final step, rotated.
- `Sampling`: samples from --sample-prompts (text.generate.TrainingSampler).
- `StopGuard`: a SIGINT/SIGTERM stops the run after the step, with a checkpoint.
The bad-step and out-of-memory guards belong to the step itself (step.py).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from domainlm.evaluation.windows import NLLSum, stream_nll
from domainlm.model.device import peak_gpu_memory_gib
from domainlm.model.distributed import all_reduce_sum
from domainlm.run import guard, preempt
from domainlm.run.checkpoint import (
    CHECKPOINT_PREFIX,
    CheckpointInfo,
    record_written,
    rotate_checkpoints,
    save_checkpoint,
)
from domainlm.run.diskspace import checkpoint_write, estimate_checkpoint
from domainlm.run.metrics import scored
from domainlm.run.state import Run
from domainlm.run.step import StepOutcome


class Progress:
    """The loss window, metrics.jsonl's training events and the progress bar.

    The window holds the NLL sum (this rank's) and target tokens (all ranks') since the last
    logged step. A resumed run reopens the checkpoint's window, so its next logged loss covers the
    same steps as without the interruption (rank 0 holds the all-ranks sum). Its tokens/s counts
    training time only: time spent `paused()` (evaluation, saving, sampling) is left out.
    """

    def __init__(self, run: Run) -> None:
        self.run = run
        self.bar = run.console.progress(run.total_steps, run.start_step)
        self.nll = torch.zeros((), dtype=torch.float64, device=run.device)
        self.tokens, self.start, self.tokens_seen = 0, time.perf_counter(), 0
        self.process_start = self.start
        self.paused_at: float | None = None
        resumed = run.resumed_window
        if resumed:
            self.nll += float(resumed["nll"]) if run.ctx.is_main else 0.0
            self.tokens = int(resumed["tokens"])
            self.start -= float(resumed["seconds"])  # tokens/s over the whole window

    def after_step(self, step: StepOutcome) -> None:
        """Add a good step to the window; log and reset it every --logging-steps and at the end."""
        if step.good:  # a skipped step's loss is not in the logged loss (its tokens are seen)
            self.nll += step.nll
            self.tokens += step.targets
        self.tokens_seen += step.targets
        if step.done % self.run.config.logging_steps == 0 or step.final:
            self.log(step)
        else:
            self.run.console.advance(self.bar, step.done)

    def end_early(self, step: StepOutcome) -> None:
        """The run ends at this step (early stopping): log its window unless `after_step` did."""
        if step.done % self.run.config.logging_steps:
            self.log(step)

    def log(self, step: StepOutcome) -> None:
        run = self.run
        (nll_sum,) = all_reduce_sum([float(self.nll)], run.ctx, run.device)
        elapsed = time.perf_counter() - self.start
        # input tokens per second over all ranks, padding excluded
        speed = self.tokens / elapsed if elapsed > 0 else 0.0
        # NaN when every step of the window was skipped as bad (guard.BadStepGuard)
        loss = nll_sum / self.tokens if self.tokens else float("nan")
        memory = peak_gpu_memory_gib(run.device)
        run.metrics.log_train(step.done, step.epoch, loss, step.lr, speed, memory)
        run.console.step(self.bar, step.done, loss, step.lr, speed)
        self.nll.zero_()
        self.tokens, self.start = 0, time.perf_counter()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time inside is not training time: the window's clock stops."""
        self.paused_at = time.perf_counter()
        yield
        self.start += time.perf_counter() - self.paused_at
        self.paused_at = None

    def window(self) -> tuple[torch.Tensor, int, float]:
        """The open window as a checkpoint saves it: NLL, target tokens, training seconds."""
        now = self.paused_at if self.paused_at is not None else time.perf_counter()
        return self.nll, self.tokens, now - self.start

    def totals(self) -> dict[str, float]:
        """Training tokens (all ranks, padding excluded) and seconds of the whole run so far:
        what the checkpoint it resumed from counted, plus this process's."""
        before = self.run.resumed_totals
        return {
            "tokens": int(before.get("tokens", 0)) + self.tokens_seen,
            "seconds": float(before.get("seconds", 0.0)) + time.perf_counter() - self.process_start,
        }

    def close(self) -> None:
        self.run.console.close(self.bar)


class Evaluation:
    """Validation perplexity: before training, every --eval-steps and at the last step, over at
    most --max-eval-tokens tokens (the same tokens each time: the figures checkpoints, the best
    checkpoint, early stopping and the curve compare); with --max-eval-tokens the whole
    validation set is scored as well before training and at the end, for the run's result. The
    evaluation batch is halved for good after an out-of-memory error."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.batch_size = run.config.eval_batch_size or run.config.batch_size
        self.limit = run.config.max_eval_tokens  # None: every evaluation is the whole set's
        data = run.metrics.validation  # a resumed run's step 0, if it scored today's data
        at_start = [e for e in run.metrics.events if e.get("step") == 0 and scored(e, data)]
        counts = {e.get("eval_tokens", e.get("eval_whole_tokens")) for e in at_start}
        (count,) = counts if len(counts) == 1 else (None,)
        # cut and whole alike at step 0, and today's cut at least as large: it holds every token
        if len(at_start) == 2 and None not in (self.limit, count) and self.limit >= count:
            self.limit = None
        self.last: tuple[int, NLLSum] | None = None  # (step, result) of the latest evaluation
        self.early = EarlyStopping(run.config.early_stopping_patience, run.metrics.events)

    def __call__(self, limit: int | None) -> NLLSum:
        """The validation NLL over at most `limit` tokens (None: all)."""
        run, data = self.run, self.run.data
        with eager_evaluation(run.config.compile):
            result, self.batch_size = guard.eval_with_oom_backoff(
                lambda batch_size: stream_nll(
                    run.net.loss_module,
                    data.valid_stream.tokens,
                    block_size=data.block_size,
                    stride=data.eval_stride,
                    batch_size=batch_size,
                    device=run.device,
                    precision=run.precision,
                    ctx=run.ctx,
                    max_tokens=limit,
                    unscored=data.valid_stream.unscored_positions(),
                ),
                self.batch_size,
                run.console.warn,
            )
        return result

    def initial(self) -> NLLSum | None:
        """The whole set's perplexity before training (step 0); None for a resumed run (it has
        it logged)."""
        if self.run.start_step != 0:
            return None
        compared = self(self.limit)
        self.log(0, 0.0, compared)
        whole = compared if self.limit is None else self.whole(0, 0.0)
        if whole.tokens == compared.tokens:  # the cut holds every token: no second score later
            self.limit = None
        cut = "" if self.limit is None else (
            f"; {compared.perplexity:.3f} on the {compared.tokens:,} scored at each evaluation"
        )  # fmt: skip
        self.run.console.info(
            f"validation perplexity before training: {whole.perplexity:.3f} "
            f"({whole.tokens:,} tokens{cut})"
        )
        return whole

    def whole(self, done: int, epoch: float) -> NLLSum:
        """The whole validation set scored, logged beside the --max-eval-tokens figure of the
        same step (metrics.jsonl's eval_whole_* keys: not a point of the compared series)."""
        result = self(None)
        self.run.metrics.log_whole_eval(done, epoch, result)
        return result

    def after_step(self, step: StepOutcome) -> None:
        if step.done % self.run.config.eval_steps == 0 or step.final:
            result = self(self.limit)
            self.log(step.done, step.epoch, result)
            self.run.console.info(
                f"step {step.done}: validation perplexity {result.perplexity:.3f}"
            )
            self.last = (step.done, result)

    def log(self, done: int, epoch: float, result: NLLSum) -> None:
        self.run.metrics.log_eval(done, epoch, result)
        self.early.observe(done, result.perplexity, self.run.metrics.validation)

    def stopped_at_start(self) -> bool:
        """A resumed run whose patience ran out at the step it resumes from (its last evaluation):
        it had stopped early there, as one never interrupted would have, whatever the steps
        left; it ends there again (an edited validation file is scored again, no step trained).
        A larger --early-stopping-patience trains on."""
        start = self.run.start_step
        return start > 0 and self.early.spent() and self.early.seen == start

    def stops_run(self, step: StepOutcome) -> bool:
        """Whether --early-stopping-patience ends the run at this step, decided after an
        evaluation only."""
        evaluated = self.last is not None and self.last[0] == step.done
        if step.final or not evaluated or not self.early.spent():
            return False
        best_step, best = self.early.best  # type: ignore[misc]
        self.run.console.info(
            f"step {step.done}: stopping early: {self.early.patience} evaluations in a row "
            f"without a validation perplexity below {best:.3f} (step {best_step})"
        )
        return True

    def perplexity_at(self, done: int) -> float | None:
        """The perplexity evaluated at step `done`, if there was an evaluation then."""
        return self.last[1].perplexity if self.last and self.last[0] == done else None

    def final(self, done: int) -> NLLSum:
        """The whole validation set's score at the run's last step `done`: that step's own
        evaluation without --max-eval-tokens; with it, or with nothing left to train, scored
        now."""
        run = self.run
        if self.limit is None and self.last is not None and self.last[0] == done:
            return self.last[1]
        epoch = run.cursor.epoch_float(run.data.dataset)
        if self.limit is not None:
            return self.whole(done, epoch)
        final = self(None)
        data = run.metrics.validation  # a finished run scored again on other data is logged
        if not any(
            "eval_ppl" in e and e["step"] == done and scored(e, data) for e in run.metrics.events
        ):
            run.metrics.log_eval(done, epoch, final)
        return final


class EarlyStopping:
    """--early-stopping-patience N: the run is over once N evaluations in a row have scored no
    lower validation perplexity than the best before them (the one before training included).
    Read from the evaluations logged so far, so a resumed run (its metrics.jsonl cut at the
    checkpoint's step) decides at the same step as one never interrupted."""

    def __init__(self, patience: int | None, events: list[dict[str, Any]]) -> None:
        self.patience = patience or 0
        self.best: tuple[int, float] | None = None  # (step, perplexity)
        self.without_gain = 0  # evaluations since the best
        self.seen = -1  # the last step observed: an evaluation logged twice counts once
        self.validation: str | None = None  # the data the evaluations so far scored
        for event in events:
            if "eval_ppl" in event:
                scored_on = event.get("validation")
                self.observe(int(event["step"]), float(event["eval_ppl"]), scored_on)

    def observe(self, step: int, perplexity: float, validation: str | None = None) -> None:
        """One evaluation's figure. On other validation data than the ones before (a resumed
        run's edited file), the count starts again from it: figures of two data sets are not
        compared."""
        if step <= self.seen:
            return
        self.seen = step
        if validation is not None and self.validation not in (None, validation):
            self.best, self.without_gain = None, 0
        self.validation = validation or self.validation
        if self.best is None or perplexity < self.best[1]:
            self.best, self.without_gain = (step, perplexity), 0
        else:
            self.without_gain += 1

    def spent(self) -> bool:
        return self.patience > 0 and self.without_gain >= self.patience


def eager_evaluation(compiled: bool) -> Any:
    """Evaluation runs the compiled model eagerly: compiling the no-grad graph and each window
    shape costs more than the few evaluation passes of a run gain from it."""
    if compiled and hasattr(torch.compiler, "set_stance"):  # torch >= 2.6
        return torch.compiler.set_stance("force_eager")
    return nullcontext()


class Checkpoints:
    """checkpoint-<step> every --save-steps and at the final step (so a finished run can be
    extended with --max-steps), with the evaluation of that step and the open loss window.
    With --async-save, `writer` writes them in the background (run/async_save.py)."""

    def __init__(
        self, run: Run, progress: Progress, evaluation: Evaluation, writer: Any = None
    ) -> None:
        self.run, self.progress, self.evaluation = run, progress, evaluation
        self.writer = writer  # async_save.BackgroundWriter, or None: synchronous saves
        self.last_saved: Path | None = run.data.resume_from
        self.last_stall = 0.0  # how long the last save held up the step loop

    def after_step(self, step: StepOutcome) -> None:
        if self.writer is not None:
            self.writer.poll()  # a background save that failed stops the run here
        if step.done % self.run.config.save_steps == 0 or step.final:
            self.save(step.done, self.evaluation.perplexity_at(step.done))
            self.last_saved = self.run.output_dir / f"checkpoint-{step.done}"

    @property
    def last_seconds(self) -> float:
        """How long the last save took to publication (preempt.py's budget uses it): with
        --async-save the stall (the host copy) plus the last finished background write."""
        write = self.writer.last_write_seconds if self.writer is not None else 0.0
        return self.last_stall + write

    def save(self, done: int, perplexity: float | None) -> None:
        start = time.perf_counter()
        save_training_checkpoint(
            self.run, done, perplexity, self.progress.window(), self.writer, self.progress.totals()
        )
        self.last_stall = time.perf_counter() - start

    def save_unless_saved(self, done: int) -> None:
        """Save step `done` unless this step's checkpoint was just written (a stop's save)."""
        if self.last_saved != self.run.output_dir / f"checkpoint-{done}":
            self.save(done, None)

    def wait(self) -> None:
        """Until a background save in flight is published (its error raised here)."""
        if self.writer is not None:
            self.writer.wait()


def save_training_checkpoint(
    run: Run,
    step: int,
    eval_perplexity: float | None,
    window: tuple[torch.Tensor, int, float],
    writer: Any = None,
    totals: dict[str, float] | None = None,
) -> CheckpointInfo | None:
    """Write checkpoint-<step> on rank 0 (sharded: every rank its shards), then rotate; other
    ranks wait at a barrier. With `writer` (--async-save), rank 0 hands a host copy to it.

    Every rank calls this. `window` is the open loss window (this rank's NLL sum, the target
    tokens, the training seconds so far); its NLL is summed over the ranks and saved with them.
    """
    from domainlm.model.distributed import barrier, full_state_dicts
    from domainlm.run.async_save import save_in_background
    from domainlm.run.sharded import SHARDED, checkpoint_format, save_sharded_checkpoint

    ctx, net, output_dir = run.ctx, run.net, run.output_dir
    window_nll, window_tokens, window_seconds = window
    (nll_sum,) = all_reduce_sum([float(window_nll)], ctx, window_nll.device)
    state = {
        "step": step,
        "epoch": run.cursor.epoch,
        "offset": run.cursor.offset,
        "scaler": net.scaler.state_dict() if net.scaler.is_enabled() else None,
        "world_size": ctx.world_size,
        "loss_window": {"nll": nll_sum, "tokens": window_tokens, "seconds": window_seconds},
        "totals": totals or {},  # the run's training tokens and seconds up to this step
        "total_steps": run.total_steps,  # what the learning-rate schedule spanned
    }
    if checkpoint_format(run.config.checkpoint_format, net.model) == SHARDED:
        save_sharded_checkpoint(run, step, state, eval_perplexity)  # synchronous (see train.py)
        return None
    model_state, optim_state = full_state_dicts(net.model, net.optimizer, ctx)
    if ctx.is_main:
        # Owned before it exists: --overwrite-output-dir removes it even if this save is cut short.
        record_written(output_dir, f"{CHECKPOINT_PREFIX}{step}")
        state["optimizer"] = optim_state
        tokenizer = run.data.loaded.tokenizer
        if writer is not None:  # the thread guards its write as below (async_save.py)
            save_in_background(writer, run, step, state, eval_perplexity, model_state)
        else:
            size = lambda: estimate_checkpoint(net.model, tokenizer).total  # noqa: E731
            with checkpoint_write(output_dir, step, size):  # a full disk: exit 4, partial gone
                data = run.metrics.validation
                save_checkpoint(
                    output_dir, step, net.model, tokenizer, state, eval_perplexity, model_state,
                    data,
                )  # fmt: skip
                rotate_checkpoints(output_dir, run.config.save_total_limit, run.console.warn, data)
    barrier(ctx)
    return None


class Sampling:
    """Samples from --sample-prompts every N steps (rank 0; RNG forked, model back in train mode)."""

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler  # text.generate.TrainingSampler, or None without prompts

    def after_step(self, step: StepOutcome) -> None:
        if self.sampler is not None:
            self.sampler.maybe_sample(step.done, step.final)


class StopGuard:
    """The first SIGINT/SIGTERM asks the run to stop: after the step (all ranks agree), the step
    is saved unless it just was, and the run ends with TrainingAborted (exit 130/143). After a
    SIGTERM a save that would not fit in --preempt-grace is not started (preempt.py)."""

    def __init__(self, run: Run, cleanup: ExitStack, checkpoints: Checkpoints, progress: Progress):
        self.run, self.checkpoints, self.progress = run, checkpoints, progress
        self.plan = preempt.PreemptPlan.measure(run)  # says at start if a save will not fit
        self.signals = cleanup.enter_context(guard.StopSignals(self.announce))
        self.finishing = False  # the steps are over: the final model is being written

    def announce(self, signum: int) -> None:
        """What the run does on this signal: save after the step, or (a SIGTERM whose save would
        not fit in --preempt-grace) keep its last checkpoint and write preempted.json."""
        name = signal.Signals(signum).name
        if self.finishing:  # nothing to stop: the run ends as it would have
            self.run.console.info(
                f"{name} received: the steps are done; the run ends once its final model is "
                "written (send it again to stop at once)"
            )
            return
        plan = self.plan.after_a_save(self.checkpoints.last_seconds)
        if signum == signal.SIGTERM and not plan.fits(0.0):
            then = (
                f"; a save would not fit in --preempt-grace {plan.grace:g} s: keeping the last "
                f"checkpoint and writing {preempt.PREEMPTED_FILE} instead"
            )
        else:
            then = " and saving a checkpoint"
        self.run.console.info(
            f"{name} received: finishing this step{then} (send it again to stop at once)"
        )

    def after_step(self, step: StepOutcome) -> None:
        run = self.run
        if step.final or not guard.stop_agreed(self.signals, run.ctx, run.device):
            return
        saved = self.checkpoints.last_saved == run.output_dir / f"{CHECKPOINT_PREFIX}{step.done}"
        plan = self.plan.after_a_save(self.checkpoints.last_seconds)
        if not saved and not preempt.full_save_agreed(plan, self.signals, run.ctx, run.device):
            self.progress.close()
            last = self.checkpoints.last_saved
            raise preempt.fallback_stop(run, plan, self.signals, step.done, last)
        self.checkpoints.save_unless_saved(step.done)
        self.checkpoints.wait()  # a background save is published before the run exits
        self.progress.close()
        raise guard.stopped_by_signal(self.signals, step.done, run.output_dir)
