"""Checkpoints and the output folder: save, find, load, rotate; atomic writes; what we own.

A checkpoint is `checkpoint-<step>/`: the model in Hugging Face format (safetensors), the tokenizer,
`training_state.pt` (optimizer, step, data position, the open loss window; no RNG state: every
step re-seeds it) and `checkpoint.json`, the completion marker with a SHA-256 of every file. It
is written under a temporary name and renamed when complete, so a folder named
`checkpoint-<step>` without a valid marker is never resumed from. `run_config.json` lists what a
run wrote here, checkpoints included: all that --overwrite-output-dir may remove.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from domainlm.config import CHECKPOINT_PREFIX, FINAL_STAGING, RUN_FILE, checkpoint_step
from domainlm.errors import UserError

MARKER = "checkpoint.json"
STATE_FILE = "training_state.pt"
SAVE_DELAY_ENV = "DOMAINLM_INJECT_SAVE_DELAY"


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path
    eval_perplexity: float | None
    validation: str | None = None  # the fingerprint of the data eval_perplexity scored


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    output_dir: Path,
    step: int,
    model: Any,
    tokenizer: Any,
    training_state: dict[str, Any],
    eval_perplexity: float | None = None,
    model_state_dict: dict[str, torch.Tensor] | None = None,
    validation: str | None = None,
) -> Path:
    """Write checkpoint-<step>/ atomically: temporary folder, checksums, marker, then rename.
    The marker records `eval_perplexity` and the `validation` data it scored (a fingerprint)."""
    tmp = fresh_tmp_dir(output_dir, step)
    model.save_pretrained(tmp, state_dict=model_state_dict)
    tokenizer.save_pretrained(tmp)
    torch.save(training_state, tmp / STATE_FILE)
    return publish_checkpoint(output_dir, step, tmp, eval_perplexity, validation=validation)


def fresh_tmp_dir(output_dir: Path, step: int) -> Path:
    """The empty temporary folder a checkpoint of `step` is written into (publish_checkpoint)."""
    tmp = output_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish_checkpoint(
    output_dir: Path, step: int, tmp: Path, eval_perplexity: float | None, **marker: Any
) -> Path:
    """Checksum and fsync every file of `tmp`, write the marker, rename it to checkpoint-<step>.

    `marker` adds entries to checkpoint.json (the format of a sharded checkpoint)."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    files = {f.name: _sha256(f) for f in sorted(tmp.iterdir()) if f.is_file() and f.name != MARKER}
    for name in files:
        with open(tmp / name, "rb") as handle:
            os.fsync(handle.fileno())
    save_delay(step)  # fault injection: tests kill a run while a checkpoint is being written
    write_json_atomic(
        tmp / MARKER,
        {"step": step, "files": files, "eval_perplexity": eval_perplexity, **marker},
    )
    _fsync_dir(tmp)
    if final.exists():
        trash = output_dir / f".{CHECKPOINT_PREFIX}{step}.old"
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash)
    else:
        os.replace(tmp, final)
    _fsync_dir(output_dir)
    return final


def save_delay(step: int) -> None:
    """`DOMAINLM_INJECT_SAVE_DELAY=S` (every checkpoint) or `K:S` (checkpoint-K only): sleep S
    seconds after the checkpoint's files are written, before its marker (tests kill a run while
    a checkpoint is being written)."""
    value = os.environ.get(SAVE_DELAY_ENV, "")
    only, _, delay = value.rpartition(":")
    if value and (not only or int(only) == step):
        time.sleep(float(delay))


