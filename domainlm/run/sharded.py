"""Sharded checkpoints (--checkpoint-format sharded; auto under FSDP): each rank writes its shards.

A sharded `checkpoint-<step>/` holds, beside the model's config.json, the tokenizer and
`training_state.pt` (step, data position, loss window; rank 0), the model and optimizer state
dicts written by torch.distributed.checkpoint (DCP): one `__<rank>_0.distcp` file per rank with
that rank's shards (no gather to rank 0) and `.metadata`, the index of every tensor's chunks.
DCP reshards on load, so a checkpoint written by N ranks resumes on M ranks, with or without
FSDP. It is published like a full checkpoint (checkpoint.publish_checkpoint: checksums of every
file, a marker with `"format": "sharded"`, one rename), and `export_checkpoint` (`domainlm
export`) turns it into a plain Hugging Face folder.

Loading is guarded as `torch.load(weights_only=True)` guards training_state.pt: DCP reads
`.metadata` with `pickle.load` and non-tensor values (the optimizer's hyperparameters) with
`torch.load(weights_only=False)`. `SafeReader` unpickles the metadata with an allow-list of
DCP's own metadata classes, and `SafeLoadPlanner` loads the values with `weights_only=True`, so a
crafted checkpoint cannot run code (tests/test_sharded.py).
"""

from __future__ import annotations

import io
import pickle
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from domainlm.errors import UserError
from domainlm.model.loading import DCP_METADATA
from domainlm.run.checkpoint import (
    CHECKPOINT_PREFIX,
    MARKER,
    STATE_FILE,
    checkpoint_problem,
    fresh_tmp_dir,
    publish_checkpoint,
    read_marker,
    record_written,
    rotate_checkpoints,
)

SHARDED = "sharded"

# What DCP's .metadata may name: its own metadata classes, torch's sizes, dtypes and layouts,
# and the path it was written to. Anything else is refused before it is looked up.
ALLOWED_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "TensorProperties",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata and nothing else (pickle's 'restricting globals' pattern)."""

    def find_class(self, module: str, name: str) -> Any:
        if name in ALLOWED_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"checkpoint metadata names {module}.{name}, which a checkpoint never holds"
        )


def _safe_reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.storage import StorageMeta

    class SafeReader(FileSystemReader):
        """DCP's file reader with the metadata unpickled by MetadataUnpickler."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            path = Path(self.path) / DCP_METADATA
            with open(path, "rb") as handle:
                try:
                    metadata = MetadataUnpickler(handle).load()
                except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as exc:
                    raise UserError(f"{path}: not a checkpoint's metadata ({exc})") from exc
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader


def _safe_planner_class() -> type:
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DCP's load planner with non-tensor values loaded as weights only (plain data)."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            from torch.distributed.checkpoint._traverse import set_element as set_nested

            loaded = torch.load(value, map_location="cpu", weights_only=True)
            if self.flatten_state_dict:
                set_nested(
                    self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded
                )
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return SafeLoadPlanner


def dcp_load(state: dict[str, Any], path: Path) -> None:
    """Load `state` (tensors filled in place, values replaced) from a sharded checkpoint, safely."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    reader, planner = _safe_reader_class()(path), _safe_planner_class()()
    reader.read_metadata()  # a refused metadata file is one UserError, before DCP wraps it
    try:
        with single_process_quiet():
            dcp.load(state, storage_reader=reader, planner=planner)
    except CheckpointException as exc:  # a BaseException: one line instead of every rank's trace
        failure = next(iter(exc.failures.values()), exc)
        failure = failure[0] if isinstance(failure, tuple) else failure  # (error, traceback)
        first = (str(failure).strip().splitlines() or [type(failure).__name__])[0]
        raise UserError(f"{path}: cannot load this sharded checkpoint: {first}") from exc


@contextmanager
def single_process_quiet() -> Iterator[None]:
    """DCP warns that it assumes one process when no process group is joined: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to .* single process")
        yield


# ----------------------------------------------------------------------------- format choice


def checkpoint_format(requested: str, model: torch.nn.Module) -> str:
    """--checkpoint-format resolved: auto is sharded when FSDP shards the model, else full."""
    from domainlm.model.distributed import is_sharded

    if requested == "auto":
        return SHARDED if is_sharded(model) else "full"
    return requested


def is_sharded_checkpoint(path: Path) -> bool:
    return read_marker(path).get("format") == SHARDED


# ----------------------------------------------------------------------------- save and load


def save_sharded_checkpoint(
    run: Any, step: int, state: dict[str, Any], eval_perplexity: float | None
) -> None:
    """Every rank writes its shards of the model and optimizer into the temporary folder; rank 0
    adds the config, tokenizer and training state, publishes it and rotates. Every rank calls."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from domainlm.model.distributed import barrier

    ctx, output_dir = run.ctx, run.output_dir
    tmp = output_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
    if ctx.is_main:
        record_written(output_dir, f"{CHECKPOINT_PREFIX}{step}")  # owned before it exists
        fresh_tmp_dir(output_dir, step)
    barrier(ctx)  # the folder exists, empty, before any rank writes into it
    model_state, optim_state = get_state_dict(run.net.model, run.net.optimizer)
    with single_process_quiet():
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
    if ctx.is_main:  # dcp.save returns once every rank's shards and the metadata are written
        run.net.model.config.save_pretrained(tmp)
        run.data.loaded.tokenizer.save_pretrained(tmp)
        torch.save(state, tmp / STATE_FILE)
        data = run.metrics.validation
        publish_checkpoint(output_dir, step, tmp, eval_perplexity, format=SHARDED, validation=data)
        rotate_checkpoints(output_dir, run.config.save_total_limit, run.console.warn, data)
    barrier(ctx)


