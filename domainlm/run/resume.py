"""Which run an output folder holds, and where a run started on it goes on.

`run_config.json` (the run file) records a run's identity (model, tokenizer, block layout, LoRA
settings, a fingerprint of its training tokens), its settings, the files it wrote and, once its
final model is written, `finished`. From it: the checkpoint to resume from (`decide_resume`),
refusals of another run's folder or an earlier checkpoint with later ones beside it
(`check_same_run`, `later_checkpoints`), and `--overwrite-output-dir`'s removal of an earlier
run's files, after every check (`clear_earlier_run`). docs/reliability.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from domainlm.config import (
    TRAIN_DATA_FILE,
    TRAINING_SETTINGS,
    TrainConfig,
    setting_shown,
    valid_history,
)
from domainlm.data.tokens import TokenStream, stream_fingerprint
from domainlm.errors import UserError
from domainlm.model.distributed import DistContext
from domainlm.run.checkpoint import (
    CHECKPOINT_PREFIX,
    MERGED_FILES_KEY,
    RUN_FILE,
    checkpoint_dirs_by_step,
    checkpoint_problem,
    foreign_inside,
    foreign_outputs,
    is_run_file,
    owned_entries,
    read_run_file,
    remove_owned_files,
    write_json_atomic,
)
from domainlm.run.lock import LOCK_FILE
from domainlm.run.metrics import Console

# What makes a checkpoint resumable by a run: the same model, tokenizer, block layout, seed
# (the blocks' order; checked before the data: without --validation-file it also picks the
# held-out split) and training data.
# A LoRA run also records its base's weights (`base_weights`, model/loading.py's
# `weights_fingerprint`): its adapter goes on top of them, read again from --model on resume.
RESUME_KEYS = (
    "model", "base_weights", "tokenizer", "block_size", "packing", "lora", "seed", "train_data",
)  # fmt: skip


def newest_owned_step(output_dir: Path) -> int:
    """The step of the newest checkpoint domainlm wrote here (0 if none). An --epochs run resumed
    at another global batch counts its steps left from the checkpoint's data position
    (schedule.steps_from_position), up to the whole run's count at the new batch: its last step
    is at most this step plus that count."""
    names = [name for name in owned_entries(output_dir) if name.startswith(CHECKPOINT_PREFIX)]
    steps = [name[len(CHECKPOINT_PREFIX) :] for name in names]
    return max((int(step) for step in steps if step.isdigit()), default=0)


def decide_resume(
    config: TrainConfig,
    output_dir: Path,
    identity: dict[str, Any],
    console: Console,
    ctx: DistContext | None = None,
    total_steps: int = 0,
) -> Path | None:
    """The checkpoint to continue from, or None to start afresh. Refuses to clobber other runs
    (or, with --overwrite-output-dir, another tool's files this run of `total_steps` steps would
    write over); removes nothing. Every rank calls this: with --overwrite-output-dir every rank
    checks the run file's names, so a bad one stops all ranks alike."""
    from domainlm.model.distributed import SINGLE

    ctx = ctx or SINGLE
    if config.resume not in ("auto", "never"):
        path = Path(config.resume)
        problem = (
            checkpoint_problem(path)
            if path.is_dir()
            else ("a file, not a checkpoint folder" if path.exists() else "no such folder")
        )
        if problem:
            raise UserError(f"--resume {config.resume}: cannot resume from it: {problem}")
        check_same_run(path.parent, identity, f"checkpoint {path}", OTHER_RESUME)
        later = later_checkpoints(path, output_dir)
        if later:
            raise UserError(
                f"--resume {config.resume}: --output-dir {output_dir} holds later checkpoints of "
                f"that run ({', '.join(p.name for p in later)}); going on from an earlier one "
                "there would mix two histories in one folder: copy the checkpoint to another "
                "--output-dir and resume there, or remove the later checkpoints first"
            )
        return path
    if config.overwrite_output_dir:
        owned_entries(output_dir)  # on every rank: a bad run file stops all ranks alike
        foreign = foreign_outputs(output_dir, total_steps) + foreign_inside(output_dir)
        if foreign:
            raise UserError(
                f"--output-dir {output_dir} holds {', '.join(foreign)}, which domainlm did not "
                "write and this run would write over or delete; --overwrite-output-dir replaces "
                "only an earlier domainlm run's files: move them away or choose another "
                "--output-dir"
            )
        return None  # its files are removed once the run's last check passed: clear_earlier_run
    if not output_dir.is_dir() or not any(p.name != LOCK_FILE for p in output_dir.iterdir()):
        return None
    run = read_run_file(output_dir)
    if not is_run_file(run):
        raise UserError(
            f"--output-dir {output_dir} is not empty and holds no domainlm run; choose an empty "
            "folder (or pass --overwrite-output-dir to write beside its files)"
        )
    check_same_run(output_dir, identity, f"--output-dir {output_dir}")
    last_step = total_steps + (0 if config.max_steps else newest_owned_step(output_dir))
    foreign = foreign_outputs(output_dir, last_step)  # a user's checkpoint-N, model files
    if foreign:
        raise UserError(
            f"--output-dir {output_dir} holds {', '.join(foreign)}, which domainlm did not write "
            "and this run would write over: move them away or choose another --output-dir"
        )
    if config.resume == "never":
        raise UserError(
            f"--output-dir {output_dir} holds an earlier run; pass --overwrite-output-dir to start "
            "afresh or --resume auto to continue it"
        )
    for candidate in reversed(checkpoint_dirs_by_step(output_dir)):  # newest first, marked or not
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate
        console.warn(f"skipping {candidate.name}: {problem}")
    # Killed before its first checkpoint: the same run starts again from step 0.
    console.warn(f"--output-dir {output_dir}: no complete checkpoint to resume; starting at step 0")
    return None


