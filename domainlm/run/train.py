"""The training run: `train()` sets the run up, runs its step loop, and finishes it.

Read top to bottom: `train` (processes and cleanup), `set_up` (check the inputs and load the data
before anything is written or any weights read, stop there for a finished run, decide the resume
(resume.py), read the weights, build the model, restore the state), `fit` (the step loop: one
optimizer step, step.py, then the parts that act at step boundaries, boundaries.py), `finish`
(the model folder and the results). A new kind of model (an adapter) changes `build_model`; a new
kind of step changes step.py; neither touches the loop.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from domainlm.config import TrainConfig, run_settings
from domainlm.data.blocks import BlockDataset, split_documents
from domainlm.data.corpus import check_input
from domainlm.data.lint import check_training_data, unknown_token
from domainlm.data.packing import check_packing_support
from domainlm.data.tokens import TokenStream, load_token_stream, stream_fingerprint
from domainlm.errors import TrainingAborted, UserError
from domainlm.evaluation.windows import NLLSum, check_window
from domainlm.model.device import pick_device, prefer_expandable_cuda_segments, resolve_precision
from domainlm.model.distributed import (
    DistContext,
    all_reduce_sum,
    from_rank_0,
    weights_from_rank_0,
)
from domainlm.model.fastpath import use_fast_kernels
from domainlm.model.loading import (
    LoadedModel,
    load_model,
    special_token_texts,
    tokenizer_fingerprint,
    weights_fingerprint,
)
from domainlm.model.lora import (
    MERGED_DIR,
    LoraSettings,
    attach_lora,
    base_record,
    lora_identity,
    rank_above_width,
    save_adapter,
    save_merged,
    trainable_count,
)
from domainlm.model.loss import CausalLMLoss
from domainlm.model.malloc import reuse_freed_host_memory
from domainlm.model.memory import enable_gradient_checkpointing, load_dtype_for, pure_half_warning
from domainlm.run import guard
from domainlm.run.async_save import background_writer
from domainlm.run.best_model import BestModel, restore_best_model
from domainlm.run.boundaries import Checkpoints, Evaluation, Progress, Sampling, StopGuard
from domainlm.run.checkpoint import (
    EVAL_RESULTS_FILE,
    best_checkpoint,
    check_output_dir,
    foreign_inside,
    list_checkpoints,
    load_training_state,
    owned_entries,
    publish_final_files,
    read_run_file,
    record_written,
    remove_owned_files,
    staging_for_final_files,
)
from domainlm.run.diskspace import (
    check_run_disk_space,
    estimate_checkpoint,
    model_folder_write,
    run_out_of_space,
    says_out_of_space,
)
from domainlm.run.lock import RunLock
from domainlm.run.memory_check import check_run_memory
from domainlm.run.metrics import Console, MetricsLog, initial_perplexity
from domainlm.run.ranks import agreed_resume, check_ranks_agree, check_shared_output_dir
from domainlm.run.report import data_summary, write_run_report
from domainlm.run.resume import (
    GLOBAL_BATCH,
    RANKS,
    changes_shown,
    clear_earlier_run,
    decide_resume,
    finish_marker,
    global_batch_change,
    resume_history,
    same_folder,
    train_data_file,
    write_run_file,
)
from domainlm.run.schedule import count_steps, schedule_rate, steps_from_position
from domainlm.run.sharded import is_sharded_checkpoint, load_sharded_checkpoint
from domainlm.run.state import DataCursor, Run, RunData, RunModel
from domainlm.run.step import TrainStep
from domainlm.run.trackers import Trackers, resolve_report_to, tracker_outputs
from domainlm.text.generate import SAMPLES_FILE, TrainingSampler, encode_prompts


@dataclass
class TrainResult:
    """What a finished run reports (also written to eval_results.json)."""

    output_dir: Path
    steps: int
    initial_perplexity: float | None
    final_perplexity: float | None
    eval_tokens: int
    train_tokens: int
    train_runtime: float
    best_checkpoint: Path | None
    resumed_from: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    stopped_early: bool = False  # --early-stopping-patience ended it before its last step
    model_step: int | None = None  # --load-best-model-at-end: the checkpoint the model is


def train(config: TrainConfig) -> TrainResult:
    """Fine-tune `config.model` on `config.train_file`; write checkpoints, metrics and the model."""
    from domainlm.model.distributed import rank_lost, setup_distributed, teardown_distributed

    reuse_freed_host_memory()  # no page faults for each step's large blocks (model/malloc.py)
    prefer_expandable_cuda_segments()  # before anything touches CUDA
    ctx = setup_distributed(config.dist_timeout, config.device, config.strategy)
    cleanup = ExitStack()  # the run lock and the signal handlers, released on every exit
    try:
        guard.note_run_flags(config.overwrite_output_dir, config.resume)  # for the stop lines
        cleanup.enter_context(guard.SetUpSignals())  # SIGTERM before the loop's StopGuard
        run = set_up(config, ctx, cleanup)
        if isinstance(run, TrainResult):
            return run
        cleanup.callback(run.loggers.close, failed=True)  # a no-op after finish closed them
        return fit(run, cleanup)
    except OSError as exc:  # a write outside a checkpoint or the model folder (metrics.jsonl)
        if not says_out_of_space(exc):
            raise
        raise run_out_of_space(exc, Path(config.output_dir)) from exc
    except (RuntimeError, torch.distributed.DistError) as exc:
        lost = rank_lost(exc, ctx)  # another rank died or timed out: one clear line, not a trace
        if lost is None:
            raise
        raise lost from exc
    finally:
        cleanup.close()
        teardown_distributed(ctx)


def fit(run: Run, cleanup: ExitStack) -> TrainResult:
    """The step loop: one optimizer step, then each part that acts at a step boundary."""
    evaluation = Evaluation(run)
    initial = evaluation.initial()
    started = time.perf_counter()
    progress = Progress(run)  # the loss window, metrics.jsonl, the progress bar
    checkpoints = Checkpoints(run, progress, evaluation, background_writer(run, cleanup))
    step = TrainStep(run, last_saved=lambda: checkpoints.last_saved)
    stop = StopGuard(run, cleanup, checkpoints, progress)  # handlers installed from here on
    sampling = Sampling(run.sampler)
    done = run.start_step  # the run's last step, once the loop is over
    last = run.start_step if evaluation.stopped_at_start() else run.total_steps
    if last < run.total_steps:
        run.console.info(f"the run stopped early at step {last} (--early-stopping-patience)")
    for index in range(run.start_step, last):
        outcome = step(index)
        progress.after_step(outcome)
        with progress.paused():  # the parts' time is not training time
            evaluation.after_step(outcome)
        if evaluation.stops_run(outcome):  # --early-stopping-patience: this step is the last
            outcome = replace(outcome, final=True)
            progress.end_early(outcome)
        with progress.paused():
            checkpoints.after_step(outcome)
            sampling.after_step(outcome)
        guard.step_delay()  # fault injection: tests slow a run down to signal it mid-way
        stop.after_step(outcome)
        done = outcome.done
        if outcome.final:
            break
    progress.close()
    stop.finishing = True  # a signal from here on lets the final save finish
    runtime = time.perf_counter() - started
    final = evaluation.final(done)
    checkpoints.wait()  # the final model is saved once the last checkpoint is published
    best = None
    if run.config.load_best_model_at_end:  # the best checkpoint's weights and whole-set score
        best = restore_best_model(run, done, final, evaluation)
    refuse_diverged_model(run, done, best.result if best else final)
    totals = run.resumed_totals  # the whole run's, when it was resumed
    runtime += float(totals.get("seconds", 0.0))
    tokens = int(totals.get("tokens", 0)) + progress.tokens_seen
    return finish(run, done, final, initial, checkpoints.last_saved, runtime, tokens, best)


def refuse_diverged_model(run: Run, done: int, result: NLLSum) -> None:
    """Stop (exit 3) instead of saving a model whose validation perplexity is NaN/Inf: the
    weights are finite but its outputs overflow (a diverged run's last steps can be skipped as
    bad without reaching --max-bad-steps). Its checkpoints stay; the message names the best."""
    if math.isfinite(result.perplexity):
        return
    best = (
        best_checkpoint(list_checkpoints(run.output_dir), run.metrics.validation)
        if run.ctx.is_main
        else None
    )
    where = f"the best checkpoint is {best.path}" if best else "no checkpoint has a finite one"
    raise TrainingAborted(
        f"the model of step {done} scores a validation perplexity of {result.perplexity} (the "
        f"training diverged) and was not saved; {where}. Lower --lr",
        exit_code=guard.BAD_STEPS_EXIT,
    )


# ----------------------------------------------------------------------------- set-up


def set_up(config: TrainConfig, ctx: DistContext, cleanup: ExitStack) -> Run | TrainResult:
    """Check the inputs and load the data (nothing written, no weights read yet); for a run that
    finished with these settings and data already, its result; else read the weights, clear an
    earlier run (--overwrite-output-dir), build the model and restore the state."""
    device = pick_device(ctx.local_rank if ctx.enabled else None, config.device)
    if device.type == "cuda":  # metrics.jsonl's peak_gpu_memory_gib: this run's, not the process's
        torch.cuda.reset_peak_memory_stats(device)
    precision = resolve_precision(config.precision, device)
    console = Console(enabled=ctx.is_main, quiet=config.quiet)
    lora = bool(getattr(config, "lora", False))
    load_dtype = load_dtype_for(config.load_dtype, precision, lora)  # model/memory.py
    warning = pure_half_warning(load_dtype, lora)
    if warning:
        console.warn(warning)
    data = check_inputs(config, ctx, console, cleanup, device, precision)
    done = finished_result(config, ctx, device, console, data)
    if done is not None:  # the same command on a finished run: nothing read, evaluated or written
        return done
    output_dir = Path(config.output_dir)
    total_steps = count_steps(config, ctx.world_size, len(data.dataset))[1]
    data.resume_from = agreed_resume(  # every rank continues from the same checkpoint
        ctx, lambda: decide_resume(config, output_dir, data.identity, console, ctx, total_steps)
    )
    if not weights_from_rank_0(ctx) or ctx.is_main:  # else on meta, filled from rank 0
        data.loaded.model = load_weights(config, data.resume_from, load_dtype)
    if config.packing == "docs":  # runs the model: refused before anything is removed
        check_packed_documents(data.loaded.model, config, ctx, device)
    clear_earlier_run(config, output_dir, console, ctx)  # --overwrite-output-dir
    net = build_model(config, data, ctx, device, precision)
    return start_state(config, ctx, device, precision, console, data, net)


def check_inputs(
    config: TrainConfig,
    ctx: DistContext,
    console: Console,
    cleanup: ExitStack,
    device: torch.device,
    precision: str,
) -> RunData:
    """Every input checked and the data loaded before anything in output_dir is written, and
    before any weights are read (the model is its config's, on the meta device); takes the run
    lock. The checkpoint to resume from is decided after (`decide_resume`)."""
    output_dir = Path(config.output_dir)
    check_input(config.train_file, config.text_column)
    if config.validation_file:
        check_input(config.validation_file, config.text_column)
    check_output_dir(output_dir)
    check_not_a_data_folder(config, output_dir)
    resolve_report_to(config.report_to)  # --report-to: known trackers, each installed
    loaded = load_model(
        config.model,
        seed=config.seed,
        eos_token=config.eos_token,
        trust_remote_code=config.trust_remote_code,
        weights=False,  # the tokenizer and the shapes: the weights are read by load_weights
    )
    block_size = loaded.block_size(config.block_size, default_cap=1024)
    eval_stride = config.eval_stride or block_size - 1
    check_window(block_size, eval_stride, stride_flag="--eval-stride")
    if config.sample_prompts:  # one too long for the context: refused now, not at its sample
        encode_prompts(loaded.tokenizer, config.sample_prompts, len(loaded.start_ids),
                       loaded.context_length, what="--sample-prompts: prompt")  # fmt: skip
    # The memory plan of these settings against the memory free: a warning (--strict: an error)
    # once the block size is known good, before the data is tokenized and the weights load
    # (run/memory_check.py).
    check_run_memory(config, ctx, device, precision, console.warn)
    identity = {
        "model": config.model,
        "tokenizer": tokenizer_fingerprint(loaded.tokenizer, loaded.eos_id, loaded.document_prefix),
        "block_size": block_size,
        "packing": config.packing,
        "lora": lora_identity(config, loaded.model),  # None for full fine-tuning
        "seed": config.seed,  # the order of the blocks in every epoch
    }
    if config.lora:  # an adapter goes on top of the weights it trained on: the base's, read again
        identity["base_weights"] = weights_fingerprint(config.model)
        wasted = rank_above_width(loaded.model, identity["lora"]["targets"], config.lora_r)
        if wasted:  # inspect's memory plan says the same (MemoryPlan.lora_rank_warning)
            console.warn(wasted)
    # Data errors (empty, binary, invalid UTF-8) come before anything in output_dir is touched.
    train_stream, valid_stream = load_streams(config, loaded, identity["tokenizer"], console)
    identity["train_data"] = stream_fingerprint(train_stream)  # a resume reads the same blocks
    check_ranks_agree(config, ctx, identity, valid_stream)  # torchrun: one command, one data
    # Data lint (domainlm/data/lint.py): warnings, or with --strict an error before any write.
    lint_warnings = check_training_data(
        config, block_size, train_stream, valid_stream, console,
        special_token_texts(loaded.tokenizer), unknown_token(loaded.tokenizer, loaded.eos_id),
    )  # fmt: skip
    if ctx.is_main:  # one run per output dir; taken before the run file is read
        cleanup.enter_context(RunLock(output_dir))
    check_shared_output_dir(config, ctx, output_dir)  # sharded checkpoints: one folder for all
    dataset = BlockDataset(train_stream, block_size, config.packing)
    return RunData(
        loaded, identity, block_size, eval_stride, train_stream, valid_stream, dataset,
        resume_from=None, lint_warnings=lint_warnings,
    )  # fmt: skip


def check_not_a_data_folder(config: TrainConfig, output_dir: Path) -> None:
    """Refuse an --output-dir that is the --train-file or --validation-file folder: the run's
    own files (metrics.jsonl, ...) would be read as data by the next command (a run folder
    inside a data folder is left out of it, corpus.text_files)."""
    files = (("--train-file", config.train_file), ("--validation-file", config.validation_file))
    for flag, data in files:
        folder = Path(data).expanduser() if data else None
        if folder and folder.is_dir() and folder.resolve() == output_dir.expanduser().resolve():
            raise UserError(
                f"--output-dir {output_dir} is the {flag} folder: the run's own files "
                "(metrics.jsonl, ...) would be read as data next time; choose another folder "
                "(one inside the data folder is left out of the data)"
            )


def load_weights(
    config: TrainConfig, resume_from: Path | None, load_dtype: torch.dtype
) -> torch.nn.Module:
    """The weights the run starts from, read once it has something to do, in `load_dtype`:
    for full fine-tuning resumed from a checkpoint saved whole, that checkpoint's alone (the
    model's own are never read); otherwise the model's (a LoRA run's base, which its adapters'
    checkpoint goes on top of; a sharded checkpoint's shards load into it later)."""
    source = config.model
    if not config.lora and resume_from is not None and not is_sharded_checkpoint(resume_from):
        source = str(resume_from)
    return load_model(
        source,
        seed=config.seed,
        eos_token=config.eos_token,
        trust_remote_code=config.trust_remote_code,
        dtype=load_dtype,
    ).model


def check_packed_documents(
    model: torch.nn.Module, config: TrainConfig, ctx: DistContext, device: torch.device
) -> None:
    """`--packing docs`' proof that the model separates packed documents (it runs the model):
    on every rank, or where rank 0 alone holds the weights, on rank 0, and the other ranks stop
    with it."""
    if not weights_from_rank_0(ctx):
        check_packing_support(model)
        return
    refused = None
    if ctx.is_main:
        try:
            check_packing_support(model)
        except UserError as exc:
            refused = exc
    (count,) = all_reduce_sum([float(refused is not None)], ctx, device)
    if refused is not None:
        raise refused
    if count:
        raise UserError(
            "--packing docs: refused on rank 0 (its message says why); use --packing concat"
        )


def build_model(
    config: TrainConfig, data: RunData, ctx: DistContext, device: torch.device, precision: str
) -> RunModel:
    """The model (the checkpoint's weights on resume) on its device in train mode, with fast
    kernels, the loss around it, compiled if asked, wrapped for DDP/FSDP, and its optimizer.
    Under torchrun the weights are rank 0's, sent to the others (`weights_from_rank_0`)."""
    from domainlm.model.distributed import (
        empty_on,
        fill_shards_from_rank_0,
        take_rank_0_dtypes,
        wrap_model,
    )

    loaded = data.loaded
    from_rank_0 = weights_from_rank_0(ctx)
    receives = from_rank_0 and not ctx.is_main  # its model is on meta until rank 0's arrives
    if config.lora:  # the base frozen in the run's precision, adapters on top (model/lora.py)
        loaded.model = attach_lora(
            loaded.model,  # loaded in the run's precision (--load-dtype auto, model/memory.py)
            LoraSettings.from_config(config),  # type: ignore[arg-type]
            seed=config.seed,
            base_name=base_record(config.model),
            resume_from=None if receives else data.resume_from,  # rank 0's adapters arrive
        )
    # from_pretrained returns a model in eval mode: dropout must be on while training, in a
    # fresh run from a folder as in a resumed one (else resume is not exact).
    model = loaded.model.train()
    if from_rank_0:  # the other ranks' model is rank 0's on meta: its dtypes first
        take_rank_0_dtypes(model, ctx)
    sharded = config.strategy == "fsdp" and ctx.enabled
    if not sharded:  # FSDP moves each unit to the device as it shards it (wrap_model)
        # DDP broadcasts rank 0's parameters and buffers when it wraps the model
        model = empty_on(model, device) if receives else model.to(device)
    if config.packing == "concat":
        model.config.use_cache = False
    use_fast_kernels(model)  # same function, fused kernels (domainlm/model/fastpath.py)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)  # model/memory.py
    loss_module = CausalLMLoss(model.get_base_model() if config.lora else model)
    if config.compile:
        compile_model(loss_module)
    fills = from_rank_0 and sharded
    whole = model.state_dict() if fills and ctx.is_main else {}  # the weights rank 0 read
    train_module = wrap_model(loss_module, ctx, device, config.strategy, precision)
    if fills:  # the other ranks' shards are on meta until here
        fill_shards_from_rank_0(model, whole, ctx, device)
        del whole
    optimizer = make_optimizer(model, config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    return RunModel(model, loss_module, train_module, optimizer, scaler)


def start_state(
    config: TrainConfig,
    ctx: DistContext,
    device: torch.device,
    precision: str,
    console: Console,
    data: RunData,
    net: RunModel,
) -> Run:
    """The step count, the data position and optimizer state (a checkpoint's on resume), and the
    run's outputs opened: the run file, metrics.jsonl, the loggers, the sampler."""
    from domainlm.model.distributed import load_optimizer_state

    steps_per_epoch, total_steps = count_steps(config, ctx.world_size, len(data.dataset))
    cursor, start_step = DataCursor(), 0
    resumed_window: dict[str, float] = {}  # the loss window open at the checkpoint
    resumed_totals: dict[str, float] = {}  # the run's tokens and seconds up to the checkpoint
    resumed_ranks: int | None = None  # the processes that trained up to the checkpoint
    if data.resume_from is not None:
        state = load_training_state(data.resume_from)
        if is_sharded_checkpoint(data.resume_from):  # weights and optimizer, resharded by DCP
            load_sharded_checkpoint(data.resume_from, net.model, net.optimizer)
        else:
            load_optimizer_state(net.model, net.optimizer, state["optimizer"])
        net.scaler.load_state_dict(state["scaler"]) if state.get("scaler") else None
        cursor = DataCursor(int(state["epoch"]), int(state["offset"]))
        start_step = int(state["step"])
        resumed_window = state.get("loss_window") or {}
        resumed_totals = state.get("totals") or {}
        resumed_ranks = int(state["world_size"]) if state.get("world_size") else None
        console.info(f"resuming from {data.resume_from} at step {start_step}")
        if not config.max_steps:  # --epochs: end at the last epoch's end whatever the batch was
            blocks, at = len(data.dataset), (cursor.epoch, cursor.offset)
            total_steps = start_step + steps_from_position(config, ctx.world_size, blocks, *at)
        planned = int(state.get("total_steps") or total_steps)
        if planned != total_steps and config.scheduler != "constant" and start_step < total_steps:
            console.warn(
                f"the {config.scheduler} learning-rate schedule now spans {total_steps} steps, "
                f"not {planned}: the rate at step {start_step} changes from "
                f"{schedule_rate(config, start_step, planned):.3g} to "
                f"{schedule_rate(config, start_step, total_steps):.3g} (the run goes on from "
                "there; not the run an uninterrupted one would be)"
            )
    warn_of_steps_left(config, console, start_step, total_steps)
    check_run_disk_space(  # a warning, or with --strict an error before anything is written
        config, ctx, device, console.warn, net.model, data.loaded.tokenizer, start_step, total_steps
    )
    output_dir = Path(config.output_dir)
    trackers = resolve_report_to(config.report_to)  # run/trackers.py: TensorBoard, MLflow, W&B
    fresh = start_step == 0 and read_run_file(output_dir) is None  # no run file of ours yet
    if ctx.is_main:
        ranks = (resumed_ranks, ctx.world_size)
        history = settings_history(config, data, (start_step, total_steps), ranks, console)
        output_dir.mkdir(parents=True, exist_ok=True)
        owned = tracker_outputs(trackers) + ([SAMPLES_FILE] if config.sample_prompts else [])
        write_run_file(
            output_dir, config, data.identity, owned, history=history, precision=precision,
            train_data_file=train_data_file(config.train_file),
        )  # fmt: skip
    metrics = MetricsLog(
        output_dir / "metrics.jsonl", ctx.is_main, start_step, stream_fingerprint(data.valid_stream)
    )
    # The evaluations so far decide early stopping and the evaluation cut on every rank alike.
    metrics.events = from_rank_0(metrics.events, ctx)
    loggers = Trackers(trackers, output_dir, config.to_dict(), start_step)
    if ctx.is_main:
        open_trackers(loggers, output_dir, fresh)
    metrics.listeners.append(loggers.log)  # called on rank 0 only
    sampler = TrainingSampler.create(
        config, data.loaded, net.model, output_dir, console, ctx, precision, start_step
    )
    run = Run(
        config, ctx, device, precision, console, output_dir, data, net,
        cursor, start_step, total_steps, resumed_window, metrics, loggers, sampler, resumed_totals,
    )  # fmt: skip
    announce(run, steps_per_epoch)
    return run


def warn_of_steps_left(
    config: TrainConfig, console: Console, start_step: int, total_steps: int
) -> None:
    """What the steps left from `start_step` make of the settings: nothing to train, a warmup
    that never ends, an early-stopping patience the evaluations cannot reach."""
    if start_step >= total_steps:
        console.info(
            f"the run reached step {start_step} already, and this command's settings make "
            f"{total_steps} steps: nothing left to train (a larger --max-steps or --epochs "
            "trains on); the final evaluation and model are written again"
        )
    elif config.warmup_steps >= total_steps:
        console.warn(
            f"--warmup-steps {config.warmup_steps} is at least the run's {total_steps} steps: the "
            f"learning rate never reaches --lr {config.lr:g} (it ends at "
            f"{schedule_rate(config, total_steps - 1, total_steps):.3g})"
        )
    patience, evaluations = config.early_stopping_patience, (total_steps - 1) // config.eval_steps
    if patience and evaluations < patience:
        console.warn(
            f"--early-stopping-patience {patience}: the run evaluates {evaluations} times before "
            f"its last step (every --eval-steps {config.eval_steps} of {total_steps} steps), too "
            "few to stop early; give a smaller --eval-steps"
        )


def open_trackers(loggers: Trackers, output_dir: Path, fresh: bool) -> None:
    """Start the trackers (rank 0, before any step). One that cannot start stops the run; a
    `fresh` run (this command wrote the folder's run file) then takes back what it wrote (the
    run file, a tracker's half-made folder), so that the next command, with other trackers or
    another model, finds the folder as it was (and an empty one it made gone with the lock)."""
    try:
        loggers.open()
    except UserError:
        if fresh:
            remove_owned_files(output_dir)
        raise


def settings_history(
    config: TrainConfig, data: RunData, steps: tuple[int, int], ranks: tuple[int | None, int],
    console: Console,
) -> list[dict[str, Any]]:  # fmt: skip
    """run_config.json's history (run/resume.py's `resume_history`): none for a fresh run; on
    resume the earlier one, with the training settings this command changes at its step (start,
    total), and the number of ranks (the checkpoint's, now), said in one line: a warning, or a
    note where only the global batch's factors moved and it stayed the same."""
    if data.resume_from is None:
        return []
    start_step, total_steps = steps
    previous = read_run_file(data.resume_from.parent)
    history, changed = resume_history(previous, config, start_step, ranks)
    if not changed:
        return history
    now = {"batch_size": config.batch_size, "grad_accum": config.grad_accum, RANKS: ranks[1]}
    was, will = global_batch_change(changed, now)
    batch = f"the global batch stays {will} blocks" if was == will else (
        f"the global batch goes from {was} to {will} blocks"
    )  # fmt: skip
    per_accum = config.batch_size * ranks[1]
    if was != will and was % per_accum == 0:
        batch += f" (--grad-accum {was // per_accum} keeps it at {was})"
    # A run early stopping ended at this step stays ended, unless its patience changes.
    finished = previous.get("finished") if isinstance(previous, dict) else None
    stopped_here = (
        isinstance(finished, dict)
        and finished.get("step") == start_step
        and bool(finished.get("stopped_early"))
    )
    ended = stopped_here and "early_stopping_patience" not in changed
    left = start_step < total_steps and not ended
    used = "the steps from here use them" if left else "no step is left"
    say = console.info if was == will and set(changed) <= set(GLOBAL_BATCH) else console.warn
    say(
        f"resuming at step {start_step} with other settings than the run's so far: "
        f"{changes_shown(changed)}"
        + (f"; {batch}" if set(changed) & set(GLOBAL_BATCH) else "")
        + f"; {used} (run_config.json's history and the model card record the change)"
    )
    return history


def count_shown(count: int) -> str:
    """A parameter count for a message: 3,328 as it is, from a million on 1.25M."""
    return f"{count / 1e6:.2f}M" if count >= 1_000_000 else f"{count:,}"


def announce(run: Run, steps_per_epoch: int) -> None:
    """The two start lines: the model and where it runs; the data and the batch arithmetic."""
    from domainlm.model.distributed import is_sharded

    config, model, dataset = run.config, run.net.model, run.data.dataset
    global_batch = config.batch_size * config.grad_accum * run.ctx.world_size
    run.console.info(
        f"model {config.model} ({count_shown(sum(p.numel() for p in model.parameters()))} params) "
        f"on {run.device.type} x{run.ctx.world_size}, precision {run.precision}"
        + (", parameters sharded by FSDP" if is_sharded(model) else "")
        + (f", LoRA: {count_shown(trainable_count(model))} trainable" if config.lora else "")
    )
    run.console.info(
        f"train: {run.data.train_stream.num_documents:,} documents, {dataset.num_predicted:,} "
        f"tokens, {len(dataset):,} blocks of {run.data.block_size}; global batch "
        f"{config.batch_size} x {config.grad_accum} accum x {run.ctx.world_size} ranks = "
        f"{global_batch:,} blocks; {steps_per_epoch:,} steps/epoch, {run.total_steps:,} steps"
    )


# ----------------------------------------------------------------------------- the end


def finish(
    run: Run,
    done: int,
    final: NLLSum,
    initial: NLLSum | None,
    last_saved: Path | None,
    runtime: float,
    tokens_seen: int,
    best: BestModel | None = None,
) -> TrainResult:
    """Save the model folder (rank 0; every rank gathers FSDP shards) and report the results of
    the run ended at step `done` (before its last with --early-stopping-patience); with `best`
    (--load-best-model-at-end) the model and its result are that checkpoint's."""
    from domainlm.model.distributed import full_model_state_dict

    notes: dict[str, Any] = {}  # eval_results.json's: where the run stopped, whose model it is
    if done < run.total_steps:
        notes["stopped_early"] = {"step": done, "of_steps": run.total_steps}
    if best is not None:
        notes["model_checkpoint"] = {"step": best.step, "last_step_perplexity": final.perplexity}
        final = best.result
    kept = None
    final_state = full_model_state_dict(run.net.model, run.ctx)  # FSDP: gathered; else None
    if run.ctx.is_main:
        save_model_folder(
            run, done, final, initial, last_saved, runtime, tokens_seen, final_state, notes
        )
        kept = best_checkpoint(list_checkpoints(run.output_dir), run.metrics.validation)
    result = TrainResult(
        output_dir=run.output_dir,
        steps=done,
        initial_perplexity=initial.perplexity if initial else run.metrics.initial_perplexity(),
        final_perplexity=final.perplexity,
        eval_tokens=final.tokens,
        train_tokens=tokens_seen,
        train_runtime=runtime,
        best_checkpoint=kept.path if kept else None,
        resumed_from=run.data.resume_from,
        stopped_early=done < run.total_steps,
        model_step=best.step if best else None,
    )
    if result.initial_perplexity is None and initial_perplexity(run.metrics.events) is not None:
        run.console.info(
            "the validation data is not what was scored before training (it changed since): no "
            "before-training figure to compare with; evaluations before this command's first "
            "scored the other data (metrics.jsonl: each evaluation's `validation` fingerprint)"
        )
    run.console.summary(result)
    return result


def save_model_folder(
    run: Run,
    done: int,
    final: NLLSum,
    initial: NLLSum | None,
    last_saved: Path | None,
    runtime: float,
    tokens_seen: int,
    final_state: dict[str, Any] | None,
    notes: dict[str, Any] | None = None,
) -> None:
    """The trained model and tokenizer, eval_results.json, the run report; all recorded as owned."""
    model, output_dir = run.net.model, run.output_dir
    guard.refuse_nonfinite_weights(model, last_saved)  # never save NaN weights as final
    before = set(p.name for p in output_dir.iterdir())
    tokenizer, config = run.data.loaded.tokenizer, run.config
    merge = bool(config.lora and config.merge)
    size = lambda: estimate_checkpoint(model, tokenizer, merge).model_folder  # noqa: E731
    # Every name is recorded as written before it is: a run killed mid-save is resumed or
    # overwritten as its own, not refused as holding a user's files.
    with model_folder_write(output_dir, size):  # a full disk: one line, exit 4 (diskspace.py)
        staging = staging_for_final_files(output_dir)
        try:
            if config.lora:
                save_adapter(model, staging)  # the run folder is the adapter; merged/ the model
            else:
                model.save_pretrained(staging, state_dict=final_state)
            tokenizer.save_pretrained(staging)
        except BaseException:  # a full disk, an error: no partial model left taking space
            shutil.rmtree(staging, ignore_errors=True)
            raise
        publish_final_files(output_dir, staging)
    if config.lora and config.merge:
        record_written(output_dir, MERGED_DIR)
    merge_failed, merged_files = merge_adapter(run, size) if config.lora else (None, None)
    if final.tokens:
        record_written(output_dir, EVAL_RESULTS_FILE)
        save_eval_results(output_dir, final, initial, run.metrics, runtime, tokens_seen, notes)
    run.loggers.close()
    summary = data_summary(run.data.train_stream, run.data.valid_stream)
    write_run_report(output_dir, summary, run.data.lint_warnings)  # plots, card, report.html
    written = sorted(set(p.name for p in output_dir.iterdir()) - before)
    finished = None if merge_failed else finish_marker(done, run.total_steps, run.data.valid_stream)
    write_run_file(output_dir, run.config, run.data.identity, written, finished=finished,
                   merged_files=merged_files)  # fmt: skip
    if merge_failed is not None:
        raise merge_failed


def merge_adapter(
    run: Run, size: Callable[[], int]
) -> tuple[TrainingAborted | None, list[str] | None]:
    """A LoRA run's merged/ (model/lora.py): with --merge the adapter merged into its base, and
    the names written there (the run file keeps them: --overwrite-output-dir tells a user's file
    inside from ours). Out of memory while merging: the error, raised once the rest is written.
    With --no-merge, an earlier command's merge no longer matches the adapter: removed when it
    holds only what domainlm wrote, else left with a warning."""
    output_dir, config, tokenizer = run.output_dir, run.config, run.data.loaded.tokenizer
    merged = output_dir / MERGED_DIR
    if not config.merge:
        if merged.is_dir() and not merged.is_symlink() and MERGED_DIR in owned_entries(output_dir):
            inside = [n for n in foreign_inside(output_dir) if n.startswith(f"{MERGED_DIR}/")]
            if inside:
                run.console.warn(
                    f"{merged} holds an earlier command's merge, not this adapter's; left in "
                    f"place for {', '.join(inside)}, which domainlm did not write"
                )
                return None, None
            shutil.rmtree(merged)
            run.console.info(
                f"removed {merged}: an earlier command's merge, not of this adapter (--no-merge; "
                f"`domainlm export {output_dir} DIR` merges it)"
            )
        return None, []
    started = time.time()
    try:
        with model_folder_write(output_dir, size):
            save_merged(output_dir, tokenizer, seed=config.seed, eos_token=config.eos_token,
                        trust_remote_code=config.trust_remote_code)  # fmt: skip
    except TrainingAborted as exc:
        return exc, None
    # what this merge wrote: a user's file left in merged/ keeps its older time
    return None, sorted(p.name for p in merged.iterdir() if p.stat().st_mtime >= started - 1)


# ----------------------------------------------------------------------------- helpers


def compile_model(loss_module: CausalLMLoss) -> None:
    """torch.compile, in place, the part of the model the loss calls: the backbone when the head
    is chunked (the head and cross-entropy are the loss's own kernels), else the whole model.
    In place (`Module.compile`), so parameter names and the saved folder stay as they are."""
    from domainlm.model.loss import linear_head

    model = loss_module.model
    (model.base_model if linear_head(model) is not None else model).compile()


def make_optimizer(
    model: torch.nn.Module, config: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not biases, norms); fused kernels (GPU and CPU:
    one pass over each tensor, no full-size temporaries, so faster and lower peak memory)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2),
        fused=device.type in ("cuda", "cpu"),
    )


def load_streams(
    config: TrainConfig, loaded: LoadedModel, tokenizer_id: str, console: Console
) -> tuple[TokenStream, TokenStream]:
    """Training and validation token streams (a seeded held-out split without a validation file)."""

    def load(path: str) -> TokenStream:
        cached = load_token_stream(
            path,
            loaded.tokenizer,
            loaded.eos_id,
            tokenizer_id,
            config.cache_dir,
            config.doc_sep,
            config.encoding_errors,
            config.text_column,
            prefix=loaded.document_prefix,
        )
        console.info(f"{path}: {'token cache hit' if cached.cache_hit else 'tokenized and cached'}")
        return cached.stream

    train_stream = load(config.train_file)
    if config.validation_file:
        if Path(config.validation_file).resolve() == Path(config.train_file).resolve():
            console.warn(
                "the validation file is the training file: validation perplexity will be "
                "optimistic (leakage); give a separate --validation-file"
            )
        return train_stream, load(config.validation_file)
    train_docs, held_docs = split_documents(
        train_stream.num_documents, config.validation_split, config.seed, config.train_file
    )
    console.info(
        f"no --validation-file: holding out {len(held_docs)} of {train_stream.num_documents} "
        f"documents ({config.validation_split:.0%}, seeded random) for validation"
    )
    return train_stream.select(train_docs), train_stream.select(held_docs)


def finished_result(
    config: TrainConfig, ctx: DistContext, device: torch.device, console: Console, data: RunData
) -> TrainResult | None:
    """A run started again that finished already with the same settings (every flag but the
    command's own, config.COMMAND_SETTINGS: --quiet, ...), model, tokenizer and training and
    validation data: its result read back from eval_results.json, and nothing more done: no
    checkpoint loaded, no evaluation, nothing written (no merge).
    Otherwise None (a larger --max-steps trains on; another validation file is scored again).
    Rank 0 decides for every rank."""
    from domainlm.model.distributed import all_reduce_sum

    output_dir = Path(config.output_dir)
    total_steps = count_steps(config, ctx.world_size, len(data.dataset))[1]
    results: dict[str, Any] = {}
    done = False
    end = total_steps  # or the step --early-stopping-patience ended the run at
    if ctx.is_main and config.resume == "auto" and not config.overwrite_output_dir:
        run = read_run_file(output_dir) or {}
        as_json = lambda value: json.loads(json.dumps(value))  # noqa: E731 - tuples as lists
        try:
            results = json.loads((output_dir / EVAL_RESULTS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            results = {}
        marker = run.get("finished")
        if isinstance(marker, dict) and isinstance(marker.get("step"), int):
            if not config.max_steps:
                # --epochs: a run resumed at another global batch ended at its last epoch's
                # end (or stopped early) in another step count than this batch's from step 0
                # (steps_from_position): what it was to run is not known; it ended, as recorded
                step = marker["step"]
                total_steps = step + 1 if marker.get("stopped_early") else step
            end = min(marker["step"], total_steps)
        done = (
            marker == finish_marker(end, total_steps, data.valid_stream)
            and same_model_spelled(run.get("identity"), as_json(data.identity))
            and run_settings(run.get("config")) == run_settings(as_json(config.to_dict()))
            and isinstance(results, dict)
            and isinstance(results.get("perplexity"), (int, float))
            and final_model_present(output_dir, config)
        )
    agreed, last = all_reduce_sum([float(done), float(end) if ctx.is_main else 0.0], ctx, device)
    if not agreed:
        return None
    end = int(last)
    early = " (stopped early)" if end < total_steps else ""
    more = "--early-stopping-patience" if early else "--max-steps or --epochs"
    console.info(
        f"the run finished at step {end}{early} already, with these settings and data: "
        f"nothing to do (its model and eval_results.json are in {output_dir}; a larger "
        f"{more} trains on)"
    )
    data_now = stream_fingerprint(data.valid_stream) if ctx.is_main else None
    best = best_checkpoint(list_checkpoints(output_dir), data_now) if ctx.is_main else None
    result = TrainResult(
        output_dir=output_dir,
        steps=end,
        initial_perplexity=results.get("initial_perplexity"),
        final_perplexity=results.get("perplexity"),
        eval_tokens=int(results.get("eval_tokens") or 0),
        train_tokens=int(results.get("train_tokens") or 0),
        train_runtime=float(results.get("train_runtime") or 0.0),
        best_checkpoint=best.path if best else None,
        stopped_early=end < total_steps,
        model_step=(results.get("model_checkpoint") or {}).get("step"),
    )
    console.summary(result, saved_now=False)
    return result


def same_model_spelled(saved: Any, identity: dict[str, Any]) -> bool:
    """A run file's identity equals this command's, its --model one folder however spelled."""
    if not isinstance(saved, dict) or not same_folder(saved.get("model"), identity["model"]):
        return saved == identity
    return {**saved, "model": identity["model"]} == identity


def final_model_present(output_dir: Path, config: TrainConfig) -> bool:
    """The final model's files are there: its config and weights (one file or a sharded index;
    for LoRA the adapter), and with --merge the merged folder's."""
    from domainlm.model.lora import ADAPTER_WEIGHTS

    def has_model(folder: Path) -> bool:
        weights = ("model.safetensors", "model.safetensors.index.json")
        return (folder / "config.json").is_file() and any((folder / w).is_file() for w in weights)

    if not config.lora:
        return has_model(output_dir)
    adapter = (output_dir / ADAPTER_WEIGHTS).is_file()
    return adapter and (not config.merge or has_model(output_dir / MERGED_DIR))


def save_eval_results(
    output_dir: Path,
    final: NLLSum,
    initial: NLLSum | None,
    metrics: MetricsLog,
    runtime: float,
    train_tokens: int,
    notes: dict[str, Any] | None = None,
) -> None:
    """eval_results.json; with `notes` of a run stopped early (`stopped_early`: its step, of
    the steps it would have run) or saving its best checkpoint's weights (`model_checkpoint`:
    its step, and the last step's perplexity): the card says them."""
    results: dict[str, Any] = {
        "eval_loss": final.nll,
        "perplexity": final.perplexity,
        "eval_tokens": final.tokens,
        "initial_perplexity": initial.perplexity if initial else metrics.initial_perplexity(),
        "train_runtime": runtime,
        "train_tokens": train_tokens,
    }
    results.update(notes or {})
    (output_dir / EVAL_RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
