"""Keeping a run alive and honest: graceful stop on signals, NaN/Inf steps, out-of-memory back-off.

- `StopSignals`: the first SIGINT/SIGTERM asks the loop to stop after the current step (it saves a
  checkpoint and exits 130/143); a second one stops at once (KeyboardInterrupt).
- `BadStepGuard`: a step whose loss or gradient norm is NaN/Inf is skipped (no optimizer update)
  and counted; after `max_bad_steps` consecutive bad steps the run stops.
- `with_oom_backoff` / `eval_with_oom_backoff`: on `torch.OutOfMemoryError` the micro-batch is
  halved and the accumulation doubled (same global batch, same blocks, same loss normalisation),
  the RNG restored and the step retried. Under torchrun the ranks agree (`agree_on_oom`): an
  error on one rank makes every rank back off together, so no rank waits alone in a collective.

Fault injection (for tests; documented in docs/reliability.md; the OOM ones live in
model/faults.py, which the loss calls), read from the environment:
- `DOMAINLM_INJECT_NAN_STEPS=3,4`: the loss of those steps (1-based, as in metrics.jsonl) is NaN.
- `DOMAINLM_INJECT_OOM_ABOVE=N`: any forward pass on more than N rows raises OutOfMemoryError.
- `DOMAINLM_INJECT_OOM_AFTER_BACKWARD=N`: a training micro-batch of more than N rows raises
  OutOfMemoryError after its forward and backward passes (its dropout masks are drawn and its
  gradient accumulated, as when memory runs out late in a step).
- `DOMAINLM_INJECT_OOM_RANK=R`: the two OOM injections above fire on rank R only (torchrun).
- `DOMAINLM_INJECT_STEP_DELAY=S`: sleep S seconds after every optimizer step (slows a run down
  so that tests can signal or kill it at a chosen moment).
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import torch

from domainlm.errors import TrainingAborted

T = TypeVar("T")

NAN_STEPS_ENV = "DOMAINLM_INJECT_NAN_STEPS"
STEP_DELAY_ENV = "DOMAINLM_INJECT_STEP_DELAY"

# Exit codes: 128 + signal number for a signal stop (the shell convention), 3 for numerical faults.
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
BAD_STEPS_EXIT = 3


# ----------------------------------------------------------------------------- signals


class StopSignals:
    """Context manager turning SIGINT/SIGTERM into a stop request checked between steps;
    `announce(signum)` says what the run will do (StopGuard: save, or preempted.json)."""

    def __init__(self, announce: Callable[[int], None] | None = None) -> None:
        self.signum: int | None = None
        self.received_at: float | None = None  # time.monotonic() of the first signal
        self._announce = announce
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # the second signal: stop now, whatever we are doing
            raise KeyboardInterrupt
        self.signum, self.received_at = signum, time.monotonic()
        if self._announce is not None:
            self._announce(signum)

    def __enter__(self) -> StopSignals:
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in SIGNAL_EXIT:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def exit_code(self) -> int:
        return SIGNAL_EXIT.get(signal.Signals(self.signum), 1) if self.signum else 1


class SetUpSignals:
    """Until the step loop's StopSignals take over (StopGuard): SIGTERM stops the set-up as Ctrl-C
    does, by an exception that unwinds (the run lock released, exit 143, one line), not by
    SIGTERM's default action, which ends the process with no clean-up and no word."""

    def __init__(self) -> None:
        self._previous: Any = None
        self._installed = False

    @staticmethod
    def _handle(signum: int, frame: FrameType | None) -> None:
        raise TrainingAborted(
            f"{signal.Signals(signum).name}: stopped during set-up, before this command trained a "
            f"step; nothing new to save. To start it again, run {resume_command(continues=False)}",
            exit_code=SIGNAL_EXIT[signal.SIGTERM],
        )

    def __enter__(self) -> SetUpSignals:
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)
            self._installed = False


def stop_agreed(stop: StopSignals, ctx: Any, device: torch.device) -> bool:
    """True when a stop was requested on any rank (all ranks then stop after the same step)."""
    if not ctx.enabled:
        return stop.requested
    from domainlm.model.distributed import all_reduce_sum

    (count,) = all_reduce_sum([float(stop.requested)], ctx, device)
    return count > 0


# Flags that would not continue a stopped run from its newest checkpoint in --output-dir:
# --overwrite-output-dir removes the run; --resume never refuses it, and --resume PATH names the
# checkpoint the run began from, not the one it stopped at (auto, the default, finds that).
OVERWRITE_FLAGS = ("--overwrite-output-dir", "--overwrite_output_dir")
RESUME_FLAG = "--resume"
CONFIG_FLAG = "--config"


@dataclass
class RunFlags:
    """What this process's run resolved --overwrite-output-dir and --resume to (command line and
    --config file together), noted at the start of `train` for the stop messages' command."""

    overwrite: bool = False
    resume: str = "auto"


RUN_FLAGS = RunFlags()


def note_run_flags(overwrite: bool, resume: str) -> None:
    RUN_FLAGS.overwrite, RUN_FLAGS.resume = overwrite, resume


