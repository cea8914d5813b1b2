"""The architecture matrix (issue 15, item 4): every family of tests/tiny_families.py through
domainlm's loss, training with exact resume, `domainlm perplexity`, greedy `domainlm generate`
and `--packing docs`, each against a slow reference that runs the transformers model directly.

Training modes: `MODES` lists them (full fine-tuning and LoRA) and `mode_options(mode)` gives a
mode's extra `domainlm train` flags; `model_folder` is where a mode's plain model folder lies. A family's tiny model and its reference training
run are built once per module. The run's plots are skipped (`no_plots`): they are not what is
tested here, and they were a third of each run's time.
"""

from __future__ import annotations

import copy
import math
import os
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ModuleTemp, uneven_corpus, write_lines
from tiny_families import EOS, FAMILIES, PACKS_DOCUMENTS, build_family_model, save_family_folder

from domainlm.cli import main
from domainlm.data.blocks import IGNORE_INDEX, BlockDataset
from domainlm.data.packing import check_packing_support
from domainlm.data.tokens import tokenize_documents
from domainlm.evaluation.perplexity import PerplexityConfig, evaluate_perplexity
from domainlm.model.fastpath import use_fast_kernels
from domainlm.model.loading import gpt2_tokenizer
from domainlm.model.loss import CausalLMLoss, linear_head
from domainlm.run import guard
from domainlm.run.metrics import read_events
from domainlm.text.generate import GenerateConfig, generate

FAMILY_NAMES = list(FAMILIES)
MODES = ["full", "lora"]
STEPS, STOP_AFTER = 4, 2
BLOCK = 32


def mode_options(mode: str) -> list[str]:
    """The extra `domainlm train` flags of a training mode."""
    return {"full": [], "lora": ["--lora"]}[mode]


def model_folder(out: Path, mode: str) -> Path:
    """The plain model folder a run writes: the output folder, or for LoRA the adapter merged
    into its base (`merged/`; the output folder itself is the adapter)."""
    return out / "merged" if mode == "lora" else out


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workdir(module_tmp: ModuleTemp) -> Path:
    return module_tmp.mktemp("architectures")


@pytest.fixture(scope="module")
def corpus(workdir: Path) -> tuple[Path, Path]:
    docs = uneven_corpus(50, seed=3)
    return (
        write_lines(workdir / "train.txt", docs[:42]),
        write_lines(workdir / "valid.txt", docs[42:]),
    )


@pytest.fixture(scope="module")
def family_dir(workdir: Path) -> Callable[[str], Path]:
    """family -> its tiny random-init model folder, saved once."""
    folders: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in folders:
            folders[family] = save_family_folder(family, workdir / "models" / family)
        return folders[family]

    return get


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    """GPT-2's tokenizer, which every family's folder holds."""
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def no_plots() -> object:
    import domainlm.run.report as report

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report, "plot_runs", lambda runs, output_dir: [])
        yield


def train_argv(model: Path, corpus: tuple[Path, Path], out: Path, mode: str) -> list[str]:
    return [
        "train", "--model", str(model), "--train-file", str(corpus[0]),
        "--validation-file", str(corpus[1]), "--output-dir", str(out),
        "--cache-dir", str(out.parent / "token-cache"), "--block-size", str(BLOCK),
        "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-2", "--max-steps", str(STEPS),
        "--save-steps", "100", "--eval-steps", "100", "--precision", "fp32", "--quiet",
        *mode_options(mode),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(
    workdir: Path, corpus: tuple[Path, Path], family_dir: Callable[[str], Path], no_plots: object
) -> Callable[[str, str], Path]:
    """(family, mode) -> the output folder of an uninterrupted run of STEPS steps, run once."""
    runs: dict[tuple[str, str], Path] = {}

    def get(family: str, mode: str) -> Path:
        if (family, mode) not in runs:
            out = workdir / "runs" / f"{family}-{mode}"
            assert main(train_argv(family_dir(family), corpus, out, mode)) == 0
            runs[family, mode] = out
        return runs[family, mode]

    return get


def events(out: Path) -> list[dict]:
    rows = read_events(out / "metrics.jsonl")
    for row in rows:
        row.pop("tokens_per_s", None)  # the only field that depends on timing
    return rows


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


# ----------------------------------------------------------------------------- (a) the loss


def model_and_batch(family: str, **overrides: object) -> tuple[torch.nn.Module, torch.Tensor]:
    """The family's model in train mode and a (2, 41) batch whose second row ends in padding."""
    model = build_family_model(family, **overrides).train()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50257, (2, 41), generator=generator)
    return model, ids