def load_sharded_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Load a sharded checkpoint's model and optimizer state, whatever the number of ranks that
    wrote it: each rank reads the chunks of its own shards. Call before the first step."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp_load(state, path)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )


def load_sharded_model(path: Path, model: torch.nn.Module) -> None:
    """Load a sharded checkpoint's model state alone (--load-best-model-at-end: the optimizer
    goes no further); each rank reads the chunks of its own shards, as `load_sharded_checkpoint`."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {"model": get_model_state_dict(model)}
    dcp_load(state, path)
    set_model_state_dict(model, state["model"])


# ----------------------------------------------------------------------------- export


def export_checkpoint(checkpoint: Path, out: Path) -> Path:
    """Write checkpoint (full or sharded) as a plain Hugging Face folder `out` (model, tokenizer).

    A LoRA adapter (a LoRA run's checkpoint, or its final folder) is merged into a float32 copy
    of its base (lora.load_merged), as --merge does at the end of a run. The checkpoint's
    checksums are checked first; `out` must not hold files already."""
    from domainlm.model.lora import is_adapter_folder

    adapter = checkpoint.is_dir() and is_adapter_folder(checkpoint)
    if not checkpoint.is_dir():
        problem: str | None = "a file, not a folder" if checkpoint.exists() else "no such folder"
    elif adapter and not (checkpoint / MARKER).exists():
        problem = None  # a LoRA run's final folder: the adapter, no checkpoint marker
    elif (
        not any((checkpoint / n).exists() for n in (MARKER, STATE_FILE, DCP_METADATA))
        and (checkpoint / "config.json").is_file()
    ):
        raise UserError(
            f"{checkpoint} is a model folder already (no checkpoint marker: a finished run's "
            "folder?), which transformers loads as it is; export takes a checkpoint-<step> folder"
        )
    elif not any((checkpoint / n).exists() for n in (MARKER, STATE_FILE, DCP_METADATA)):
        problem = "not a checkpoint folder (no checkpoint.json or training_state.pt in it)"
    else:
        problem = checkpoint_problem(checkpoint)
    if problem:
        raise UserError(f"{checkpoint}: cannot export it: {problem}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder; give a new folder to export to")
    missing = [f for f in (out, *out.parents) if not f.exists()]
    made = missing[-1] if missing else None  # the outermost folder the export makes, if any
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot create {out} ({exc.strerror or exc}); give a folder that can be made"
        ) from exc
    try:
        model, tokenizer = load_for_export(checkpoint, adapter)
        try:
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
        except OSError as exc:
            raise UserError(
                f"cannot write {out} ({exc.strerror or exc}); nothing is left there"
            ) from exc
    except BaseException:
        clear_folder(out, made)
        raise
    return out


def load_for_export(checkpoint: Path, adapter: bool) -> tuple[Any, Any]:
    """The checkpoint's model (a LoRA adapter merged into its base) and tokenizer, on the CPU."""
    from transformers import AutoTokenizer

    from domainlm.model.loading import (
        TOKENIZER_FILES,
        load_model,
        quiet_transformers,
        stored_float_dtype,
    )
    from domainlm.model.lora import load_merged

    quiet_transformers()
    if adapter:
        # A LoRA run's folder without tokenizer files takes its base's, as generate does.
        merged = load_merged(checkpoint)
        if not any((checkpoint / name).is_file() for name in TOKENIZER_FILES):
            return merged.model, merged.tokenizer
        return merged.model, AutoTokenizer.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    if is_sharded_checkpoint(checkpoint):
        return model_from_sharded(checkpoint), tokenizer
    # in the dtype its weights are stored in: a bf16 run's checkpoint exports as bf16
    return load_model(str(checkpoint), dtype=stored_float_dtype(checkpoint)).model, tokenizer


def clear_folder(folder: Path, made: Path | None) -> None:
    """Undo an export into `folder`: remove `made` (the outermost folder it made: `folder` or
    one above it), else empty `folder` (empty before the export, so all inside is the export's)."""
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)
        return
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def model_from_sharded(checkpoint: Path) -> torch.nn.Module:
    """The model of a sharded checkpoint, built from its config.json, weights read by DCP."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_config(config)
    metadata = _safe_reader_class()(checkpoint).read_metadata()
    first = next(k for k in metadata.state_dict_metadata if k.startswith("model."))
    model.to(metadata.state_dict_metadata[first].properties.dtype)
    state = {"model": model.state_dict()}
    dcp_load(state, checkpoint)
    model.load_state_dict(state["model"])
    return model.eval()