def continuing_args(args: list[str], flags: RunFlags) -> tuple[list[str], list[str], list[str]]:
    """(`args` less the flags that would not continue the run, those left out, those added):
    OVERWRITE_FLAGS and --resume with its value left out; where the run's own settings (`flags`)
    overwrite or name a checkpoint from a --config file, `--no-overwrite-output-dir` and
    `--resume auto` added after it, which the command line's last word wins over."""
    kept: list[str] = []
    dropped: list[str] = []
    value_next = False
    for arg in args:
        if value_next:
            dropped[-1] += f" {arg}"
            value_next = False
        elif arg == RESUME_FLAG:
            dropped.append(arg)
            value_next = True
        elif arg in OVERWRITE_FLAGS or arg.startswith(RESUME_FLAG + "="):
            dropped.append(arg)
        else:
            kept.append(arg)
    from_file = any(arg == CONFIG_FLAG or arg.startswith(CONFIG_FLAG + "=") for arg in args)
    typed_overwrite = any(arg in OVERWRITE_FLAGS for arg in args)
    typed_resume = any(arg.startswith(RESUME_FLAG) for arg in dropped)
    added = []
    if flags.overwrite and (from_file or not typed_overwrite):
        added.append("--no-overwrite-output-dir")
    if flags.resume != "auto" and (from_file or not typed_resume):
        added += [RESUME_FLAG, "auto"]
    return kept + added, dropped, added


def resume_command(continues: bool = True) -> str:
    """The command line of this process, to print as the way to resume: as the user can type it
    (the interpreter's path where `python` on PATH is another one); under torchrun, whose command
    line a rank cannot see, "the same torchrun command again" (with what to change). `continues`:
    the run stopped with a checkpoint in --output-dir to continue from, and the command is the
    one that continues it (`continuing_args`, by the run's RUN_FLAGS); else the command as it was."""
    import shlex
    import shutil
    import sys

    args, dropped, added = (
        continuing_args(sys.argv[1:], RUN_FLAGS) if continues else (sys.argv[1:], [], [])
    )
    launched = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("WORLD_SIZE")
    if launched:  # torchrun's workers (TORCHELASTIC_RUN_ID) or another launcher's ranks
        launcher = "torchrun" if os.environ.get("TORCHELASTIC_RUN_ID") else "launch"
        changes = ([f"without {', '.join(dropped)}"] if dropped else []) + (
            [f"with {' '.join(added)}"] if added else []
        )
        return f"the same {launcher} command again" + "".join(f" {c}" for c in changes)
    name = Path(sys.argv[0]).name if sys.argv else ""
    if name == "domainlm":
        found = shutil.which("domainlm")  # paths compared unresolved: a venv's python is a
        same = found is not None and os.path.abspath(found) == os.path.abspath(sys.argv[0])
        program = "domainlm" if same else shlex.quote(sys.argv[0])
    elif name == "__main__.py":
        found = shutil.which("python")  # link to the system's, yet another environment
        same = found is not None and os.path.abspath(found) == os.path.abspath(sys.executable)
        program = f"{'python' if same else shlex.quote(sys.executable)} -m domainlm"
    else:
        return "the same command again"
    return f"{program} {shlex.join(args)}"


def stopped_by_signal(stop: StopSignals, step: int, output_dir: Path) -> TrainingAborted:
    name = signal.Signals(stop.signum).name if stop.signum else "a signal"
    return TrainingAborted(
        f"{name}: stopped after step {step}, saved {output_dir / f'checkpoint-{step}'}. "
        f"To resume, run {resume_command()} (it continues from the newest checkpoint)",
        exit_code=stop.exit_code(),
    )


# ----------------------------------------------------------------------------- numerical faults


def injected_nan_steps() -> set[int]:
    raw = os.environ.get(NAN_STEPS_ENV, "")
    return {int(part) for part in raw.split(",") if part.strip()}


def inject_nan(
    model: torch.nn.Module, step_nll: torch.Tensor, step: int, steps: set[int]
) -> torch.Tensor:
    """Fault injection: on the listed steps the loss and every gradient become NaN."""
    if step not in steps:
        return step_nll
    for param in model.parameters():
        if param.grad is not None:
            param.grad.fill_(float("nan"))
    return step_nll * float("nan")


