"""One optimizer step's accumulated gradients, before clipping and the optimizer: run under
torchrun by tests/test_distributed.py (`python -m torch.distributed.run ... step_gradients.py
MODEL TRAIN_FILE OUT.pt GRAD_ACCUM`), or called in-process for one rank.

It is the training step's own gradient code (`train.accumulate_gradients`, DDP-wrapped under
torchrun), on the first 4 blocks of the first epoch's order, fp32, at step STEP of seed SEED.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from domainlm.data.blocks import BlockDataset, epoch_order
from domainlm.data.tokens import read_documents, tokenize_documents
from domainlm.model.distributed import (
    context_from_env,
    setup_distributed,
    teardown_distributed,
    wrap_model,
)
from domainlm.model.fastpath import use_fast_kernels
from domainlm.model.loading import load_model
from domainlm.model.loss import CausalLMLoss
from domainlm.run.step import accumulate_gradients

BLOCK_SIZE, BATCH_SIZE, GLOBAL_BLOCKS, SEED, STEP = 32, 2, 4, 42, 3


def step_gradients(model_dir: str, train_file: str, grad_accum: int) -> dict[str, torch.Tensor]:
    """{parameter name: gradient} after one step's forward/backward passes over all micro-batches
    of this rank (the same on every rank under DDP)."""
    ctx = setup_distributed(timeout_s=120)
    try:
        loaded = load_model(model_dir)
        model = loaded.model.train()  # dropout on, as in training, where the model has any
        use_fast_kernels(model)
        stream = tokenize_documents(
            read_documents(train_file), loaded.tokenizer, loaded.eos_id, np.int64
        )
        dataset = BlockDataset(stream, BLOCK_SIZE)
        blocks = epoch_order(len(dataset), 0, SEED)[:GLOBAL_BLOCKS]
        device = torch.device("cpu")
        module = wrap_model(CausalLMLoss(model), ctx, device, "ddp")
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        accumulate_gradients(
            module, dataset, blocks, BATCH_SIZE, grad_accum, ctx, device, "fp32", scaler,
            seed=SEED, step=STEP,
        )  # fmt: skip
        return {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    finally:
        teardown_distributed(ctx)


if __name__ == "__main__":
    model_dir, train_file, out_file, accum = sys.argv[1:5]
    grads = step_gradients(model_dir, train_file, int(accum))
    if context_from_env().is_main:
        torch.save(grads, Path(out_file))
