"""Disk space: what the checkpoints of a run will need, checked before training; a full disk
during a save turned into one line and a resumable stop.

- `CheckpointSize` / `estimate_checkpoint`: one checkpoint's bytes (weights in their saved dtype,
  the AdamW moments, the training state, the tokenizer files), from the model in memory, without
  writing anything.
- `space_needed`: the peak a run adds to its output folder: with `--save-total-limit K`, K + 1
  checkpoints while a new one is written (plus the best, which rotation keeps), then the final
  model beside the K kept; without a limit, every checkpoint still to be written and the model.
- `check_disk_space`: compares that with the free space of `--output-dir` (`shutil.disk_usage`):
  a warning naming both figures, or with `--strict` a UserError (exit 2) before anything is written.
- `out_of_space_stop`: a write that failed for lack of space (ENOSPC or EDQUOT, also as the
  libraries word it: safetensors and tokenizers give the OS message, torch.save an opaque
  RuntimeError, recognised by the free space left) becomes `OutOfSpace` (exit 4): the folder, the
  bytes needed and free, and "free space and run the same command again".
"""

from __future__ import annotations

import errno
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from domainlm.errors import TrainingAborted, UserError

OUT_OF_SPACE_EXIT = 4  # documented in docs/reliability.md and README.md
SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
SPACE_MESSAGES = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")
# Per-tensor overhead: a safetensors header entry; torch.save's zip record, padding and pickle.
SAFETENSORS_PER_TENSOR = 120
TORCH_SAVE_PER_TENSOR = 400
SMALL_FILES = 16 << 10  # config.json, generation_config.json, checkpoint.json, tokenizer_config
REPORT_FILES = 1 << 20  # the final folder's report.html, plots, model card, eval_results.json


@dataclass(frozen=True)
class CheckpointSize:
    """One checkpoint's bytes by part (the final model folder is weights + tokenizer + small)."""

    weights: int
    optimizer: int
    tokenizer: int
    other: int = SMALL_FILES
    merged: int = 0  # a LoRA run's merged/ folder (--merge), written with the final folder

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.tokenizer + self.other

    @property
    def model_folder(self) -> int:
        """The final model folder: weights, tokenizer, the report, a LoRA run's merged/ folder;
        no optimizer state."""
        return self.weights + self.tokenizer + self.other + REPORT_FILES + self.merged


def human(n: float) -> str:
    """Bytes in human units: 1.5 GB, 3.2 MB (powers of 1000, as df -H and file managers)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def saved_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors `save_pretrained` writes: parameters (tied ones once) and persistent buffers."""
    tensors = list(model.parameters())  # named_parameters drops the duplicates of tied weights
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                tensors.append(buf)
    return tensors


def tied_copies_bytes(model: torch.nn.Module) -> int:
    """The bytes of every parameter's second and later names (tied weights), once each."""
    seen: set[int] = set()
    extra = 0
    for _, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            extra += param.numel() * param.element_size()
        seen.add(id(param))
    return extra


