"""Documents follow each tokenizer's convention: `BOS d EOS` where it puts a BOS, GPT-2's stream
unchanged, one end token per document for BERT-style tokenizers, no EOS refused (issue 15 item 3).

Real tokenizers built offline here: a SentencePiece model trained on a small corpus and loaded as
a Llama tokenizer that adds BOS; GPT-2's byte-level BPE (no BOS); a `tokenizers` WordPiece with
BERT's `[CLS] text [SEP]` template; a word-level tokenizer with no EOS at all. The references
build `BOS + tokens(d) + EOS` from the tokenizer's own `add_special_tokens=False` ids and run the
Hugging Face model directly with a float64 log-softmax: no domainlm code.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ModuleTemp, uneven_corpus, write_lines

from domainlm.data.blocks import IGNORE_INDEX, BlockDataset
from domainlm.data.tokens import CACHE_FORMAT_VERSION, load_token_stream, tokenize_documents
from domainlm.errors import UserError
from domainlm.model.loading import load_model, tokenizer_fingerprint

DOCS = uneven_corpus(12, seed=3)[:6] + ["a b", "x"]
SP_CORPUS = uneven_corpus(300, seed=1) + ["hello world, a small corpus of words."] * 5


def _tiny_llama(vocab_size: int, bos: int | None, eos: int | None, seed: int = 0):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama_dir(module_tmp: ModuleTemp) -> Path:
    """A Llama-style folder: SentencePiece BPE trained here, a tokenizer that adds BOS, random weights."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder = module_tmp.mktemp("llama")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_CORPUS), model_writer=model, vocab_size=120, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("a b")["input_ids"][0] == 1  # the convention under test: BOS first
    _tiny_llama(len(tokenizer), 1, 2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _wordpiece_folder(
    folder: Path, specials: list[str], template: str | None, **tokens: str
) -> Path:
    """A `tokenizers` WordPiece over the corpus's words, wrapped for transformers, with a tiny GPT-2."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = sorted({w for d in DOCS + uneven_corpus(60) for w in d.split()})
    vocab = {t: i for i, t in enumerate(specials + words)}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    if template is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(t, vocab[t]) for t in ("[CLS]", "[SEP]")]
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", **tokens)
    tokenizer.save_pretrained(folder)
    config = GPT2Config(vocab_size=len(vocab), n_layer=2, n_head=2, n_embd=64, n_positions=128)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert_dir(module_tmp: ModuleTemp) -> Path:
    """BERT-style (uer/gpt2-chinese-*): `[CLS] text [SEP]`, no EOS token."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return _wordpiece_folder(
        module_tmp.mktemp("bert"), specials, "[CLS] $A [SEP]",
        cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]",
    )  # fmt: skip