def read_marker(path: Path) -> dict[str, Any]:
    """A checkpoint's checkpoint.json ({} when missing or unreadable)."""
    try:
        info = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def checkpoint_problem(path: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong with it."""
    marker = path / MARKER
    if not marker.is_file():
        return "no completion marker (it was being written when the run stopped)"
    try:
        info = json.loads(marker.read_text())
        files = info["files"]
    except (ValueError, KeyError):
        return "its completion marker is unreadable"
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if _sha256(f) != digest:
            return f"{name} does not match its checksum"
    return None


def list_checkpoints(output_dir: Path) -> list[CheckpointInfo]:
    """Complete checkpoints (marker present), oldest first. Checksums are checked on resume."""
    found = []
    if not output_dir.is_dir():
        return found
    for path in output_dir.iterdir():
        step = checkpoint_step(path.name)
        if step is None or not path.is_dir() or not (path / MARKER).is_file():
            continue
        try:
            info = json.loads((path / MARKER).read_text())
        except ValueError:
            continue
        scored_on = info.get("validation")
        found.append(
            CheckpointInfo(
                step, path, info.get("eval_perplexity"),
                scored_on if isinstance(scored_on, str) else None,
            )
        )  # fmt: skip
    return sorted(found, key=lambda c: c.step)


def all_checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Every checkpoint-* folder, complete or not (for reporting)."""
    if not output_dir.is_dir():
        return []
    return sorted(
        p for p in output_dir.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
    )


def checkpoint_dirs_by_step(output_dir: Path) -> list[Path]:
    """Every checkpoint-<step> folder, complete or not, oldest first (resume checks each)."""
    found = [
        p for p in all_checkpoint_dirs(output_dir) if p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def best_checkpoint(
    checkpoints: list[CheckpointInfo], validation: str | None = None
) -> CheckpointInfo | None:
    """The checkpoint of the lowest validation perplexity (the later of equals); with
    `validation` (a fingerprint), among those scored on that data only (a resumed run's
    validation file may have changed; a checkpoint from before markers recorded it counts)."""
    scored = [
        c for c in checkpoints if c.eval_perplexity is not None and math.isfinite(c.eval_perplexity)
        and (validation is None or c.validation in (None, validation))
    ]  # fmt: skip  # a diverged checkpoint's NaN is never the best
    return min(scored, key=lambda c: (c.eval_perplexity, -c.step)) if scored else None


def rotate_checkpoints(
    output_dir: Path,
    keep: int | None,
    warn: Callable[[str], None] | None = None,
    validation: str | None = None,
) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints and the best one. Returns the deleted.

    Called only after a new checkpoint is complete, so a crash here never leaves fewer than `keep`.
    A checkpoint holding a file domainlm did not write (a user's notes, a converted model) is
    kept whole, and `warn` says so once per checkpoint: deleting it would take the user's file.
    """
    if keep is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    best = best_checkpoint(checkpoints, validation)  # the best on today's validation data
    protected = {c.path for c in checkpoints[-keep:]}
    if best is not None:
        protected.add(best.path)
    deleted = []
    for c in checkpoints:
        if c.path in protected:
            continue
        users = foreign_in_checkpoint(c.path)
        if users:
            if warn is not None and c.path not in _KEPT_FOR_USER_FILES:
                warn(
                    f"{c.path.name} is kept past --save-total-limit: it holds "
                    f"{', '.join(users)}, which domainlm did not write (move it out and the "
                    "next save removes the checkpoint)"
                )
            _KEPT_FOR_USER_FILES.add(c.path)
            continue
        # The marker goes first: a crash mid-delete leaves a folder that is never resumed.
        (c.path / MARKER).unlink(missing_ok=True)
        shutil.rmtree(c.path)
        deleted.append(c.path)
    return deleted


# The checkpoints rotation kept for a user's file, already warned about (once per process).
_KEPT_FOR_USER_FILES: set[Path] = set()


def foreign_in_checkpoint(path: Path) -> list[str]:
    """The entries of checkpoint folder `path` that its marker does not list (nor is): files a
    user put there. Empty for a checkpoint without a readable file list."""
    listed = read_marker(path).get("files")
    if not isinstance(listed, dict):
        return []
    ours = set(listed) | {MARKER}
    return [p.name for p in sorted(path.iterdir()) if p.name not in ours]


def load_training_state(path: Path) -> dict[str, Any]:
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- output folder


def read_run_file(output_dir: Path) -> dict[str, Any] | None:
    path = output_dir / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def check_output_dir(output_dir: Path) -> None:
    """Refuse an output path that is a file or cannot be written, before anything is done."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output-dir {output_dir} is a file; give a folder path")
    probe_parent = output_dir if output_dir.exists() else _existing_parent(output_dir)
    if not os.access(probe_parent, os.W_OK | os.X_OK):
        raise UserError(f"--output-dir {output_dir} is not writable; choose another folder")


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    if not path.is_dir():
        raise UserError(f"--output-dir {path} is a file; give a folder path")
    return path


def is_plain_name(name: object) -> bool:
    """True when `name` names an entry directly inside a folder: no separator, not '.' or '..'."""
    if not isinstance(name, str) or name in ("", ".", ".."):
        return False
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return not any(sep in name for sep in separators) and "\0" not in name


def owned_entries(output_dir: Path) -> list[str]:
    """The entries domainlm's run file says an earlier run wrote here (checkpoints included).

    Every name must be a plain name inside the folder; one that is not (`../x`, `/abs`, `a/b`)
    raises UserError before anything is removed. Empty without a readable run file.
    """
    run = read_run_file(output_dir)
    if not isinstance(run, dict):
        return []
    names = run.get("written", [])
    bad = [n for n in (names if isinstance(names, list) else [names]) if not is_plain_name(n)]
    if bad or not isinstance(names, list):
        raise UserError(
            f"{output_dir / RUN_FILE} lists {bad[0] if bad else names!r} as written by domainlm, "
            "which is not a name inside the folder; nothing was removed. Fix or delete that file"
        )
    return list(names)


# What a run writes into its folder besides checkpoints (the model and tokenizer files as
# save_pretrained names them, a LoRA run's adapter and merged/, the logs, results and report;
# README.md is skipped when not ours, run/report.py): a file of these names that domainlm did not
# write would be overwritten.
OUTPUT_NAMES = (
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "model-*-of-*.safetensors", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
    "tokenizer.model", "spiece.model", "chat_template.jinja", "adapter_config.json",
    "adapter_model.safetensors", "merged", "eval_results.json", "metrics.jsonl", "samples.jsonl",
    "report.html", "training_loss.png", "validation_perplexity.png",
    "learning_rate.png", "tensorboard", "mlruns", "wandb", "preempted.json", FINAL_STAGING,
)  # fmt: skip


# What `domainlm report` writes into its output folder (a run's folder, by default) beside the
# plots; train writes report.html itself.
SUMMARY_FILE, REPORT_FILE = "summary.md", "report.html"
# A finished run's final validation figures (run/train.py save_eval_results).
EVAL_RESULTS_FILE = "eval_results.json"


def written_by_a_report(path: Path) -> bool:
    """A plot (a PNG matplotlib wrote), summary.md or report.html as a report writes them."""
    if not path.is_file():
        return False
    with open(path, "rb") as file:
        head = file.read(4096)
    if path.suffix == ".png":
        return head.startswith(b"\x89PNG") and b"matplotlib" in head.lower()
    if path.name == SUMMARY_FILE:
        return head.startswith(b"# Runs\n")
    return head.startswith(b"<!DOCTYPE html>") and b"domainlm report</title>" in head


def foreign_outputs(output_dir: Path, last_step: int = 0) -> list[str]:
    """Entries of `output_dir` that a run of `last_step` steps would write over and domainlm did
    not write (no earlier run of ours lists them): another tool's model, the user's own files, a
    `checkpoint-<N>` folder of another tool with N a step of this run (a checkpoint may be saved
    at any step: an interrupt saves one), a run_config.json that is not a domainlm run's."""
    if not output_dir.is_dir():
        return []
    owned = set(owned_entries(output_dir))

    def would_write(name: str) -> bool:
        step = name[len(CHECKPOINT_PREFIX) :] if name.startswith(CHECKPOINT_PREFIX) else ""
        if step.isdigit():
            return 1 <= int(step) <= last_step
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in OUTPUT_NAMES)

    foreign = [
        p.name for p in output_dir.iterdir()
        if p.name not in owned and would_write(p.name)
        and not written_by_a_report(p)  # `domainlm report RUN` wrote it there
    ]  # fmt: skip
    if (output_dir / RUN_FILE).exists() and not is_run_file(read_run_file(output_dir)):
        foreign.append(RUN_FILE)
    return sorted(foreign)


# The run file's record of the names a LoRA run's merge wrote into merged/ (model/lora.py's
# MERGED_DIR; a user's file beside them is not ours: `foreign_inside`).
MERGED_FILES_KEY = "merged_files"


def foreign_inside(output_dir: Path) -> list[str]:
    """Entries inside the folders an earlier run of ours wrote (`checkpoint-N/`, `merged/`) that
    it did not write: a user's file put there (`merged/model-q4.gguf`, notes in a checkpoint),
    which removing the folder would take with it. A checkpoint's files are its marker's; merged/'s
    those the run file records (a run file from before that record: all taken as ours, as is a
    checkpoint without a marker and a tracker's folder, the tracker's own tree)."""
    from domainlm.model.lora import MERGED_DIR

    run = read_run_file(output_dir) or {}
    found: list[str] = []
    for name in owned_entries(output_dir):
        folder = output_dir / name
        if folder.is_symlink() or not folder.is_dir():
            continue
        if name.startswith(CHECKPOINT_PREFIX):
            found += [f"{name}/{entry}" for entry in foreign_in_checkpoint(folder)]
        elif name == MERGED_DIR:
            listed = run.get(MERGED_FILES_KEY)
            if isinstance(listed, list):
                found += [
                    f"{name}/{p.name}" for p in sorted(folder.iterdir()) if p.name not in listed
                ]
    return found


def is_run_file(run: object) -> bool:
    """`run` (a run_config.json's contents) is what domainlm writes: an object with the run's
    identity or the list of files it wrote."""
    return isinstance(run, dict) and ("identity" in run or "written" in run)


def remove_owned_files(output_dir: Path) -> list[str]:
    """--overwrite-output-dir: remove what an earlier domainlm run wrote here, nothing else.

    Removes exactly the entries listed in run_config.json (`owned_entries`; each checkpoint is
    listed before it is written), the temporary folders of those checkpoints, and the run file
    (with its temporary copy). Never follows a symbolic link: a listed name that is a link is
    left alone, so nothing outside the folder is touched. A `checkpoint-*` folder not listed
    (another tool's) stays. Call on one process (rank 0). Returns the names removed.
    """
    owned = owned_entries(output_dir)
    removed = []
    for name in owned:
        target = output_dir / name
        if target.is_symlink() or not target.exists():
            continue  # we never write links; a link may point anywhere
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
        removed.append(name)
    for name in owned:  # a checkpoint's save or replacement cut short (save_checkpoint)
        if name.startswith(CHECKPOINT_PREFIX):
            for leftover in (f".{name}.tmp", f".{name}.old"):
                path = output_dir / leftover
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
    if isinstance(read_run_file(output_dir), dict):
        leftover = output_dir / f".{RUN_FILE}.tmp"  # write_json_atomic cut short
        if leftover.is_file() and not leftover.is_symlink():
            leftover.unlink()
        (output_dir / RUN_FILE).unlink()
    return removed


def record_written(output_dir: Path, *names: str) -> None:
    """Add `names` to the run file's `written` list (before writing them: a crash mid-write still
    leaves them owned, so a resume writes over them and --overwrite-output-dir removes them)."""
    run = read_run_file(output_dir)
    run = run if isinstance(run, dict) else {}
    written = run.get("written", [])
    if set(names) - set(written):
        write_json_atomic(output_dir / RUN_FILE, {**run, "written": sorted({*written, *names})})


def staging_for_final_files(output_dir: Path) -> Path:
    """An empty FINAL_STAGING folder in `output_dir`, recorded as written before it is made."""
    staging = output_dir / FINAL_STAGING
    record_written(output_dir, FINAL_STAGING)
    if staging.is_dir() and not staging.is_symlink():
        shutil.rmtree(staging)  # an earlier final save's, cut short
    staging.mkdir()
    return staging


def publish_final_files(output_dir: Path, staging: Path) -> None:
    """Move what `staging` holds into `output_dir`, every name recorded as written first (a kill
    between two moves leaves only owned files), then remove the empty staging folder."""
    names = sorted(p.name for p in staging.iterdir())
    record_written(output_dir, *names)
    for name in names:
        (staging / name).replace(output_dir / name)
    staging.rmdir()
