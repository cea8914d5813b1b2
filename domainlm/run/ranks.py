"""What the ranks of a torchrun run must agree on before it trains, checked in set-up.

Each rank reads its own command line and files (on several machines, its own copies), while the
run is one: ranks with other data or flags would train a mix with a schedule each, or stop one
another mid-run ("lost contact"). Here every rank's view is gathered and compared, and a
difference is one line on every rank before anything is trained:
- `check_ranks_agree`: the same training and validation data, tokenizer, model shape and flags;
- `agreed_resume`: the same checkpoint to continue from (every rank reads it);
- `check_shared_output_dir`: for sharded checkpoints, one --output-dir every rank sees (each
  rank writes its shards into it; on a machine's own disk rank 0 published checkpoints missing
  the others' shards).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from domainlm.config import TrainConfig, run_settings, setting_shown
from domainlm.data.tokens import TokenStream, stream_fingerprint
from domainlm.errors import UserError
from domainlm.model.distributed import DistContext, from_every_rank, from_rank_0
from domainlm.run.lock import LOCK_FILE

# A file rank 0 has just written can take a moment to show on another machine of a shared file
# system (NFS caches what a folder lists): how long a rank looks for the lock before it says no.
SHARED_FILE_WAIT_S = 10.0
# Identity entries not compared between ranks: the --model spelling (each machine its own path)
# and the base weights' fingerprint (rank 0 reads the weights, the others receive them), besides
# the training data, compared on their own.
ONLY_RANK_0S = ("model", "base_weights", "train_data")


def ranks_named(ranks: list[int], world_size: int) -> str:
    """`rank 1 of 2`, `ranks 1 and 3 of 4`."""
    if len(ranks) == 1:
        return f"rank {ranks[0]} of {world_size}"
    return f"ranks {', '.join(map(str, ranks[:-1]))} and {ranks[-1]} of {world_size}"


def verb(ranks: list[int], one: str, several: str) -> str:
    return one if len(ranks) == 1 else several


def check_ranks_agree(
    config: TrainConfig,
    ctx: DistContext,
    identity: dict[str, Any],
    valid_stream: TokenStream | None,
) -> None:
    """Every rank has rank 0's training and validation data (by their tokens), tokenizer, block
    size, LoRA settings and flags (less the command's own and the paths: `run_settings`); else
    one UserError on every rank naming the ranks and what differs."""
    if not ctx.enabled:
        return
    mine = {
        "training data": identity.get("train_data"),
        "validation data": stream_fingerprint(valid_stream) if valid_stream is not None else None,
        # not the weights: rank 0 alone reads them and sends them to the others
        "model": {k: v for k, v in identity.items() if k not in ONLY_RANK_0S},
        "settings": run_settings(config.to_dict()),
    }
    every = from_every_rank(mine, ctx)
    first = every[0]
    odd = [rank for rank, view in enumerate(every) if view != first]
    if not odd:
        return
    other = every[odd[0]]
    differs = [part for part in ("training data", "validation data") if other[part] != first[part]]
    if other["model"] != first["model"]:
        differs.append("tokenizer, block size or LoRA settings")
    settings, theirs = first["settings"], other["settings"]
    differs += [
        f"--{key.replace('_', '-')} {setting_shown(theirs.get(key))} "
        f"(rank 0: {setting_shown(settings.get(key))})"
        for key in sorted(set(settings) | set(theirs))
        if settings.get(key) != theirs.get(key)
    ]
    raise UserError(
        f"{ranks_named(odd, ctx.world_size)} {verb(odd, 'runs', 'run')} with other "
        f"{', '.join(differs)} than rank 0: "
        "every rank must run the same command on the same data (compare each machine's files "
        "and command line)"
    )


def agreed_resume(ctx: DistContext, decide: Callable[[], Path | None]) -> Path | None:
    """`decide()` (run/resume.py's `decide_resume`) on every rank, and the ranks agreeing: a
    refusal on any rank is every rank's (rank 0's first), and a rank that finds another
    checkpoint to continue from than rank 0 (its --output-dir is not rank 0's: another
    machine's disk) stops them all with one line, as every rank reads the checkpoint."""
    try:
        found, refusal = decide(), None
    except UserError as error:
        if not ctx.enabled:
            raise
        found, refusal = None, str(error)
    if not ctx.enabled:
        return found
    every = from_every_rank((found.name if found else None, refusal), ctx)
    refused = [(rank, said) for rank, (_, said) in enumerate(every) if said]
    if refused:
        rank, said = refused[0]
        raise UserError(said if rank == 0 else f"rank {rank} of {ctx.world_size}: {said}")
    names = [name for name, _ in every]
    odd = [rank for rank, name in enumerate(names) if name != names[0]]
    if not odd:
        return found
    theirs = names[odd[0]]
    raise UserError(
        f"rank 0 {f'resumes from {names[0]}' if names[0] else 'starts at step 0'}, but "
        f"{ranks_named(odd, ctx.world_size)} {verb(odd, 'finds', 'find')} "
        f"{theirs or 'no checkpoint'} in {verb(odd, 'its', 'their')} --output-dir (another "
        "machine's disk?): every rank reads the checkpoint the run continues from, so every "
        "machine needs the same folder: put --output-dir on a file system they share, or copy "
        "rank 0's to the others first"
    )


def writes_sharded_checkpoints(config: TrainConfig, ctx: DistContext) -> bool:
    """Whether every rank writes into the checkpoints: --checkpoint-format sharded, or auto
    under --strategy fsdp (run/sharded.py's `checkpoint_format`), with several ranks."""
    sharded = config.checkpoint_format == "sharded" or (
        config.checkpoint_format == "auto" and config.strategy == "fsdp"
    )
    return ctx.enabled and sharded


def check_shared_output_dir(config: TrainConfig, ctx: DistContext, output_dir: Path) -> None:
    """With sharded checkpoints, every rank sees rank 0's --output-dir (its lock, just taken,
    read alike on every rank); else one UserError on every rank before anything is trained."""
    if not writes_sharded_checkpoints(config, ctx):
        return
    lock = output_dir / LOCK_FILE
    expected = from_rank_0(lock.read_text() if ctx.is_main else None, ctx)
    deadline = time.monotonic() + SHARED_FILE_WAIT_S
    while not (sees := _reads(lock) == expected) and time.monotonic() < deadline:
        time.sleep(0.5)
    blind = [rank for rank, saw in enumerate(from_every_rank(sees, ctx)) if not saw]
    if blind:
        raise UserError(
            f"{ranks_named(blind, ctx.world_size)} {verb(blind, 'does', 'do')} not see "
            f"--output-dir {output_dir} as rank 0 writes it (another machine's disk?): with sharded checkpoints (--strategy fsdp) "
            "each rank writes its shards there, so it must be one folder on a file system every "
            "machine shares; use one, or --checkpoint-format full (rank 0 writes each checkpoint "
            "whole)"
        )


def _reads(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None