@pytest.fixture(scope="module")
def no_eos_dir(module_tmp: ModuleTemp) -> Path:
    """A tokenizer with no EOS and no SEP: only unknown and padding tokens are special."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]  # in the vocabulary, but not declared
    return _wordpiece_folder(module_tmp.mktemp("no-eos"), specials, None, pad_token="[PAD]")


def bare_ids(tokenizer, text: str) -> list[int]:  # type: ignore[no-untyped-def]
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------- the convention


def test_probe_learns_each_tokenizers_convention(llama_dir, bert_dir, tiny_model_dir):
    llama = load_model(str(llama_dir))
    assert (llama.eos_id, llama.document_prefix, llama.start_ids) == (2, (1,), [1])
    gpt2 = load_model(str(tiny_model_dir))
    assert (gpt2.eos_id, gpt2.document_prefix, gpt2.start_ids) == (50256, (), [50256])
    bert = load_model(str(bert_dir))
    cls, sep = bert.tokenizer.cls_token_id, bert.tokenizer.sep_token_id
    assert bert.tokenizer.eos_token_id is None
    assert (bert.eos_id, bert.document_prefix, bert.start_ids) == (sep, (cls,), [cls])


def test_bos_equal_to_eos_is_not_doubled():
    """GPT-2's tokenizer told to add BOS adds `<|endoftext|>`, its EOS: the stream stays GPT-2's."""
    from domainlm.model.loading import document_prefix, gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    tokenizer.add_bos_token = True
    assert tokenizer("a")["input_ids"][0] == 50256
    assert document_prefix(tokenizer, 50256) == ()


def test_streams_follow_each_convention_exactly(llama_dir, bert_dir, tiny_model_dir, tmp_path):
    """In memory and streamed through the cache, one end token per document in every kind."""
    path = write_lines(tmp_path / "docs.txt", DOCS)
    for folder in (llama_dir, bert_dir, tiny_model_dir):
        loaded = load_model(str(folder))
        tok, eos = loaded.tokenizer, loaded.eos_id
        expected: list[int] = []
        if folder == llama_dir:  # BOS d1 EOS BOS d2 EOS ...
            for doc in DOCS:
                expected += [tok.bos_token_id, *bare_ids(tok, doc), eos]
        elif folder == bert_dir:  # [CLS] d1 [SEP] [CLS] d2 [SEP] ...
            for doc in DOCS:
                expected += [tok.cls_token_id, *bare_ids(tok, doc), tok.sep_token_id]
        else:  # [EOS] d1 EOS d2 EOS ...
            expected = [eos]
            for doc in DOCS:
                expected += [*bare_ids(tok, doc), eos]
        prefix = loaded.document_prefix
        memory = tokenize_documents(DOCS, tok, eos, np.uint32, prefix)
        fingerprint = tokenizer_fingerprint(tok, eos, prefix)
        streamed = load_token_stream(path, tok, eos, fingerprint, tmp_path / "c", prefix=prefix)
        for stream in (memory, streamed.stream):
            assert np.asarray(stream.tokens).tolist() == expected
            assert stream.num_predicted == sum(len(bare_ids(tok, d)) + 1 for d in DOCS)
            assert np.asarray(stream.tokens).tolist().count(eos) == len(DOCS) + (not prefix)
        assert streamed.stream.doc_starts.tolist() == memory.doc_starts.tolist()


def test_cache_key_changes_with_the_convention_and_gpt2s_does_not(tiny_model_dir, tmp_path):
    from domainlm.data.corpus import corpus_fingerprint

    path = write_lines(tmp_path / "docs.txt", DOCS)
    loaded = load_model(str(tiny_model_dir))
    tok, eos = loaded.tokenizer, loaded.eos_id
    fingerprint = tokenizer_fingerprint(tok, eos)
    plain = load_token_stream(path, tok, eos, fingerprint, tmp_path / "c")
    # GPT-2's key is the formula of before the prefix existed: its caches stay valid.
    old = "|".join([CACHE_FORMAT_VERSION, corpus_fingerprint(path), fingerprint, str(eos), "line",
                    "strict"])  # fmt: skip
    assert plain.key == hashlib.sha256(old.encode()).hexdigest()[:24]
    assert tokenizer_fingerprint(tok, eos, ()) == fingerprint
    with_bos = load_token_stream(path, tok, eos, fingerprint, tmp_path / "c", prefix=(5,))
    assert with_bos.key != plain.key and not with_bos.cache_hit
    assert np.asarray(with_bos.stream.tokens)[0] == 5
    assert tokenizer_fingerprint(tok, eos, (5,)) != fingerprint


def test_no_eos_is_refused_until_eos_token_is_given(no_eos_dir, capsys):
    from domainlm.cli import main

    with pytest.raises(UserError, match="--eos-token"):
        load_model(str(no_eos_dir))
    code = main(["perplexity", "--model", str(no_eos_dir), "--text", "a b", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--eos-token" in err and len(err.splitlines()) == 1
    loaded = load_model(str(no_eos_dir), eos_token="[SEP]")
    assert loaded.eos_id == loaded.tokenizer.convert_tokens_to_ids("[SEP]")
    assert loaded.document_prefix == ()  # it adds nothing: GPT-2's stream, with [SEP]


# ----------------------------------------------------------------------------- BOS is context


def _bos_positions(tokens: list[int], bos: int) -> set[int]:
    return {i for i, t in enumerate(tokens) if t == bos}


@pytest.mark.parametrize("block", [5, 16])
def test_bos_is_never_a_target_in_training_blocks(llama_dir, block):
    loaded = load_model(str(llama_dir))
    stream = tokenize_documents(DOCS, loaded.tokenizer, 2, np.uint16, loaded.document_prefix)
    tokens = stream.tokens.tolist()
    bos_at = _bos_positions(tokens, 1)
    expected = [t for i, t in enumerate(tokens) if i > 0 and i not in bos_at]
    for packing in ("concat", "docs"):
        dataset = BlockDataset(stream, block, packing)
        got: list[int] = []
        for k in range(len(dataset)):
            batch = dataset.batch([k])
            inputs, targets = batch.input_ids[0].tolist(), batch.targets[0].tolist()
            scored = [t for t in targets if t != IGNORE_INDEX]
            assert dataset.targets_in(k) == len(scored)
            # labels = ignore index wherever the next stream token is a BOS
            for col in range(block):
                if k * block + 1 + col in bos_at:
                    assert targets[col] == IGNORE_INDEX
            got += scored
            if packing == "docs":  # a document's positions start at its BOS
                positions = batch.position_ids[0].tolist()
                for col in range(block):
                    if k * block + col in bos_at:
                        assert inputs[col] == 1 and positions[col] == 0
        assert got == expected  # every non-BOS token once, in order; no BOS
        assert (
            len(got)
            == stream.num_predicted
            == sum(dataset.targets_in(k) for k in range(len(dataset)))
        )


def _nll_reference(model, stream: list[int], bos_at: set[int], block: int, stride: int):  # type: ignore[no-untyped-def]
    """Windows of docs/perplexity.md run one at a time; BOS positions skipped. (sum, count)."""
    total, count = 0.0, 0
    for a in range(1, len(stream), stride):
        begin, end = max(0, a - (block - stride)), min(a + stride, len(stream))
        with torch.no_grad():
            logits = model(torch.tensor([stream[begin:end]])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        for p in range(a, end):
            if p not in bos_at:
                total -= float(logp[p - begin - 1, stream[p]])
                count += 1
    return total, count


def _doc_alone(model, tokenizer, doc: str) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    """NLL of `tokens(d) EOS` given BOS, from one forward pass over `BOS + tokens(d) + EOS`."""
    ids = [tokenizer.bos_token_id, *bare_ids(tokenizer, doc), tokenizer.eos_token_id]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return -sum(float(logp[i - 1, ids[i]]) for i in range(1, len(ids))), len(ids) - 1


def test_perplexity_equals_the_reference_on_bos_doc_eos(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domainlm.evaluation.perplexity import PerplexityConfig, evaluate_perplexity

    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(llama_dir)
    stream: list[int] = []
    for doc in DOCS:
        stream += [tok.bos_token_id, *bare_ids(tok, doc), tok.eos_token_id]
    bos_at = _bos_positions(stream, tok.bos_token_id)
    path = write_lines(tmp_path / "valid.txt", DOCS)
    per_line = tmp_path / "lines.jsonl"
    for block, stride in ((16, 15), (16, 4), (128, 127)):
        (report,) = evaluate_perplexity(
            PerplexityConfig(model=[str(llama_dir)], file=str(path), block_size=block,
                             stride=stride, batch_size=3, per_line=str(per_line), quiet=True)
        )  # fmt: skip
        ref_sum, ref_count = _nll_reference(model, stream, bos_at, block, stride)
        assert report.tokens == ref_count == sum(len(bare_ids(tok, d)) + 1 for d in DOCS)
        assert report.perplexity == pytest.approx(math.exp(ref_sum / ref_count), rel=1e-5)
        records = [json.loads(line) for line in per_line.read_text().splitlines()]
        for doc, record in zip(DOCS, records, strict=True):
            if block == 128:  # one window per line: exactly one pass over BOS + doc + EOS
                line_sum, line_count = _doc_alone(model, tok, doc)
                assert record["tokens"] == line_count
                assert record["perplexity"] == pytest.approx(
                    math.exp(line_sum / line_count), rel=1e-5
                )


def test_packed_documents_score_as_bos_doc_eos_alone(llama_dir):
    """`--packing docs`: one block holding every document gives the sum of each scored alone."""
    from transformers import AutoModelForCausalLM

    from domainlm.data.packing import check_packing_support
    from domainlm.model.loss import CausalLMLoss

    loaded = load_model(str(llama_dir))
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    check_packing_support(model)
    docs = DOCS[:4]
    stream = tokenize_documents(docs, loaded.tokenizer, 2, np.uint16, loaded.document_prefix)
    dataset = BlockDataset(stream, len(stream.tokens) - 1, "docs")
    batch = dataset.batch([0])
    with torch.no_grad():
        packed = float(CausalLMLoss(model)(batch.input_ids, batch.targets, batch.position_ids)[0])
    alone = sum(_doc_alone(model, loaded.tokenizer, d)[0] for d in docs)
    assert packed == pytest.approx(alone, rel=1e-5)


# ----------------------------------------------------------------------------- generation


def _record_prompts(monkeypatch):  # type: ignore[no-untyped-def]
    """The rows the token loop feeds the model first: its `start` before each prompt's ids."""
    from domainlm.text import sampling

    seen: list[list[int]] = []
    real = sampling.sample_batch

    def spy(model, prompts, **kwargs):  # type: ignore[no-untyped-def]
        start = kwargs.get("start") or [kwargs["eos_id"]]
        seen.extend([*start, *p] for p in prompts)
        return real(model, prompts, **kwargs)

    monkeypatch.setattr(sampling, "sample_batch", spy)
    return seen