def clear_earlier_run(
    config: TrainConfig, output_dir: Path, console: Console, ctx: DistContext | None = None
) -> None:
    """--overwrite-output-dir: the earlier run's files removed (those its run file names, which
    `decide_resume` checked), by rank 0 alone while the others wait at a barrier."""
    from domainlm.model.distributed import SINGLE, barrier

    if not config.overwrite_output_dir or config.resume not in ("auto", "never"):
        return
    ctx = ctx or SINGLE
    if ctx.is_main:
        removed = remove_owned_files(output_dir)
        if removed:
            console.info(
                f"--overwrite-output-dir: removed {len(removed)} entries of an earlier run"
            )
    barrier(ctx)  # nobody reads the folder while rank 0 empties it


# What to do when the run found is another run's, by where it was found.
OTHER_OUTPUT_DIR = "use another --output-dir or pass --overwrite-output-dir"
OTHER_RESUME = "pass --resume a checkpoint of a run with this command's settings (or drop --resume)"


def check_same_run(
    folder: Path, identity: dict[str, Any], what: str, remedy: str = OTHER_OUTPUT_DIR
) -> None:
    """`folder`'s run (run_config.json) is this command's: same model, data, block, LoRA...;
    else a UserError ending with `remedy`."""
    run = read_run_file(folder) or {}
    saved = run.get("identity", {})
    for key in RESUME_KEYS:
        if key == "lora" and key not in saved and "model" in saved:
            saved = {**saved, "lora": None}  # a run from before LoRA trained every weight
        if key == "model" and same_folder(saved.get(key), identity[key]):
            continue  # one folder, spelled another way (`./base/`, an absolute path)
        if key == "base_weights" and None in (saved.get(key), identity.get(key)):
            continue  # not known on one side (a run from before it was recorded, a hub model)
        if key in saved and saved[key] != identity.get(key):
            if key == "base_weights":
                raise UserError(
                    f"{what} belongs to a LoRA run whose base weights were other than those in "
                    f"{identity['model']} now (its weight files changed since): the adapter "
                    "goes on top of the weights it was trained on; restore them to continue, "
                    f"else {remedy}"
                )
            if key == "train_data":
                raise UserError(
                    f"{what} belongs to a run on other training data (the tokens of "
                    "--train-file differ: another file, other contents, or another --doc-sep), "
                    "so its checkpoint's place in the data means nothing here; to go on training "
                    "its model on this data start a new run with --model set to its last "
                    f"checkpoint, else {remedy}"
                )
            if key == "lora":
                was = lora_flags(saved[key])
                way = f"give {was} again" if saved[key] else "drop --lora"
                raise UserError(
                    f"{what} belongs to a run trained with {was}, and this command has "
                    f"{lora_flags(identity[key])}; to continue that run {way}, else {remedy}"
                )
            if key == "seed":
                raise UserError(
                    f"{what} belongs to a run with --seed {saved[key]}, and this command has "
                    f"--seed {identity[key]}: the order of the blocks in each epoch comes from "
                    f"it; to continue that run give --seed {saved[key]} again, else {remedy}"
                )
            if key == "tokenizer":  # its fingerprint: the ids a text gets, and each end token
                raise UserError(
                    f"{what} belongs to a run whose tokenizer gave other token ids (its files, "
                    "or the end-of-document token: --eos-token, changed since); to continue that "
                    f"run give the model and --eos-token it had, else {remedy}"
                )
            raise UserError(
                f"{what} belongs to a run with another {key} ({saved[key]} vs {identity[key]}); "
                f"{remedy}"
            )


