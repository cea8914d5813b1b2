"""The training loop: data order, gradient accumulation, loss reduction, schedule, eval and save points.

Read `train()` top to bottom: set-up, the step loop, the end. Everything else here is a helper the
loop calls. Gradients are scaled so that one optimizer step minimises the mean NLL over all
target tokens of the global batch (every micro-batch on every rank), never a mean of means.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from domainlm import guard
from domainlm.checkpoint import (
    CHECKPOINT_PREFIX,
    RUN_FILE,
    CheckpointInfo,
    best_checkpoint,
    check_output_dir,
    checkpoint_dirs_by_step,
    checkpoint_problem,
    list_checkpoints,
    load_training_state,
    owned_entries,
    read_run_file,
    record_written,
    remove_owned_files,
    rotate_checkpoints,
    save_checkpoint,
    write_json_atomic,
)
from domainlm.config import TrainConfig
from domainlm.data import (
    BlockDataset,
    TokenStream,
    epoch_order,
    load_token_stream,
    micro_batch_indices,
    split_documents,
    text_files,
)
from domainlm.device import (
    autocast,
    pick_device,
    prefer_expandable_cuda_segments,
    resolve_precision,
)
from domainlm.distributed import DistContext, all_reduce_sum
from domainlm.errors import UserError
from domainlm.evaluate import NLLSum, check_window, stream_nll
from domainlm.fastpath import use_fast_kernels
from domainlm.generate import TrainingSampler
from domainlm.lint import check_training_data
from domainlm.lock import LOCK_FILE, RunLock
from domainlm.loss import CausalLMLoss
from domainlm.malloc import reuse_freed_host_memory
from domainlm.metrics import Console, MetricsLog
from domainlm.models import (
    LoadedModel,
    load_model,
    special_token_texts,
    tokenizer_fingerprint,
)
from domainlm.packing import check_packing_support
from domainlm.report import (
    EventLoggers,
    check_report_to,
    data_summary,
    owned_outputs,
    write_run_report,
)
from domainlm.schedule import learning_rate

# What makes a checkpoint resumable by a run: the same model, tokenizer and block layout.
RESUME_KEYS = ("model", "tokenizer", "block_size", "packing")


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


@dataclass
class DataCursor:
    """Position in the data: epoch and the number of blocks of its order already consumed."""

    epoch: int = 0
    offset: int = 0

    def next_global_batch(self, dataset: BlockDataset, size: int, seed: int) -> np.ndarray:
        if self.offset >= len(dataset):
            self.epoch, self.offset = self.epoch + 1, 0
        order = epoch_order(len(dataset), self.epoch, seed)
        blocks = order[self.offset : self.offset + size]
        self.offset += len(blocks)
        return blocks


def train(config: TrainConfig) -> TrainResult:
    """Fine-tune `config.model` on `config.train_file`; write checkpoints, metrics and the model."""
    from domainlm.distributed import (
        full_model_state_dict,
        is_sharded,
        load_optimizer_state,
        rank_lost,
        setup_distributed,
        teardown_distributed,
        wrap_model,
    )

    reuse_freed_host_memory()  # no page faults for each step's large blocks (domainlm/malloc.py)
    prefer_expandable_cuda_segments()  # before anything touches CUDA
    ctx = setup_distributed(config.dist_timeout, config.device, config.strategy)
    cleanup = ExitStack()  # the run lock and the signal handlers, released on every exit
    try:
        device = pick_device(ctx.local_rank if ctx.enabled else None, config.device)
        precision = resolve_precision(config.precision, device)
        console = Console(enabled=ctx.is_main, quiet=config.quiet)
        output_dir = Path(config.output_dir)

        # ---- check everything before anything is written
        text_files(config.train_file)
        if config.validation_file:
            text_files(config.validation_file)
        check_output_dir(output_dir)
        check_report_to(config.report_to)  # --report-to names installed loggers
        loaded = load_model(
            config.model,
            seed=config.seed,
            eos_token=config.eos_token,
            trust_remote_code=config.trust_remote_code,
        )
        block_size = loaded.block_size(config.block_size, default_cap=1024)
        eval_stride = config.eval_stride or block_size - 1
        check_window(block_size, eval_stride)
        run_identity = {
            "model": config.model,
            "tokenizer": tokenizer_fingerprint(loaded.tokenizer, loaded.eos_id),
            "block_size": block_size,
            "packing": config.packing,
        }
        # Data errors (empty, binary, invalid UTF-8) come before anything in output_dir is touched.
        train_stream, valid_stream = load_streams(
            config, loaded, run_identity["tokenizer"], console
        )
        # Data lint (domainlm/lint.py): warnings, or with --strict an error before any write.
        lint_warnings = check_training_data(
            config, block_size, train_stream, valid_stream, console,
            special_token_texts(loaded.tokenizer),
        )  # fmt: skip
        if config.packing == "docs":
            check_packing_support(loaded.model)
        if ctx.is_main:  # one run per output dir; taken before decide_resume may remove anything
            cleanup.enter_context(RunLock(output_dir))
        resume_from = decide_resume(config, output_dir, run_identity, console, ctx)
        dataset = BlockDataset(train_stream, block_size, config.packing)

        # ---- model, optimizer, state
        if resume_from is not None:
            resumed = load_model(
                str(resume_from),
                eos_token=config.eos_token,
                trust_remote_code=config.trust_remote_code,
            )
            loaded.model = resumed.model
        # from_pretrained returns a model in eval mode: dropout must be on while training, in a
        # fresh run from a folder as in a resumed one (else resume is not exact).
        model = loaded.model.to(device).train()
        if config.packing == "concat":
            model.config.use_cache = False
        use_fast_kernels(model)  # same function, fused kernels (domainlm/fastpath.py)
        loss_module = CausalLMLoss(model)
        if config.compile:
            compile_model(loss_module)
        train_module = wrap_model(loss_module, ctx, device, config.strategy)
        optimizer = make_optimizer(model, config, device)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

        global_batch = config.batch_size * config.grad_accum * ctx.world_size
        steps_per_epoch = math.ceil(len(dataset) / global_batch)
        total_steps = config.max_steps or math.ceil(config.epochs * steps_per_epoch)
        cursor, start_step = DataCursor(), 0
        resumed_window: dict[str, float] = {}  # the loss window open at the checkpoint
        if resume_from is not None:
            state = load_training_state(resume_from)
            load_optimizer_state(model, optimizer, state["optimizer"])
            scaler.load_state_dict(state["scaler"]) if state.get("scaler") else None
            cursor = DataCursor(int(state["epoch"]), int(state["offset"]))
            start_step = int(state["step"])
            resumed_window = state.get("loss_window") or {}
            console.info(f"resuming from {resume_from} at step {start_step}")

        if ctx.is_main:
            output_dir.mkdir(parents=True, exist_ok=True)
            write_run_file(output_dir, config, run_identity, written=owned_outputs(config))
        metrics = MetricsLog(
            output_dir / "metrics.jsonl", enabled=ctx.is_main, resume_step=start_step
        )
        loggers = EventLoggers(config.report_to, output_dir, config.to_dict(), start_step)
        metrics.listeners.append(loggers.log)
        sampler = TrainingSampler.create(
            config, loaded, model, output_dir, console, ctx, precision, start_step
        )

        console.info(
            f"model {config.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) "
            f"on {device.type} x{ctx.world_size}, precision {precision}"
            + (", parameters sharded by FSDP" if is_sharded(model) else "")
        )
        console.info(
            f"train: {train_stream.num_documents} documents, {dataset.num_predicted:,} tokens, "
            f"{len(dataset)} blocks of {block_size}; global batch {config.batch_size} x "
            f"{config.grad_accum} accum x {ctx.world_size} ranks = {global_batch} blocks; "
            f"{steps_per_epoch} steps/epoch, {total_steps} steps"
        )

        eval_batch = config.eval_batch_size or config.batch_size

        def evaluate(limit: int | None) -> NLLSum:
            with eager_evaluation(config.compile):
                return evaluate_once(limit)

        def evaluate_once(limit: int | None) -> NLLSum:
            nonlocal eval_batch  # halved for good after an out-of-memory error
            result, eval_batch = guard.eval_with_oom_backoff(
                lambda batch_size: stream_nll(
                    loss_module,
                    valid_stream.tokens,
                    block_size=block_size,
                    stride=eval_stride,
                    batch_size=batch_size,
                    device=device,
                    precision=precision,
                    ctx=ctx,
                    max_tokens=limit,
                ),
                eval_batch,
                console.warn,
            )
            return result

        initial = None
        if start_step == 0:
            initial = evaluate(config.max_eval_tokens)
            metrics.log_eval(0, 0.0, initial)
            console.info(
                f"validation perplexity before training: {initial.perplexity:.3f} "
                f"({initial.tokens:,} tokens)"
            )

        # ---- the step loop
        started = time.perf_counter()
        bar = console.progress(total_steps, start_step)
        # The loss window: NLL sum (this rank's) and target tokens (all ranks') since the last
        # logged step. A resumed run reopens the checkpoint's window, so its next logged loss
        # covers the same steps as without the interruption (rank 0 holds the all-ranks sum).
        window_nll = torch.zeros((), dtype=torch.float64, device=device)
        window_tokens, window_start, tokens_seen = 0, time.perf_counter(), 0
        if resumed_window:
            window_nll += float(resumed_window["nll"]) if ctx.is_main else 0.0
            window_tokens = int(resumed_window["tokens"])
            window_start -= float(resumed_window["seconds"])  # tokens/s over the whole window
        last_eval: tuple[int, NLLSum] | None = None
        split = guard.MicroBatching(config.batch_size, config.grad_accum)  # halved on OOM
        bad_steps = guard.BadStepGuard(config.max_bad_steps)
        nan_steps = guard.injected_nan_steps()
        last_saved = resume_from
        stop = cleanup.enter_context(guard.StopSignals(console.info))
        for step in range(start_step, total_steps):
            lr = learning_rate(
                step,
                peak=config.lr,
                warmup_steps=config.warmup_steps,
                total_steps=total_steps,
                kind=config.scheduler,
                min_ratio=config.min_lr_ratio,
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            blocks = cursor.next_global_batch(dataset, global_batch, config.seed)
            done = step + 1
            (step_nll, step_targets), split = guard.with_oom_backoff(
                lambda s, blocks=blocks, step=step: accumulate_gradients(
                    train_module,
                    dataset,
                    blocks,
                    s.batch_size,
                    s.grad_accum,
                    ctx,
                    device,
                    precision,
                    scaler,
                    seed=config.seed,
                    step=step,
                    fixed_rows=config.compile,
                    sharded=config.strategy == "fsdp",
                ),
                split,
                reset=lambda: optimizer.zero_grad(set_to_none=True),
                report=console.warn,
            )
            step_nll = guard.inject_nan(model, step_nll, done, nan_steps)
            scaler.unscale_(optimizer)  # a no-op without fp16
            if config.max_grad_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            else:
                norm = guard.grad_norm(list(model.parameters()))
            # fp16's scaler skips inf gradients by itself (that is how it finds its scale).
            checked_norm = 0.0 if scaler.is_enabled() else float(norm)
            if bad_steps.check(done, float(step_nll), checked_norm, last_saved):
                scaler.step(optimizer)
                window_nll += step_nll
                window_tokens += step_targets
            else:  # skipped: no update; the data of this step is consumed
                console.warn(
                    f"step {done}: NaN/Inf loss or gradient norm, step skipped "
                    f"({bad_steps.consecutive} in a row, {bad_steps.total} in all)"
                )
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            tokens_seen += step_targets
            epoch_float = cursor.epoch + cursor.offset / len(dataset)

            if done % config.logging_steps == 0 or done == total_steps:
                (nll_sum,) = all_reduce_sum([float(window_nll)], ctx, device)
                elapsed = time.perf_counter() - window_start
                # input tokens per second over all ranks, padding excluded
                speed = window_tokens / elapsed if elapsed > 0 else 0.0
                # NaN when every step of the window was skipped as bad (guard.BadStepGuard)
                loss = nll_sum / window_tokens if window_tokens else float("nan")
                metrics.log_train(done, epoch_float, loss, lr, speed)
                console.step(bar, done, loss, lr, speed)
                window_nll.zero_()
                window_tokens, window_start = 0, time.perf_counter()
            else:
                console.advance(bar, done)

            final_step = done == total_steps
            paused_at = time.perf_counter()  # evaluation, saving and sampling are not training time
            if done % config.eval_steps == 0 or final_step:
                # The last evaluation scores the whole validation set, whatever --max-eval-tokens.
                result = evaluate(None if final_step else config.max_eval_tokens)
                metrics.log_eval(done, epoch_float, result)
                console.info(f"step {done}: validation perplexity {result.perplexity:.3f}")
                last_eval = (done, result)
            if done % config.save_steps == 0 or final_step:
                # The final step is saved too, so a finished run can be extended with --max-steps.
                ppl = last_eval[1].perplexity if last_eval and last_eval[0] == done else None
                window = (window_nll, window_tokens, paused_at - window_start)
                save_training_checkpoint(
                    output_dir,
                    done,
                    loaded,
                    model,
                    optimizer,
                    scaler,
                    cursor,
                    ctx,
                    ppl,
                    config,
                    window,
                )
                last_saved = output_dir / f"checkpoint-{done}"
            if sampler is not None:  # samples.jsonl + console; RNG forked, model back in train mode
                sampler.maybe_sample(done, final_step)
            window_start += time.perf_counter() - paused_at
            guard.step_delay()
            if not final_step and guard.stop_agreed(stop, ctx, device):
                if last_saved != output_dir / f"checkpoint-{done}":
                    save_training_checkpoint(
                        output_dir,
                        done,
                        loaded,
                        model,
                        optimizer,
                        scaler,
                        cursor,
                        ctx,
                        None,
                        config,
                        (window_nll, window_tokens, time.perf_counter() - window_start),
                    )
                console.close(bar)
                raise guard.stopped_by_signal(stop, done, output_dir)
        console.close(bar)
        runtime = time.perf_counter() - started

        # ---- the end: the model folder and the results
        if last_eval is not None and last_eval[0] == total_steps:
            final = last_eval[1]
        else:  # nothing left to train (a finished run started again)
            final = evaluate(None)
            if not any("eval_ppl" in e and e["step"] == total_steps for e in metrics.events):
                metrics.log_eval(total_steps, cursor.epoch + cursor.offset / len(dataset), final)
        best = None
        final_state = full_model_state_dict(model, ctx)  # FSDP: gathered by all ranks; else None
        if ctx.is_main:
            guard.refuse_nonfinite_weights(model, last_saved)  # never save NaN weights as final
            before = set(p.name for p in output_dir.iterdir())
            model.save_pretrained(output_dir, state_dict=final_state)
            loaded.tokenizer.save_pretrained(output_dir)
            if final.tokens:
                save_eval_results(output_dir, final, initial, metrics, runtime, tokens_seen)
            loggers.close()
            # plots, card, report.html
            write_run_report(output_dir, data_summary(train_stream, valid_stream), lint_warnings)
            written = sorted(set(p.name for p in output_dir.iterdir()) - before)
            write_run_file(output_dir, config, run_identity, written=written)
            best = best_checkpoint(list_checkpoints(output_dir))
        result = TrainResult(
            output_dir=output_dir,
            steps=total_steps,
            initial_perplexity=initial.perplexity if initial else metrics.initial_perplexity(),
            final_perplexity=final.perplexity,
            eval_tokens=final.tokens,
            train_tokens=tokens_seen,
            train_runtime=runtime,
            best_checkpoint=best.path if best else None,
            resumed_from=resume_from,
        )
        console.summary(result)
        return result
    except (RuntimeError, torch.distributed.DistError) as exc:
        lost = rank_lost(exc, ctx)  # another rank died or timed out: one clear line, not a trace
        if lost is None:
            raise
        raise lost from exc
    finally:
        cleanup.close()
        teardown_distributed(ctx)


# ----------------------------------------------------------------------------- helpers


def compile_model(loss_module: CausalLMLoss) -> None:
    """torch.compile, in place, the part of the model the loss calls: the backbone when the head
    is chunked (the head and cross-entropy are the loss's own kernels), else the whole model.
    In place (`Module.compile`), so parameter names and the saved folder stay as they are."""
    from domainlm.loss import linear_head

    model = loss_module.model
    (model.base_model if linear_head(model) is not None else model).compile()


def eager_evaluation(compiled: bool) -> Any:
    """Evaluation runs the compiled model eagerly: compiling the no-grad graph and each window
    shape costs more than the few evaluation passes of a run gain from it."""
    if compiled and hasattr(torch.compiler, "set_stance"):  # torch >= 2.6
        return torch.compiler.set_stance("force_eager")
    return nullcontext()


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


def accumulate_gradients(
    train_module: torch.nn.Module,
    dataset: BlockDataset,
    blocks: np.ndarray,
    batch_size: int,
    grad_accum: int,
    ctx: DistContext,
    device: torch.device,
    precision: str,
    scaler: Any,
    *,
    seed: int = 0,
    step: int = 0,
    fixed_rows: bool = False,
    sharded: bool = False,
) -> tuple[torch.Tensor, int]:
    """Forward and backward over this rank's micro-batches of one global batch (each padded to
    `batch_size` rows with empty blocks when `fixed_rows`).

    The gradient left in the parameters is that of (summed NLL / target tokens of the whole global
    batch), whatever the split into ranks and micro-batches. Dropout masks too: each micro-batch
    draws them from a seed of (seed, step, its slot in the global batch), so the same blocks get
    the same masks whichever rank or accumulation round computes them (2 ranks x 1 == 1 rank x
    2 accumulation), and a retried step (guard.with_oom_backoff) redraws them from the start.
    Returns this rank's NLL sum (a device tensor: no host sync) and the global batch's
    target-token count.

    Out of memory under torchrun: after each micro-batch's attempt the ranks agree
    (`guard.agree_on_oom`), so all raise OutOfMemoryError and back off together. The backward pass
    that all-reduces gradients (DDP's last micro-batch) therefore runs after that agreement; an
    OOM inside it stops the run with one line (`sharded`: FSDP, whose passes hold collectives).
    """
    step_targets = sum(dataset.targets_in(int(b)) for b in blocks)
    step_nll = torch.zeros((), dtype=torch.float64, device=device)

    def backward(nll: torch.Tensor, rows: int) -> None:
        # DDP/FSDP average gradients over ranks; scale so the result is sum / tokens.
        scaler.scale(nll * (ctx.world_size / step_targets)).backward()
        guard.maybe_inject_oom_after_backward(rows)

    for micro in range(grad_accum):
        indices = micro_batch_indices(blocks, micro, ctx.rank, ctx.world_size, batch_size)
        if fixed_rows:  # a compiled model: one shape, no recompilation at an epoch's short end
            indices += [-1] * (batch_size - len(indices))
        batch = dataset.batch(indices).to(device)
        rows = batch.input_ids.shape[0]
        # the slot micro_batch_indices deals these blocks from
        torch.manual_seed(micro_batch_seed(seed, step, micro * ctx.world_size + ctx.rank))
        last = micro == grad_accum - 1
        sync = (
            nullcontext()
            if last or not hasattr(train_module, "no_sync")
            else train_module.no_sync()
        )
        deferred = last and ctx.enabled and not sharded  # DDP's gradient all-reduce: after agreeing
        failed: torch.OutOfMemoryError | None = None
        with sync:
            try:
                with autocast(device, precision):
                    row_nll = train_module(batch.input_ids, batch.targets, batch.position_ids)
                nll = row_nll.sum()
                if not deferred:
                    backward(nll, rows)
            except torch.OutOfMemoryError as exc:
                failed = exc
            guard.agree_on_oom(failed, ctx, device, sharded)
            if deferred:
                try:
                    backward(nll, rows)
                except torch.OutOfMemoryError as exc:
                    raise guard.oom_in_gradient_sync(exc, ctx) from exc
        step_nll += nll.detach().double()
    return step_nll, step_targets


def micro_batch_seed(seed: int, step: int, slot: int) -> int:
    """The RNG seed of micro-batch `slot` (its place in the global batch) of optimizer step `step`:
    a function of these three numbers only (not of the rank); a hash, so that different triples
    give unrelated seeds (no arithmetic overlap between steps and slots)."""
    state = np.random.SeedSequence([seed % 2**64, step, slot]).generate_state(2, np.uint32)
    return (int(state[0]) << 32 | int(state[1])) >> 1  # 63 bits: within torch.manual_seed's range


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
        train_stream.num_documents, config.validation_split, config.seed
    )
    console.info(
        f"no --validation-file: holding out {len(held_docs)} of {train_stream.num_documents} "
        f"documents ({config.validation_split:.0%}, seeded random) for validation"
    )
    return train_stream.select(train_docs), train_stream.select(held_docs)


def decide_resume(
    config: TrainConfig,
    output_dir: Path,
    identity: dict[str, Any],
    console: Console,
    ctx: DistContext | None = None,
) -> Path | None:
    """The checkpoint to continue from, or None to start afresh. Refuses to clobber other runs.

    Every rank calls this. With --overwrite-output-dir every rank checks the run file's names (so a
    bad one stops all ranks alike), rank 0 alone removes them and the others wait at a barrier.
    """
    from domainlm.distributed import SINGLE, barrier

    ctx = ctx or SINGLE
    if config.resume not in ("auto", "never"):
        path = Path(config.resume)
        problem = checkpoint_problem(path) if path.is_dir() else "no such folder"
        if problem:
            raise UserError(f"--resume {config.resume}: cannot resume from it: {problem}")
        check_same_run(path.parent, identity, f"checkpoint {path}")
        return path
    if config.overwrite_output_dir:
        owned_entries(output_dir)  # on every rank: a bad run file stops all ranks alike
        if ctx.is_main:
            removed = remove_owned_files(output_dir)
            if removed:
                console.info(
                    f"--overwrite-output-dir: removed {len(removed)} entries of an earlier run"
                )
        barrier(ctx)  # nobody reads the folder while rank 0 empties it
        return None
    if not output_dir.is_dir() or not any(p.name != LOCK_FILE for p in output_dir.iterdir()):
        return None
    run = read_run_file(output_dir)
    if run is None:
        raise UserError(
            f"--output-dir {output_dir} is not empty and holds no domainlm run; choose an empty "
            "folder (or pass --overwrite-output-dir to write beside its files)"
        )
    check_same_run(output_dir, identity, f"--output-dir {output_dir}")
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


def check_same_run(folder: Path, identity: dict[str, Any], what: str) -> None:
    run = read_run_file(folder) or {}
    saved = run.get("identity", {})
    for key in RESUME_KEYS:
        if key in saved and saved[key] != identity[key]:
            raise UserError(
                f"{what} belongs to a run with another {key} ({saved[key]} vs {identity[key]}); "
                "use another --output-dir or pass --overwrite-output-dir"
            )


def write_run_file(
    output_dir: Path, config: TrainConfig, identity: dict[str, Any], written: list[str]
) -> None:
    previous = read_run_file(output_dir) or {}
    owned = sorted(set(previous.get("written", [])) | set(written) | {"metrics.jsonl"})
    write_json_atomic(
        output_dir / RUN_FILE, {"identity": identity, "config": config.to_dict(), "written": owned}
    )


def save_training_checkpoint(
    output_dir: Path,
    step: int,
    loaded: LoadedModel,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    cursor: DataCursor,
    ctx: DistContext,
    eval_perplexity: float | None,
    config: TrainConfig,
    window: tuple[torch.Tensor, int, float],
) -> CheckpointInfo | None:
    """Write checkpoint-<step> on rank 0, then rotate; other ranks wait at a barrier.

    Every rank calls this. `window` is the open loss window (this rank's NLL sum, the target
    tokens, the training seconds so far); its NLL is summed over the ranks and saved with them.
    """
    from domainlm.distributed import barrier, full_state_dicts

    model_state, optim_state = full_state_dicts(model, optimizer, ctx)
    window_nll, window_tokens, window_seconds = window
    (nll_sum,) = all_reduce_sum([float(window_nll)], ctx, window_nll.device)
    if ctx.is_main:
        # Owned before it exists: --overwrite-output-dir removes it even if this save is cut short.
        record_written(output_dir, f"{CHECKPOINT_PREFIX}{step}")
        state = {
            "step": step,
            "epoch": cursor.epoch,
            "offset": cursor.offset,
            "optimizer": optim_state,
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "world_size": ctx.world_size,
            "loss_window": {"nll": nll_sum, "tokens": window_tokens, "seconds": window_seconds},
        }
        save_checkpoint(
            output_dir, step, model, loaded.tokenizer, state, eval_perplexity, model_state
        )
        rotate_checkpoints(output_dir, config.save_total_limit)
    barrier(ctx)
    return None


def save_eval_results(
    output_dir: Path,
    final: NLLSum,
    initial: NLLSum | None,
    metrics: MetricsLog,
    runtime: float,
    train_tokens: int,
) -> None:
    results = {
        "eval_loss": final.nll,
        "perplexity": final.perplexity,
        "eval_tokens": final.tokens,
        "initial_perplexity": initial.perplexity if initial else metrics.initial_perplexity(),
        "train_runtime": runtime,
        "train_tokens": train_tokens,
    }
    (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")