def test_generation_prompt_ids_begin_with_bos(llama_dir, tiny_model_dir, monkeypatch):
    from domainlm.text.generate import GenerateConfig, generate

    seen = _record_prompts(monkeypatch)
    for folder, first in ((llama_dir, 1), (tiny_model_dir, 50256)):
        seen.clear()
        loaded = load_model(str(folder))
        (sample,) = generate(
            GenerateConfig(model=str(folder), prompts=["b a c"], temperature=0, max_new_tokens=4)
        )
        assert seen == [[first, *bare_ids(loaded.tokenizer, "b a c")]]
        # Greedy: the same tokens as argmax over the model fed those ids directly.
        ids = list(seen[0])
        for token in sample.tokens:
            with torch.no_grad():
                nxt = int(loaded.model(torch.tensor([ids])).logits[0, -1].argmax())
            assert nxt == token
            ids.append(nxt)


def test_training_validates_and_samples_with_bos(llama_dir, tmp_path, monkeypatch):
    """A run on the Llama-style model: validation is `domainlm perplexity`'s number on the same
    file and windows, and the samples while training start from BOS."""
    from domainlm import TrainConfig, train
    from domainlm.evaluation.perplexity import PerplexityConfig, evaluate_perplexity

    seen = _record_prompts(monkeypatch)
    train_file = write_lines(tmp_path / "train.txt", uneven_corpus(30, seed=2))
    valid_file = write_lines(tmp_path / "valid.txt", DOCS)
    result = train(
        TrainConfig(model=str(llama_dir), train_file=str(train_file),
                    validation_file=str(valid_file), output_dir=str(tmp_path / "out"),
                    block_size=32, batch_size=4, max_steps=2, eval_steps=2, save_steps=2,
                    sample_prompts=["a b"], sample_max_new_tokens=3, quiet=True,
                    packing="docs", precision="fp32", report_to=[])
    )  # fmt: skip
    (report,) = evaluate_perplexity(
        PerplexityConfig(model=[str(llama_dir)], file=str(valid_file), block_size=32, quiet=True)
    )
    assert result.initial_perplexity == pytest.approx(report.perplexity, rel=1e-5)
    tok = load_model(str(llama_dir)).tokenizer
    assert seen and all(row == [1, *bare_ids(tok, "a b")] for row in seen)