def same_folder(recorded: object, spec: str) -> bool:
    """`recorded` (a run file's --model) and `spec` name one existing local folder."""
    if not isinstance(recorded, str) or recorded == spec:
        return False
    first, second = Path(recorded).expanduser(), Path(spec).expanduser()
    return first.is_dir() and second.is_dir() and first.resolve() == second.resolve()


def later_checkpoints(checkpoint: Path, output_dir: Path) -> list[Path]:
    """The checkpoints of `output_dir` after `checkpoint`'s step, when `checkpoint` is one of
    that folder's (a run resumed from an earlier step would write over their history)."""
    if checkpoint.resolve().parent != output_dir.resolve():
        return []
    step = checkpoint.name[len(CHECKPOINT_PREFIX) :]
    if not step.isdigit():
        return []
    return [
        p
        for p in checkpoint_dirs_by_step(output_dir)
        if int(p.name[len(CHECKPOINT_PREFIX) :]) > int(step)
    ]


def lora_flags(settings: dict[str, Any] | None) -> str:
    """A run identity's LoRA settings as the flags that give them ("no --lora" for none)."""
    if not settings:
        return "no --lora"
    targets = " ".join(settings.get("targets") or [])
    return (
        f"--lora --lora-r {settings.get('r')} --lora-alpha {settings.get('alpha')} "
        f"--lora-dropout {settings.get('dropout')} --lora-targets {targets}"
    )


def train_data_file(train_file: str) -> dict[str, str]:
    """The run file's record of --train-file: its absolute path (the run's own spelling may be
    relative to a folder another command is not in; what is in it is the identity's
    train_data)."""
    return {"path": str(Path(train_file).resolve())}


def write_run_file(
    output_dir: Path,
    config: TrainConfig,
    identity: dict[str, Any],
    written: list[str],
    finished: dict[str, Any] | None = None,
    history: list[dict[str, Any]] | None = None,
    precision: str | None = None,
    merged_files: list[str] | None = None,
    train_data_file: dict[str, str] | None = None,
) -> None:
    """run_config.json: the run's identity, settings (the latest command's), owned files and
    `history` (the settings changed on resume, `resume_history`; None keeps the file's);
    `precision`, what the latest command computed in (`--precision auto` resolved: `perplexity`
    names a difference; None keeps the file's); `merged_files`, the names a LoRA merge wrote into
    merged/ (`foreign_inside`; None keeps the file's); `train_data_file`, where the training data
    is (TRAIN_DATA_FILE: what `generate --check-memorization` of the run reads; None keeps the
    file's); `finished` only once the final model,
    eval_results.json and the report are written (a run started again with the same settings
    and data then does nothing: `finished_result`)."""
    previous = read_run_file(output_dir) or {}
    owned = sorted(set(previous.get("written", [])) | set(written) | {"metrics.jsonl"})
    run = {"identity": identity, "config": config.to_dict(), "written": owned}
    precision = precision or previous.get("precision")
    run = {**run, "precision": precision} if isinstance(precision, str) else run
    merged_files = previous.get(MERGED_FILES_KEY) if merged_files is None else merged_files
    run = {**run, MERGED_FILES_KEY: merged_files} if isinstance(merged_files, list) else run
    train_data_file = train_data_file or previous.get(TRAIN_DATA_FILE)
    run = {**run, TRAIN_DATA_FILE: train_data_file} if isinstance(train_data_file, dict) else run
    history = valid_history(previous.get("history")) if history is None else history
    run = {**run, "history": history} if history else run
    write_json_atomic(output_dir / RUN_FILE, {**run, "finished": finished} if finished else run)