def tokenizer_bytes(tokenizer: Any) -> int:
    """The tokenizer files' size: tokenizer.json as the fast backend writes it (pretty-printed),
    else the vocabulary files of the folder it came from."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return len(backend.to_str(pretty=True).encode("utf-8"))
    source = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    names = getattr(tokenizer, "vocab_files_names", {}) or {}
    return sum((source / n).stat().st_size for n in names.values() if (source / n).is_file())


def estimate_checkpoint(
    model: torch.nn.Module, tokenizer: Any, merge: bool = False, sharded: bool = False
) -> CheckpointSize:
    """One checkpoint's size without writing it: weights in their dtype, AdamW's two moments per
    trainable parameter (in its dtype) and step, the training state, the tokenizer files.
    `sharded` (torch.distributed.checkpoint's format): a tied weight is stored under each of
    its names (a tied GPT-2's embedding twice: 30% more than the estimate of one).

    A LoRA (PEFT) model saves its adapter only; with `merge`, the final folder also holds
    merged/: the frozen base with the adapter folded in, in float32 (lora.save_merged), and
    the tokenizer again."""
    tensors = saved_tensors(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    merged = 0
    if hasattr(model, "peft_config"):  # PeftModel.save_pretrained writes the adapter alone
        from peft import get_peft_model_state_dict

        frozen = [t for t in tensors if not t.requires_grad]
        tensors = list(get_peft_model_state_dict(model).values())
        if merge:
            merged = sum(4 * t.numel() + SAFETENSORS_PER_TENSOR for t in frozen)
            merged += tokenizer_bytes(tokenizer) + SMALL_FILES
    weights = sum(t.numel() * t.element_size() for t in tensors)
    weights += SAFETENSORS_PER_TENSOR * len(tensors)
    if sharded:
        weights += tied_copies_bytes(model)
    moments = sum(2 * p.numel() * p.element_size() for p in trainable)
    optimizer = moments + 3 * TORCH_SAVE_PER_TENSOR * len(trainable)  # exp_avg, exp_avg_sq, step
    return CheckpointSize(weights, optimizer, tokenizer_bytes(tokenizer), merged=merged)


@dataclass(frozen=True)
class SpaceNeed:
    """The peak bytes a run adds to its output folder, and how that figure is made up."""

    checkpoint: CheckpointSize
    to_write: int  # checkpoints this run (or its resumed part) will write
    at_peak: int  # checkpoints on disk at the worst moment
    held: int  # bytes the folder's complete checkpoints hold already (they count toward K)
    peak: int  # bytes needed beyond what is there now

    def describe(self) -> str:
        return (
            f"{self.at_peak} checkpoint(s) of {human(self.checkpoint.total)} at the worst moment "
            f"(weights {human(self.checkpoint.weights)}, optimizer state "
            f"{human(self.checkpoint.optimizer)}, tokenizer {human(self.checkpoint.tokenizer)}) "
            f"and the final model ({human(self.checkpoint.model_folder)}"
            + (
                f", of which merged/ {human(self.checkpoint.merged)}"
                if self.checkpoint.merged
                else ""
            )
            + ")"
        )


def save_points(start_step: int, total_steps: int, save_steps: int) -> int:
    """Checkpoints written by steps start_step+1 .. total_steps: every save_steps and the last."""
    if total_steps <= start_step:
        return 0
    multiples = total_steps // save_steps - start_step // save_steps
    return multiples + (0 if total_steps % save_steps == 0 else 1)


def space_needed(
    size: CheckpointSize,
    start_step: int,
    total_steps: int,
    save_steps: int,
    keep: int | None,
    existing: list[int],
) -> SpaceNeed:
    """The peak bytes to add: while the last checkpoint is written (before rotation), and at the
    end with the final model beside the checkpoints kept. `existing`: sizes of the folder's
    complete checkpoints. With a limit K the best checkpoint may be one more than the newest K."""
    new = save_points(start_step, total_steps, save_steps)
    count = len(existing) + new
    if keep is None:
        while_saving = after = count
    else:
        best = 1 if count > keep else 0  # keep-best can hold one beyond the newest K
        while_saving = min(count, keep + 1 + best)
        after = min(count, keep + best)
    held = sum(existing)
    c = size.total
    peak = max(while_saving * c, after * c + size.model_folder) - held
    peak = max(peak, size.model_folder if new == 0 else c)
    return SpaceNeed(size, new, max(while_saving, after), held, peak)


def existing_folder(path: Path) -> Path:
    """`path`, or its nearest existing parent (the file system it will be on)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(existing_folder(path)).free


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def check_disk_space(
    need: SpaceNeed, output_dir: Path, strict: bool, warn: Any, free: int | None = None
) -> str | None:
    """A warning (or with strict a UserError) when the peak need exceeds the free space.

    Returns the warning given, None when it fits. `free` is measured here unless given.
    """
    free = free_bytes(output_dir) if free is None else free
    if need.peak <= free:
        return None
    message = (
        f"--output-dir {output_dir}: the run needs about {human(need.peak)} more disk space "
        f"({need.describe()}) but {human(free)} is free there"
    )
    if strict:
        raise UserError(f"--strict: {message}; free space, choose another --output-dir, or "
                        "lower --save-total-limit")  # fmt: skip
    message += "; it will stop with exit code 4 when the disk fills (nothing is lost)"
    warn(message)
    return message


def check_run_disk_space(
    config: Any,
    ctx: Any,
    device: torch.device,
    warn: Callable[[str], None],
    model: torch.nn.Module,
    tokenizer: Any,
    start_step: int,
    total_steps: int,
) -> SpaceNeed:
    """Before training: the peak need of this run against the free space of its output folder.

    Every rank calls this (train.start_state, before anything is written); rank 0's verdict
    holds for all, so with --strict every rank stops alike.
    """
    from domainlm.model.distributed import all_reduce_sum
    from domainlm.run.checkpoint import list_checkpoints
    from domainlm.run.sharded import SHARDED, checkpoint_format

    output_dir = Path(config.output_dir)
    sharded = checkpoint_format(config.checkpoint_format, model) == SHARDED
    size = estimate_checkpoint(model, tokenizer, bool(config.lora and config.merge), sharded)
    existing = [folder_bytes(c.path) for c in list_checkpoints(output_dir)]
    need = space_needed(
        size, start_step, total_steps, config.save_steps, config.save_total_limit, existing
    )
    free = free_bytes(output_dir)
    (short,) = all_reduce_sum([float(need.peak > free and ctx.is_main)], ctx, device)
    if short > 0:
        check_disk_space(need, output_dir, config.strict, warn, free if ctx.is_main else 0)
    return need


# ----------------------------------------------------------------------------- a full disk


class OutOfSpace(TrainingAborted):
    """A save that failed for lack of disk space (exit code 4); the run resumes when rerun."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=OUT_OF_SPACE_EXIT)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return seen


def says_out_of_space(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT in the exception or its causes, or the OS message in a library's error."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in SPACE_ERRNOS:
            return True
        if any(m in str(e).lower() for m in SPACE_MESSAGES):
            return True
    return False


def is_out_of_space(exc: BaseException, folder: Path, needed: int, partial: int) -> bool:
    """True when a write failed for lack of space: said so, or (torch.save's opaque RuntimeError)
    the bytes free plus those the partial write holds are fewer than the write needed."""
    if says_out_of_space(exc):
        return True
    if isinstance(exc, RuntimeError | OSError):
        return free_bytes(folder) + partial < needed
    return False


def out_of_space_stop(
    exc: BaseException, folder: Path, what: str, needed: int, resume_from: str
) -> OutOfSpace:
    """The one line for a full disk: where, how much needed and free, and how to go on."""
    from domainlm.run.guard import resume_command

    quota = any(isinstance(e, OSError) and e.errno == errno.EDQUOT for e in _chain(exc))
    reason = "disk quota exceeded" if quota else "no space left on device"
    need = f"it needs about {human(needed)}, " if needed else ""
    return OutOfSpace(
        f"{reason} while writing {what} in {folder}: {need}{human(free_bytes(folder))} is free "
        f"there; {resume_from}. Free space, then run {resume_command()}: "
        "it resumes from there"
    )


def run_out_of_space(exc: OSError, output_dir: Path) -> OutOfSpace:
    """Any other write that failed for lack of space (metrics.jsonl, the report)."""
    from domainlm.run.checkpoint import list_checkpoints

    kept = list_checkpoints(output_dir)
    where = f"{kept[-1].path.name} is intact" if kept else "no checkpoint was written yet"
    return out_of_space_stop(exc, output_dir, "the run's files", 0, where)


@contextmanager
def checkpoint_write(output_dir: Path, step: int, needed: Callable[[], int]) -> Iterator[None]:
    """Around writing checkpoint-<step> (and rotating): a failure for lack of space removes the
    partial `.checkpoint-<step>.tmp` and becomes OutOfSpace naming the checkpoint kept."""
    from domainlm.run.checkpoint import CHECKPOINT_PREFIX, RUN_FILE, list_checkpoints

    tmp = output_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
    try:
        yield
    except Exception as exc:
        partial = folder_bytes(tmp) if tmp.exists() else 0
        if not is_out_of_space(exc, output_dir, needed(), partial):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        (output_dir / f".{RUN_FILE}.tmp").unlink(missing_ok=True)  # write_json_atomic cut short
        kept = list_checkpoints(output_dir)
        where = (
            f"{kept[-1].path.name} is intact and the partial {tmp.name} was removed"
            if kept
            else f"no complete checkpoint yet (the run starts again at step 0); {tmp.name} removed"
        )
        raise out_of_space_stop(
            exc, output_dir, f"{CHECKPOINT_PREFIX}{step}", needed(), where
        ) from exc


@contextmanager
def model_folder_write(output_dir: Path, needed: Callable[[], int]) -> Iterator[None]:
    """Around writing the final model folder: a failure for lack of space removes the weight
    files written (a truncated model is never left to load) and becomes OutOfSpace; the final
    checkpoint holds the weights, so the same command writes the folder again."""
    before = {p.name: _stamp(p) for p in output_dir.iterdir()}
    try:
        yield
    except Exception as exc:
        if not is_out_of_space(exc, output_dir, needed(), 0):
            raise
        for path in output_dir.iterdir():
            changed = before.get(path.name) != _stamp(path)
            if changed and path.is_file() and WEIGHT_FILE.match(path.name):
                path.unlink()
        raise out_of_space_stop(
            exc, output_dir, "the final model", needed(), "its weight files were removed, the "
            "checkpoints are intact",
        ) from exc  # fmt: skip


WEIGHT_FILE = re.compile(r"^model(-\d+-of-\d+)?\.safetensors(\.index\.json)?$")


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)
