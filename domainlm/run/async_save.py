"""--async-save: a checkpoint written from a host copy by a background thread while training goes on.

At a checkpoint step the step loop copies what the checkpoint holds (model weights, optimizer
state, the data position and loss window; RNG is not saved, every step re-seeds it) into new CPU
tensors (`host_copy`), hands that copy to `BackgroundWriter.submit` and goes on with the next
step. The thread writes it exactly as a synchronous save does (`checkpoint.save_checkpoint`:
temporary folder, checksums, fsync, marker, rename), then rotates; so rotation happens only after
publication, and a kill during the write leaves the previous checkpoint as the resume point.

At most one save is in flight: `submit` first waits for the previous one. An error in the thread
is raised in the training thread at the next step boundary (`poll`), the next save, or the end of
the run (`wait`) — never swallowed. The final model is saved, and the process exits, only after
the write in flight is done (`wait`, and `close` on every other exit).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from domainlm.run.checkpoint import rotate_checkpoints, save_checkpoint


def host_copy(obj: Any) -> Any:
    """`obj` with every tensor replaced by a new CPU tensor of the same values (dicts, lists,
    tuples walked; other values kept). Tensors that share storage stay shared in the copy."""
    copies: dict[tuple[int, int, tuple, tuple, torch.dtype], torch.Tensor] = {}

    def copy(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            key = (
                value.untyped_storage().data_ptr(),
                value.storage_offset(),
                tuple(value.shape),
                tuple(value.stride()),
                value.dtype,
            )
            if key not in copies:
                copies[key] = value.detach().to("cpu", copy=True)
            return copies[key]
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(copy(v) for v in value)
        return value

    return copy(obj)


def background_writer(run: Any, cleanup: Any) -> BackgroundWriter | None:
    """The writer of a run with --async-save (None without it, or for sharded checkpoints, which
    are written synchronously: said in one line). Every exit waits for its write (`cleanup`)."""
    from domainlm.run.sharded import SHARDED, checkpoint_format

    if not run.config.async_save:
        return None
    if checkpoint_format(run.config.checkpoint_format, run.net.model) == SHARDED:
        run.console.warn("--async-save: sharded checkpoints are written synchronously")
        return None
    writer = BackgroundWriter(warn=run.console.warn)
    cleanup.callback(writer.close)
    return writer


def model_state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as `save_pretrained` writes it: persistent parameters and buffers,
    one name per tensor (a tied output layer under the name named_parameters() gives it first)."""
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in model.state_dict().items() if k in names}


@dataclass
class CheckpointCopy:
    """What one checkpoint holds, on the host, owned by the writer thread."""

    output_dir: Path
    step: int
    model: Any  # the live model: save_pretrained reads its config, not its weights
    tokenizer: Any
    training_state: dict[str, Any]
    eval_perplexity: float | None
    model_state: dict[str, torch.Tensor]
    keep: int | None = None  # --save-total-limit, applied once the checkpoint is published
    warn: Callable[[str], None] | None = None  # what rotation says of a checkpoint it keeps
    validation: str | None = None  # the validation data's fingerprint (checkpoint.json)

    def write(self) -> None:
        """As the synchronous save: a full disk is OutOfSpace (exit 4), the partial removed."""
        from domainlm.run.diskspace import checkpoint_write, estimate_checkpoint

        size = lambda: estimate_checkpoint(self.model, self.tokenizer).total  # noqa: E731
        with checkpoint_write(self.output_dir, self.step, size):
            self.save_and_rotate()

    def save_and_rotate(self) -> None:
        save_checkpoint(
            self.output_dir,
            self.step,
            self.model,
            self.tokenizer,
            self.training_state,
            self.eval_perplexity,
            self.model_state,
            self.validation,
        )
        rotate_checkpoints(self.output_dir, self.keep, self.warn, self.validation)


@dataclass
class BackgroundWriter:
    """One background checkpoint write at a time; its error is raised in the caller's thread."""

    warn: Callable[[str], None] = print
    thread: threading.Thread | None = None
    error: BaseException | None = None
    what: str = ""
    last_write_seconds: float = 0.0  # the last finished background write, start to publication

    def submit(self, job: CheckpointCopy) -> None:
        """Start writing `job` once the previous write is done (raising its error, if any)."""
        self.wait()
        self.what = f"checkpoint-{job.step}"
        self.thread = threading.Thread(
            target=self._run, args=(job,), name=f"domainlm-save-{job.step}", daemon=False
        )
        self.thread.start()

    def _run(self, job: CheckpointCopy) -> None:
        start = time.perf_counter()
        try:
            job.write()
        except BaseException as exc:  # handed to the training thread, raised there
            self.error = exc
        self.last_write_seconds = time.perf_counter() - start

    @property
    def in_flight(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def poll(self) -> None:
        """Raise the error of a write that has ended with one (no wait otherwise)."""
        if self.thread is not None and not self.thread.is_alive():
            self.wait()

    def wait(self) -> None:
        """Until the write in flight is done; raise its error in this thread."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        error, self.error = self.error, None
        if error is not None:
            error.add_note(f"while writing {self.what} in the background (--async-save)")
            raise error

    def close(self) -> None:
        """On any exit: wait for the write in flight; its error is reported, not raised (the run
        is already ending with another error or a signal)."""
        try:
            self.wait()
        except Exception as exc:  # noqa: BLE001 - reported, the run is already stopping
            self.warn(f"the background save of {self.what} failed: {type(exc).__name__}: {exc}")


def save_in_background(
    writer: BackgroundWriter,
    run: Any,
    step: int,
    state: dict[str, Any],
    eval_perplexity: float | None,
    model_state: dict[str, torch.Tensor] | None,
) -> None:
    """Copy the checkpoint of `step` to the host and hand it to `writer` (rank 0 only).

    `model_state` is the gathered state under FSDP, None otherwise (the module's own)."""
    writer.wait()  # at most one save in flight, and one host copy
    model = run.net.model
    weights = model_state if model_state is not None else model_state_for_saving(model)
    copied = host_copy({"weights": weights, "state": state})
    writer.submit(
        CheckpointCopy(
            run.output_dir,
            step,
            model,
            run.data.loaded.tokenizer,
            copied["state"],
            eval_perplexity,
            copied["weights"],
            run.config.save_total_limit,
            run.console.warn,
            run.metrics.validation,
        )
    )