# ----------------------------------------------------------------------------- the other readers


def test_memorization_index_and_inspect_leave_the_bos_out(llama_dir):
    from domainlm.data.lint import count_long_documents
    from domainlm.inspect_data import stream_stats
    from domainlm.text.memorize import NgramIndex

    loaded = load_model(str(llama_dir))
    tok = loaded.tokenizer
    stream = tokenize_documents(DOCS, tok, 2, np.uint16, loaded.document_prefix)
    index = NgramIndex.build(stream)
    for i, doc in enumerate(DOCS):
        assert index.document_tokens(i).tolist() == bare_ids(tok, doc)
    span = index.longest_copy(bare_ids(tok, DOCS[0]))
    assert span is not None and span.document == 0
    stats = stream_stats(stream, 16)
    lengths = [len(bare_ids(tok, d)) for d in DOCS]
    assert stats["tokens"] == sum(lengths) + len(DOCS)
    assert stats["tokens_per_document"]["max"] == max(lengths)
    assert stats["tokens_per_document"]["min"] == min(lengths)
    # Too long for a block: BOS + tokens (the inputs that predict the document) exceed it.
    for block in (8, 12, 20):
        expected = sum(1 + n > block for n in lengths)
        assert count_long_documents(stream.doc_starts, block, stream.prefix_length) == expected


def test_text_the_vocabulary_does_not_cover_is_warned_of(
    bert_dir, tiny_model_dir, tmp_path, capsys
):
    """A BERT-style vocabulary (uer/gpt2-chinese-*) turns text outside it (another script,
    emoji) into [UNK]: lint said "no problems found" while most tokens were [UNK]. inspect and
    train now say how many; a covered text, and GPT-2 (whose unk_token is its EOS, in every
    document), are not warned of."""
    from domainlm.cli import main

    covered = write_lines(tmp_path / "covered.txt", DOCS * 3)
    foreign = write_lines(tmp_path / "foreign.txt", ["こんにちは 世界 です", *DOCS] * 3)
    said = "are the tokenizer's unknown token [UNK]: its vocabulary does not cover this text"
    for model, file, warned in ((bert_dir, foreign, True), (bert_dir, covered, False),
                                (tiny_model_dir, foreign, False)):  # fmt: skip
        assert main(["inspect", "--model", str(model), "--train-file", str(file), "--json",
                     "--time-steps", "0", "--block-size", "16"]) == 0  # fmt: skip
        warnings = json.loads(capsys.readouterr().out)["warnings"]
        assert any(said in w for w in warnings) is warned, (model, file, warnings)
    # the count, from the tokenizer itself: the foreign line's [UNK]s, three times
    tokenizer = load_model(str(bert_dir)).tokenizer
    unknown = 3 * bare_ids(tokenizer, "こんにちは 世界 です").count(tokenizer.unk_token_id)
    assert unknown >= 3
    out = tmp_path / "run"
    assert main(["train", "--model", str(bert_dir), "--train-file", str(foreign), "--output-dir",
                 str(out), "--block-size", "16", "--max-steps", "1", "--quiet"]) == 0  # fmt: skip
    assert f"{foreign}: {unknown} of its" in capsys.readouterr().err