def grad_norm(parameters: list[torch.nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of the gradients (what clipping uses), without changing them."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads])
    )


@dataclass
class BadStepGuard:
    """Counts consecutive NaN/Inf steps; raises TrainingAborted after `max_bad_steps` of them."""

    max_bad_steps: int
    consecutive: int = 0
    total: int = 0

    def check(self, step: int, loss: float, norm: float, last_checkpoint: str | None) -> bool:
        """True if the step is good. A bad step is counted; too many in a row stop the run."""
        if math.isfinite(loss) and math.isfinite(norm):
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.max_bad_steps:
            where = (
                f"the last good checkpoint is {last_checkpoint}"
                if last_checkpoint
                else "no checkpoint was written"
            )
            raise TrainingAborted(
                f"{self.consecutive} consecutive steps (up to step {step}) had a NaN/Inf loss or "
                f"gradient norm (loss {loss}, gradient norm {norm}); {where}. Lower --lr, "
                "use --precision fp32 or bf16, or check the data; --max-bad-steps sets the limit",
                exit_code=BAD_STEPS_EXIT,
            )
        return False


def weights_are_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def refuse_nonfinite_weights(model: torch.nn.Module, last_checkpoint: Any) -> None:
    """Stop instead of saving NaN/Inf weights (skipped steps make this rare, not impossible)."""
    if not weights_are_finite(model):
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "none"
        raise TrainingAborted(
            f"the weights hold NaN/Inf values and were not saved; {where}. Lower --lr",
            exit_code=BAD_STEPS_EXIT,
        )


def step_delay() -> None:
    delay = float(os.environ.get(STEP_DELAY_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)


# ----------------------------------------------------------------------------- out of memory


def agree_on_oom(
    failed: torch.OutOfMemoryError | None, ctx: Any, device: torch.device, sharded: bool
) -> None:
    """After a micro-batch's attempt: raise OutOfMemoryError on every rank if any rank had one.

    Every rank calls this at the same point of the step (before any gradient all-reduce), so an
    error on one rank becomes a back-off of all ranks in step. Under FSDP the forward and
    backward passes hold collectives themselves: a rank out of memory is already out of step, so
    it stops at once with one line (the others then lose contact and stop too).
    """
    if not ctx.enabled:
        if failed is not None:
            raise failed
        return
    if sharded:
        if failed is not None:
            raise TrainingAborted(
                f"out of memory on rank {ctx.rank} under --strategy fsdp, which cannot re-split a "
                f"batch on all ranks in step ({failed}); lower --batch-size and raise --grad-accum"
            ) from failed
        return
    from domainlm.model.distributed import all_reduce_sum

    (count,) = all_reduce_sum([float(failed is not None)], ctx, device)
    if failed is not None:
        raise failed
    if count > 0:
        raise torch.OutOfMemoryError(f"{int(count)} other rank(s) ran out of memory")


def oom_in_gradient_sync(exc: torch.OutOfMemoryError, ctx: Any) -> TrainingAborted:
    """The stop for an OOM in the backward pass that all-reduces gradients (DDP's last
    micro-batch): the other ranks are inside that all-reduce, so it cannot be retried in step."""
    return TrainingAborted(
        f"out of memory on rank {ctx.rank} while its gradients were being all-reduced ({exc}); "
        "the ranks cannot retry that in step: lower --batch-size and raise --grad-accum"
    )


@dataclass
class MicroBatching:
    """How one global batch is cut: `batch_size` blocks per micro-batch, `grad_accum` of them."""

    batch_size: int
    grad_accum: int

    def halved(self) -> MicroBatching:
        """Half the micro-batch (rounded up), enough micro-batches to cover the same blocks.

        An odd size leaves the last micro-batch short (empty slots are masked blocks).
        """
        smaller = -(-self.batch_size // 2)
        return MicroBatching(smaller, -(-self.batch_size * self.grad_accum // smaller))


def _free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def with_oom_backoff(
    run: Callable[[MicroBatching], T],
    split: MicroBatching,
    reset: Callable[[], None],
    report: Callable[[str], None],
) -> tuple[T, MicroBatching]:
    """run(split); on OutOfMemoryError: reset(), halve the micro-batch, restore the RNG, retry.

    Returns the result and the split that worked (the caller keeps it for later steps). The
    global batch is `batch_size * grad_accum` blocks either way, so the step's blocks and its loss
    normalisation do not change. At a micro-batch of 1 the error is raised as TrainingAborted.
    """
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    while True:
        try:
            return run(split), split
        except torch.OutOfMemoryError as exc:
            reset()
            _free_memory()
            if split.batch_size < 2:
                raise TrainingAborted(
                    f"out of memory at a micro-batch of {split.batch_size} blocks ({exc}); "
                    "lower --block-size, use a smaller model or --precision bf16",
                ) from exc
            smaller = split.halved()
            report(
                f"out of memory at micro-batch {split.batch_size} x accumulation "
                f"{split.grad_accum}; retrying the step with {smaller.batch_size} x "
                f"{smaller.grad_accum} (same effective batch)"
            )
            split = smaller
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)


def eval_with_oom_backoff(
    run: Callable[[int], T], batch_size: int, report: Callable[[str], None]
) -> tuple[T, int]:
    """run(batch_size); on OutOfMemoryError halve the evaluation batch and retry (down to 1)."""
    while True:
        try:
            return run(batch_size), batch_size
        except torch.OutOfMemoryError as exc:
            _free_memory()
            if batch_size <= 1:
                raise TrainingAborted(
                    f"out of memory while evaluating one window at a time ({exc}); "
                    "lower --block-size or use a smaller model"
                ) from exc
            report(
                f"out of memory in evaluation at batch {batch_size}; retrying with {batch_size // 2}"
            )
            batch_size //= 2
