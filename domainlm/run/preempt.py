"""Preemption: a SIGTERM's grace period (`--preempt-grace`, the seconds a scheduler allows between
SIGTERM and SIGKILL) as a budget for the last save.

- At start, `PreemptPlan.measure` estimates the time to write one checkpoint: its size
  (diskspace.estimate_checkpoint) over the write speed of the output folder (a probe file written
  and fsynced there, then removed) plus the time to checksum it (SHA-256 of the probe's bytes).
  When that does not fit in the grace period the run says so, and what it will save instead.
- On SIGTERM (guard.StopSignals notes when it came) the current step finishes; then, if the full
  checkpoint (its estimate, or the time the run's last save took when longer) still fits in what is left of the grace period (with a margin), it is written as
  before. Otherwise nothing big is written: the last complete checkpoint stays the resume point
  and `preempted.json` records the step reached and the data position, so the resumed run says
  which steps it trains again. Exit code 143 either way. SIGINT (a person at a terminal) always
  saves in full.
- A resumed run reads `preempted.json`, says what it means, and removes it.

Fault injection (tests): `DOMAINLM_INJECT_SAVE_SECONDS=S` sets the estimated save time (a slow
writer) instead of measuring it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from domainlm.errors import TrainingAborted
from domainlm.run.diskspace import estimate_checkpoint, human

PREEMPTED_FILE = "preempted.json"
PROBE_FILE = ".domainlm-write-probe.tmp"
PROBE_MAX_BYTES = 8 << 20  # written and fsynced once at start
MARGIN = 0.8  # a full save is tried only when its estimate fits in 80% of the time left
SAVE_SECONDS_ENV = "DOMAINLM_INJECT_SAVE_SECONDS"


def probe_speeds(folder: Path, size: int) -> tuple[float, float]:
    """(write, checksum) speed in bytes/s: a probe of up to 8 MiB written, fsynced and removed
    in `folder` (the file system the checkpoints go to), and hashed with SHA-256."""
    n = max(1 << 20, min(size, PROBE_MAX_BYTES))
    data = os.urandom(1 << 20) * (n >> 20)
    probe = folder / PROBE_FILE
    start = time.perf_counter()
    try:
        with open(probe, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        write = time.perf_counter() - start
    finally:
        probe.unlink(missing_ok=True)
    start = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    checksum = time.perf_counter() - start
    return len(data) / max(write, 1e-9), len(data) / max(checksum, 1e-9)


@dataclass(frozen=True)
class PreemptPlan:
    """The grace period and what one checkpoint costs to write here."""

    grace: float  # --preempt-grace, seconds
    checkpoint_bytes: int
    save_seconds: float  # estimated: write + checksum
    write_speed: float  # bytes/s, 0 when injected
    measured: bool = False  # save_seconds is a real save's time, not the estimate

    @property
    def fits_at_start(self) -> bool:
        return self.save_seconds <= self.grace * MARGIN

    def fits(self, elapsed: float) -> bool:
        """True when a full save fits in the grace left `elapsed` seconds after the signal."""
        return self.save_seconds <= (self.grace - elapsed) * MARGIN

    def after_a_save(self, seconds: float) -> PreemptPlan:
        """The plan with the time a real save of this run took, when longer than the estimate
        (the probe sees a moment of the disk; a save sees the disk under its own load)."""
        if seconds <= self.save_seconds:
            return self
        return dataclasses.replace(self, save_seconds=seconds, write_speed=0.0, measured=True)

    def describe(self) -> str:
        speed = f" at {human(self.write_speed)}/s measured" if self.write_speed else ""
        speed = " (the last save's time)" if self.measured else speed
        return (
            f"a checkpoint ({human(self.checkpoint_bytes)}) takes about {self.save_seconds:.2g} s "
            f"to write here{speed}"
        )

    @classmethod
    def measure(cls, run: Any) -> PreemptPlan:
        """Rank 0 measures (the others get its figures); says at start when a save will not fit,
        and reads a preempted.json a stopped run left."""
        from domainlm.model.distributed import all_reduce_sum
        from domainlm.run.sharded import SHARDED, checkpoint_format

        sharded = checkpoint_format(run.config.checkpoint_format, run.net.model) == SHARDED
        size = estimate_checkpoint(run.net.model, run.data.loaded.tokenizer, sharded=sharded).total
        injected = os.environ.get(SAVE_SECONDS_ENV)
        seconds, write = 0.0, 0.0
        if injected:
            seconds = float(injected)
        elif run.ctx.is_main:
            write, checksum = probe_speeds(run.output_dir, size)
            seconds = size / write + size / checksum
        seconds, write = all_reduce_sum([seconds, write], run.ctx, run.device)
        plan = cls(run.config.preempt_grace, size, seconds, write)
        if run.ctx.is_main:
            plan.announce(run.console)
            note_preemption(run.output_dir, run.console)
        return plan

    def announce(self, console: Any) -> None:
        if self.fits_at_start:
            console.info(f"{self.describe()}: fits in --preempt-grace {self.grace:g} s")
            return
        console.warn(
            f"{self.describe()}, more than --preempt-grace {self.grace:g} s allows: on SIGTERM "
            f"the run will keep its last complete checkpoint and write {PREEMPTED_FILE} (the step "
            "reached and the data position) instead; the steps after that checkpoint are trained "
            "again on resume"
        )


def seconds_since(signals: Any) -> float:
    received = getattr(signals, "received_at", None)
    return time.monotonic() - received if received is not None else 0.0


def full_save_agreed(plan: PreemptPlan, signals: Any, ctx: Any, device: Any) -> bool:
    """Whether to write the full checkpoint now: always for SIGINT; for SIGTERM when it fits in
    the grace left on every rank (ranks agree, so they save or stop alike)."""
    from domainlm.model.distributed import all_reduce_sum

    short = signals.signum == signal.SIGTERM and not plan.fits(seconds_since(signals))
    (count,) = all_reduce_sum([float(short)], ctx, device)
    return count == 0


def fallback_stop(
    run: Any, plan: PreemptPlan, signals: Any, step: int, last_saved: Path | None
) -> TrainingAborted:
    """No full save: write preempted.json (rank 0) and return the stop (exit 143) that says so."""
    from domainlm.model.distributed import barrier
    from domainlm.run.checkpoint import record_written, write_json_atomic
    from domainlm.run.guard import resume_command

    elapsed = seconds_since(signals)
    kept = last_saved.name if last_saved is not None else None
    record = {
        "signal": signal.Signals(signals.signum).name,
        "step": step,
        "epoch": run.cursor.epoch,
        "offset": run.cursor.offset,
        "resume_from": kept,
        "grace_s": plan.grace,
        "elapsed_s": round(elapsed, 3),
        "estimated_save_s": round(plan.save_seconds, 3),
    }
    if run.ctx.is_main:
        record_written(run.output_dir, PREEMPTED_FILE)
        write_json_atomic(run.output_dir / PREEMPTED_FILE, record)
    barrier(run.ctx)
    where = f"kept {kept}" if kept else "no checkpoint yet (the run starts again at step 0)"
    # --resume PATH outside --output-dir kept as the resume point: the command still names it
    continues = last_saved is None or last_saved.parent.resolve() == run.output_dir.resolve()
    left = max(plan.grace - elapsed, 0.0)
    return TrainingAborted(
        f"{record['signal']}: stopped after step {step} without a new checkpoint: "
        f"{plan.describe()}, more than the {left:.2g} s left of --preempt-grace {plan.grace:g} s; "
        f"{where} and wrote {run.output_dir / PREEMPTED_FILE}. To resume, run "
        f"{resume_command(continues)} (it continues from "
        f"{kept or 'step 0'})",
        exit_code=signals.exit_code(),
    )


def note_preemption(output_dir: Path, console: Any) -> dict[str, Any] | None:
    """A run stopped without its last save left preempted.json: say so, remove it, return it."""
    path = output_dir / PREEMPTED_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        console.info(
            f"the previous run was stopped by {record['signal']} after step {record['step']} "
            f"without a checkpoint of it (--preempt-grace {record['grace_s']:g} s was too short): "
            f"the steps after {record['resume_from'] or 'step 0'} are trained again"
        )
    except (ValueError, KeyError, TypeError):
        record = None
    path.unlink()
    return record
