"""--packing docs: a packed block scores each of its documents exactly as if it were alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import uneven_corpus

from domainlm.data.blocks import BlockDataset
from domainlm.data.packing import check_packing_support, segment_positions
from domainlm.data.tokens import TokenStream, tokenize_documents
from domainlm.errors import UserError
from domainlm.model.loading import gpt2_tokenizer, load_model
from domainlm.model.loss import CausalLMLoss

EOS = 50256
BLOCK = 64


def _stream() -> TokenStream:
    docs = uneven_corpus(30, seed=3)
    return tokenize_documents(docs, gpt2_tokenizer(), EOS, np.uint16)


def _alone_nll(model: torch.nn.Module, doc_tokens: np.ndarray) -> float:
    """The obvious reference: `[EOS] d` predicting `d EOS`, in its own forward pass."""
    seq = torch.tensor(np.concatenate([[EOS], doc_tokens, [EOS]]).astype(np.int64))[None]
    with torch.no_grad():
        return float(CausalLMLoss(model)(seq[:, :-1], seq[:, 1:])[0])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_block_loss_equals_documents_scored_alone(tiny_model_dir, attention):
    model = load_model(str(tiny_model_dir)).model.eval()
    model.config._attn_implementation = attention
    stream = _stream()
    dataset = BlockDataset(stream, BLOCK, packing="docs")
    starts = stream.doc_starts
    checked = 0
    for index in range(len(dataset) - 1):
        lo, hi = index * BLOCK, (index + 1) * BLOCK  # input positions of the block
        # documents whose whole segment [start-1, end-1) lies inside the block
        inside = [
            d
            for d in range(stream.num_documents)
            if starts[d] - 1 >= lo and starts[d + 1] - 1 <= hi
        ]
        if len(inside) < 2:
            continue
        batch = dataset.batch([index])
        with torch.no_grad():
            per_token = torch.nn.functional.cross_entropy(
                model(
                    input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False
                ).logits[0],
                batch.targets[0],
                reduction="none",
            )
            row = float(CausalLMLoss(model)(batch.input_ids, batch.targets, batch.position_ids)[0])
        assert row == pytest.approx(float(per_token.sum()), rel=1e-6)
        for d in inside:
            a, b = starts[d] - 1 - lo, starts[d + 1] - 1 - lo
            packed = float(per_token[a:b].sum())
            alone = _alone_nll(model, np.asarray(stream.tokens[starts[d] : starts[d + 1] - 1]))
            assert packed == pytest.approx(alone, abs=1e-5 * max(1.0, abs(alone)))
        checked += 1
        if checked == 4:
            break
    assert checked == 4


def test_concat_packing_does_not_isolate_documents(tiny_model_dir):
    """The same comparison fails under concat: the test above can fail."""
    model = load_model(str(tiny_model_dir)).model.eval()
    stream = _stream()
    concat = BlockDataset(stream, BLOCK, packing="concat").batch([1])
    docs = BlockDataset(stream, BLOCK, packing="docs").batch([1])
    assert concat.position_ids is None
    with torch.no_grad():
        a = CausalLMLoss(model)(concat.input_ids, concat.targets)
        b = CausalLMLoss(model)(docs.input_ids, docs.targets, docs.position_ids)
    assert abs(float(a[0]) - float(b[0])) > 1e-2


def test_segment_positions_restart_at_each_documents_eos():
    # documents of 3, 2 and 4 tokens (each + EOS): starts 1, 5, 8, 13
    starts = np.array([1, 5, 8, 13])
    assert segment_positions(starts, 0, 13).tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4, 5]
    # a block starting inside document 0: positions restart at the block start
    assert segment_positions(starts, 2, 6).tolist() == [0, 1, 0, 1, 2, 0]


def test_empty_slot_and_padding_get_positions(tiny_model_dir):
    stream = _stream()
    dataset = BlockDataset(stream, BLOCK, packing="docs")
    batch = dataset.batch([len(dataset) - 1, -1])
    assert batch.position_ids.shape == batch.input_ids.shape
    assert batch.position_ids[1].tolist() == list(range(BLOCK))


def test_model_that_ignores_position_ids_is_refused():
    class Mixer(torch.nn.Module):
        """Attends to everything before it whatever the position ids (a model with its own mask)."""

        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(16, 4)

        def get_input_embeddings(self) -> torch.nn.Module:
            return self.emb

        def forward(self, input_ids, position_ids=None, use_cache=False):
            class Out:
                logits = self.emb(input_ids).cumsum(dim=1)

            return Out()

    with pytest.raises(UserError, match="--packing concat"):
        check_packing_support(Mixer())


def test_gpt2_passes_the_packing_check(tiny_model_dir):
    check_packing_support(load_model(str(tiny_model_dir)).model)


def test_training_runs_under_docs_packing(tmp_path, tiny_model_dir):
    from conftest import write_lines

    from domainlm.config import TrainConfig
    from domainlm.run.train import train

    docs = uneven_corpus(40, seed=8)
    result = train(
        TrainConfig(
            model=str(tiny_model_dir),
            train_file=str(write_lines(tmp_path / "train.txt", docs)),
            output_dir=str(tmp_path / "run"),
            block_size=32,
            batch_size=2,
            max_steps=2,
            save_steps=2,
            packing="docs",
            quiet=True,
        )
    )
    assert result.steps == 2 and result.final_perplexity is not None
    run = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert run["identity"]["packing"] == "docs"


def test_training_forward_with_dropout_on_cpu_isolates_packed_documents(monkeypatch):
    """The CPU training path: a GPT-2 with dropout in train mode attends through fastpath's eager
    formula (`sdpa_unless_cpu_dropout`, with the packed block-diagonal mask). With the dropout
    itself made the identity, each packed document's loss, computed with gradients as training
    does, must equal the document scored alone in evaluation mode (plain sdpa, no dropout)."""
    from domainlm.data.blocks import IGNORE_INDEX
    from domainlm.model import fastpath
    from domainlm.model.fastpath import use_fast_kernels
    from domainlm.model.loading import build_scratch_model

    model = build_scratch_model("tiny", seed=0)  # GPT-2's dropout: 0.1 everywhere
    assert model.config.attn_pdrop == 0.1
    use_fast_kernels(model)
    attention_draws = []

    def identity(x: torch.Tensor, p: float) -> torch.Tensor:
        if x.dim() == 4 and x.shape[-1] == x.shape[-2] == BLOCK:  # attention weights
            attention_draws.append(p)
        return x

    monkeypatch.setattr(fastpath, "cpu_dropout", identity)
    stream = _stream()
    dataset = BlockDataset(stream, BLOCK, packing="docs")
    starts = stream.doc_starts
    loss = CausalLMLoss(model)
    checked = 0
    for index in range(len(dataset) - 1):
        lo, hi = index * BLOCK, (index + 1) * BLOCK
        inside = [
            d
            for d in range(stream.num_documents)
            if starts[d] - 1 >= lo and starts[d + 1] - 1 <= hi
        ]
        if len(inside) < 2:
            continue
        batch = dataset.batch([index])
        for d in inside[1:]:  # documents after the first: there is something to leak from
            a, b = starts[d] - 1 - lo, starts[d + 1] - 1 - lo
            targets = torch.full_like(batch.targets, IGNORE_INDEX)
            targets[:, a:b] = batch.targets[:, a:b]
            model.train()
            draws = len(attention_draws)
            packed = float(loss(batch.input_ids, targets, batch.position_ids)[0].detach())
            assert len(attention_draws) - draws == model.config.n_layer  # the eager path ran
            model.eval()
            alone = _alone_nll(model, np.asarray(stream.tokens[starts[d] : starts[d + 1] - 1]))
            assert packed == pytest.approx(alone, abs=1e-5 * max(1.0, abs(alone)))
        checked += 1
        if checked == 3:
            break
    assert checked == 3