def loss_and_grads(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, ours: bool):
    """Mean NLL per target token and {parameter: gradient}: domainlm's loss (with the fast
    kernels, as training runs it) or the model's own `labels=` loss."""
    model.zero_grad()
    if ours:
        targets = labels[:, 1:]
        loss = CausalLMLoss(model)(ids[:, :-1], targets).sum() / (targets != IGNORE_INDEX).sum()
    else:
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def assert_same_loss_and_grads(family: str, **overrides: object) -> None:
    model, ids = model_and_batch(family, **overrides)
    labels = ids.clone()
    labels[1, 30:] = IGNORE_INDEX  # padding, as the short last block of an epoch has
    reference = copy.deepcopy(model)
    use_fast_kernels(model)
    loss, grads = loss_and_grads(model, ids, labels, ours=True)
    ref_loss, ref_grads = loss_and_grads(reference, ids, labels, ours=False)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        ref = ref_grads[name]
        scale = float(ref.abs().max())
        assert float((grad - ref).abs().max()) <= 1e-4 * scale + 1e-9, name


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_loss_and_gradients_equal_the_models_own_loss(family: str) -> None:
    assert_same_loss_and_grads(family)


# The families whose logits are head(base_model(...)): domainlm's chunked head, never full logits.
# Gemma 2 soft-caps its logits and Granite scales them after the head: the full logits.
CHUNKED = {f for f in FAMILY_NAMES if f not in ("gemma2", "granite")}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_which_loss_path_each_family_takes(family: str) -> None:
    assert (linear_head(build_family_model(family)) is not None) == (family in CHUNKED)


def test_softcapped_logits_take_the_full_logits_path() -> None:
    """Gemma 2 soft-caps its logits after the head (tanh(x / c) * c): with the cap set the loss
    must come from the full logits (model/loss.py LOGIT_TRANSFORMS), and without it the chunked
    head must agree with the model too."""
    capped = build_family_model("gemma2")
    assert capped.config.final_logit_softcapping == 0.5
    assert linear_head(capped) is None
    assert linear_head(build_family_model("gemma2", final_logit_softcapping=None)) is not None
    assert_same_loss_and_grads("gemma2", final_logit_softcapping=None)


# ----------------------------------------------------------------------------- (b) resume


def stop_after_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """SIGTERM this process after `step` (the run's own graceful stop: it saves that step)."""
    calls = iter(range(1, 10_000))

    def delay() -> None:
        if next(calls) == step:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(guard, "step_delay", delay)


# Resumed in every test run: one family per kind of checkpoint (rotary positions, grouped
# key/value heads and an untied head; a tied head with soft-capped logits on the full-logits path;
# learned absolute positions). The other families' resumes are marked slow (3 training runs each).
RESUMED_BY_DEFAULT = ("llama", "gemma2", "opt")
RESUME_FAMILIES = [
    f if f in RESUMED_BY_DEFAULT else pytest.param(f, marks=pytest.mark.slow) for f in FAMILY_NAMES
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", RESUME_FAMILIES)
def test_stopped_and_resumed_run_is_bit_identical(
    family: str, mode: str, trained, family_dir, corpus, workdir, monkeypatch
) -> None:
    reference = trained(family, mode)
    out = workdir / "resumed" / f"{family}-{mode}"
    argv = train_argv(family_dir(family), corpus, out, mode)
    with monkeypatch.context() as patch:
        stop_after_step(patch, STOP_AFTER)
        assert main(argv) != 0  # stopped by the signal, checkpoint saved
    final_weights = model_folder(out, mode) / "model.safetensors"
    assert (out / f"checkpoint-{STOP_AFTER}").is_dir() and not final_weights.exists()
    assert main(argv) == 0  # resumed (--resume auto)
    assert events(out) == events(reference)  # same steps, losses, learning rates, perplexities
    ours, theirs = weights(model_folder(out, mode)), weights(model_folder(reference, mode))
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


# ----------------------------------------------------------------------------- (c) perplexity


def reference_perplexity(folder: Path, tokenizer, lines: list[str], block: int, stride: int):  # type: ignore[no-untyped-def]
    """exp(sum NLL / N) over the stream [EOS] d1 EOS d2 ..., each token predicted once by the
    transformers model run directly on the window before it, float64 log-softmax and sum."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens = [EOS]
    for line in lines:
        tokens += tokenizer(line, add_special_tokens=False)["input_ids"] + [EOS]
    total, count = 0.0, 0
    for a in range(1, len(tokens), stride):  # the window predicting tokens [a, b)
        b = min(a + stride, len(tokens))
        c = max(0, a - (block - stride))
        with torch.no_grad():
            logits = model(torch.tensor([tokens[c : b - 1]])).logits[0]
        logp = torch.log_softmax(logits[a - 1 - c :].double(), dim=-1)
        for t in range(a, b):
            total -= float(logp[t - a, tokens[t]])
            count += 1
    return math.exp(total / count), count


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_perplexity_equals_the_slow_reference(
    family: str, mode: str, trained, corpus, tokenizer
) -> None:
    folder = trained(family, mode)
    lines = corpus[1].read_text(encoding="utf-8").splitlines()
    (report,) = evaluate_perplexity(
        PerplexityConfig(
            model=[str(folder)], file=str(corpus[1]), block_size=BLOCK, stride=BLOCK // 2,
            batch_size=3, quiet=True,
        )
    )  # fmt: skip
    # the run's folder as `--model` (for LoRA: the adapter on its base); the reference runs the
    # plain model folder (for LoRA: the merged one) with transformers alone
    plain = model_folder(folder, mode)
    perplexity, tokens = reference_perplexity(plain, tokenizer, lines, BLOCK, BLOCK // 2)
    assert report.tokens == tokens
    assert report.perplexity == pytest.approx(perplexity, rel=1e-5)


# ----------------------------------------------------------------------------- (d) generate

PROMPTS = ["The cat sat on", "I", "a long line of words to continue from here"]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_greedy_generation_equals_transformers_generate(family: str, family_dir, tokenizer) -> None:
    """`domainlm generate --temperature 0` (the prompts batched, left-padded) against
    transformers' own `generate(do_sample=False)` on each prompt alone, `[EOS] prompt` ids."""
    from transformers import AutoModelForCausalLM

    folder = family_dir(family)
    samples = generate(
        GenerateConfig(model=str(folder), prompts=PROMPTS, temperature=0, max_new_tokens=12)
    )
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for sample, prompt in zip(samples, PROMPTS, strict=True):
        ids = torch.tensor([[EOS, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]])
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
            eos_token_id=EOS, pad_token_id=EOS,
        )[0, ids.shape[1] :].tolist()  # fmt: skip
        expected = out[: out.index(EOS)] if EOS in out else out
        assert sample.tokens == expected, prompt
    assert len({tuple(s.tokens) for s in samples}) > 1  # the prompts matter