# The number of processes training (torchrun's ranks), in a history beside the settings: it
# multiplies the global batch as --batch-size and --grad-accum do.
RANKS = "ranks"
GLOBAL_BATCH = ("batch_size", "grad_accum", RANKS)


def resume_history(
    previous: dict[str, Any] | None,
    config: TrainConfig,
    step: int,
    ranks: tuple[int | None, int] = (None, 1),
) -> tuple[list[dict[str, Any]], dict[str, list[Any]]]:
    """The run file's history for a run resumed at `step`, and what this command changes there.

    The history lists, by step, the training settings (config.TRAINING_SETTINGS) a resumed run
    changed, and `ranks`, the processes (the checkpoint's, this command's; the first None where
    unknown): `{"step": 500, "changed": {"lr": [5e-05, 0.0001]}}` (before, after). Entries after
    `step` (a run resumed from an earlier checkpoint trains those steps again) are dropped and
    their changes undone, so "before" is what trained up to `step`; a second change at the same
    step joins the first, and a setting set back to its value is no change."""
    previous = previous if isinstance(previous, dict) else {}
    before = dict(previous.get("config") or {})
    if ranks[0] is not None:
        before[RANKS] = ranks[0]
    history = valid_history(previous.get("history"))
    kept = [entry for entry in history if entry["step"] <= step]
    for entry in reversed(history[len(kept) :]):  # undone, latest first: retrained from `step`
        for key, (old, _) in entry["changed"].items():
            before[key] = old
    if not before:
        return kept, {}
    after = {**config.to_dict(), RANKS: ranks[1]}
    keys = (*TRAINING_SETTINGS, RANKS)
    changed = {key: [before[key], after.get(key)] for key in keys if key in before}
    if kept and kept[-1]["step"] == step:  # resumed again at the same step: one change
        for key, (old, _) in kept.pop()["changed"].items():
            changed[key] = [old, after.get(key)]
    changed = {key: pair for key, pair in changed.items() if pair[0] != pair[1]}
    return kept + ([{"step": step, "changed": changed}] if changed else []), changed


def changes_shown(changed: dict[str, list[Any]]) -> str:
    """`--lr 5e-05 -> 0.0001, --batch-size 8 -> 4, ranks 2 -> 1`, for a message."""
    return ", ".join(
        f"{'' if key == RANKS else '--'}{key.replace('_', '-')} {setting_shown(before)} -> "
        f"{setting_shown(after)}"
        for key, (before, after) in changed.items()
    )


def global_batch_change(changed: dict[str, list[Any]], now: dict[str, int]) -> tuple[int, int]:
    """The global batch (blocks a step: batch size x accumulation x ranks) before and after the
    `changed` settings; `now` holds this command's three."""
    before = after = 1
    for key in GLOBAL_BATCH:
        before *= int(changed[key][0] if key in changed else now[key])
        after *= int(now[key])
    return before, after


def finish_marker(done: int, total_steps: int, valid_stream: TokenStream) -> dict[str, Any]:
    """What a finished run records: its last step (`done`; before `total_steps` when
    --early-stopping-patience ended it) and the validation data it was scored on."""
    marker = {"step": done, "validation": stream_fingerprint(valid_stream)}
    return {**marker, "stopped_early": True} if done < total_steps else marker