# ----------------------------------------------------------------------------- (e) packing


def per_document_check(model: torch.nn.Module, tokenizer) -> int:  # type: ignore[no-untyped-def]
    """Packed blocks (`--packing docs`) score each whole document in them exactly as that
    document alone (`[EOS] d` predicting `d EOS`, its own forward pass); returns documents checked."""
    stream = tokenize_documents(uneven_corpus(30, seed=3), tokenizer, EOS, np.uint16)
    dataset = BlockDataset(stream, BLOCK * 2, packing="docs")
    starts, checked = stream.doc_starts, 0
    for index in range(4):
        lo, hi = index * BLOCK * 2, (index + 1) * BLOCK * 2
        batch = dataset.batch([index])
        with torch.no_grad():
            logits = model(
                input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False
            ).logits[0]
            per_token = torch.nn.functional.cross_entropy(
                logits.float(), batch.targets[0], reduction="none"
            )
            row = float(CausalLMLoss(model)(batch.input_ids, batch.targets, batch.position_ids)[0])
        assert row == pytest.approx(float(per_token.sum()), rel=1e-5)
        for d in range(stream.num_documents):
            a, b = starts[d] - 1 - lo, starts[d + 1] - 1 - lo
            if a < 0 or b > hi - lo:  # only the documents wholly inside the block
                continue
            seq = torch.tensor([[EOS, *stream.tokens[starts[d] : starts[d + 1]].tolist()]])
            with torch.no_grad():
                alone = float(CausalLMLoss(model)(seq[:, :-1], seq[:, 1:])[0])
            assert float(per_token[a:b].sum()) == pytest.approx(alone, rel=1e-5, abs=1e-5)
            checked += 1
    return checked


@pytest.mark.parametrize("family", sorted(PACKS_DOCUMENTS))
def test_packed_documents_score_as_if_alone(family: str, tokenizer) -> None:
    model = build_family_model(family)
    check_packing_support(model)
    assert per_document_check(model, tokenizer) >= 4


@pytest.mark.parametrize("family", sorted(set(FAMILY_NAMES) - PACKS_DOCUMENTS))
def test_packing_docs_is_refused_where_position_ids_do_not_separate_documents(
    family: str, family_dir, corpus, workdir, capsys
) -> None:
    out = workdir / "refused" / family
    argv = train_argv(family_dir(family), corpus, out, "full")
    capsys.readouterr()
    assert main([*argv, "--packing", "docs"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("domainlm: error:")]
    assert errors == [err.strip().splitlines()[-1]] and "Traceback" not in err, err
    assert errors[0].startswith("domainlm: error: --packing docs:")
    assert errors[0].endswith("use --packing concat")
    assert not out.exists() or not any(out.iterdir())
