"""Reading text, the token stream, the cache, blocks and the data order (issue 2, data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from domainlm.data.blocks import (
    IGNORE_INDEX,
    BlockDataset,
    epoch_order,
    micro_batch_indices,
    split_documents,
)
from domainlm.data.tokens import load_token_stream, read_documents, tokenize_documents
from domainlm.errors import UserError
from domainlm.model.loading import gpt2_tokenizer, resolve_eos_id, tokenizer_fingerprint

EOS = 50256


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


def test_txt_skips_blank_lines_and_handles_crlf_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes("\ufeffI have a dream.\r\n\r\n  \r\nSecond line\r\nthird".encode())
    assert read_documents(path) == ["I have a dream.", "Second line", "third"]


def test_jsonl_text_field(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(
        json.dumps({"text": "first doc", "id": 1})
        + "\n\n"
        + json.dumps({"text": "two\nlines"})
        + "\n"
        + json.dumps({"text": None})  # null: an empty document, skipped as a table's null row
        + "\n"
    )
    assert read_documents(path) == ["first doc", "two\nlines"]


def test_a_json_file_is_read_as_json_lines(tmp_path: Path) -> None:
    """`--train-file train.json` means JSON Lines, as in transformers' run_clm.py: the "text"
    field (or --text-column's) of each line, not the line `{"text": ...}` verbatim; a folder
    does not take .json files (configs, dataset_info.json), only the file given."""
    from domainlm.data.corpus import text_files

    path = tmp_path / "train.json"
    lines = [{"text": "first doc", "body": "b1"}, {"text": "two\nlines", "body": "b2"}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert read_documents(path) == ["first doc", "two\nlines"]
    assert read_documents(path, text_column="body") == ["b1", "b2"]
    (tmp_path / "notes.txt").write_text("a note\n")
    assert text_files(tmp_path) == [tmp_path / "notes.txt"]


@pytest.mark.parametrize(
    "content",
    ['[{"text": "a"}, {"text": "b"}]', '[\n  {"text": "a"},\n  {"text": "b"}\n]\n',
     '{\n  "text": "a"\n}\n', '{"text": "multi",\n "x": 1}\n'],
    ids=["array-on-one-line", "array-over-lines", "object-over-lines", "object-from-line-1"],
)  # fmt: skip
def test_a_json_document_not_json_lines_says_how_to_convert(tmp_path: Path, content) -> None:
    path = tmp_path / "train.json"
    path.write_text(content)
    with pytest.raises(UserError, match=r"JSON Lines is expected.*jq -c '\.\[\]'") as info:
        read_documents(path)
    assert "\n" not in str(info.value)


def test_jsonl_without_text_field_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"body": "x"}\n')
    with pytest.raises(UserError, match=r"t.jsonl:1: .*\"text\""):
        read_documents(path)


def test_stream_puts_eos_in_front_and_after_every_document(tokenizer) -> None:
    docs = ["I have a dream", "hello"]
    stream = tokenize_documents(docs, tokenizer, EOS, np.uint16)
    dream = tokenizer("I have a dream").input_ids
    hello = tokenizer("hello").input_ids
    assert stream.tokens.tolist() == [EOS, *dream, EOS, *hello, EOS]
    assert stream.doc_starts.tolist() == [1, 1 + len(dream) + 1, len(stream.tokens)]
    assert stream.num_predicted == len(dream) + 1 + len(hello) + 1
    only_second = stream.select(np.array([1]))
    assert only_second.tokens.tolist() == [EOS, *hello, EOS]


def test_exact_blocks_nothing_dropped_remainder_masked(tokenizer) -> None:
    tokens = np.array([EOS, 10, 11, 12, EOS, 20, 21, EOS], dtype=np.uint16)
    from domainlm.data.tokens import TokenStream

    stream = TokenStream(tokens, np.array([1, 5, 8]))
    dataset = BlockDataset(stream, block_size=3)
    assert len(dataset) == 3  # 7 predicted tokens -> blocks of 3, 3 and 1
    batch = dataset.batch([0, 1, 2])
    assert batch.input_ids.tolist() == [[EOS, 10, 11], [12, EOS, 20], [21, 0, 0]]
    assert batch.targets.tolist() == [
        [10, 11, 12],
        [EOS, 20, 21],
        [EOS, IGNORE_INDEX, IGNORE_INDEX],
    ]
    assert sum(dataset.targets_in(i) for i in range(3)) == 7
    # every predicted token appears as a target exactly once
    targets = batch.targets[batch.targets != IGNORE_INDEX].tolist()
    assert targets == tokens[1:].tolist()


def test_cache_hit_on_second_load_and_miss_after_change(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "train.txt"
    path.write_text("one line\nanother line\n")
    fp = tokenizer_fingerprint(tokenizer, EOS)
    first = load_token_stream(path, tokenizer, EOS, fp, tmp_path / "cache")
    second = load_token_stream(path, tokenizer, EOS, fp, tmp_path / "cache")
    assert (first.cache_hit, second.cache_hit) == (False, True)
    assert np.array_equal(first.stream.tokens, second.stream.tokens)
    assert len(list((tmp_path / "cache").glob("*.tokens.npy"))) == 1
    path.write_text("one line\nchanged line\n")
    third = load_token_stream(path, tokenizer, EOS, fp, tmp_path / "cache")
    assert not third.cache_hit


def test_tokenizer_without_eos_uses_sep() -> None:
    """Chinese GPT-2 models ship BERT-style tokenizers: no EOS, so SEP ends each document."""
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "我", "爱", "你", "们"]
    bert = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})
    assert bert.eos_token_id is None
    sep = resolve_eos_id(bert)
    assert sep == vocab.index("[SEP]")
    stream = tokenize_documents(["我爱你", "你们"], bert, sep, np.uint16)
    assert stream.tokens.tolist() == [3, 5, 6, 7, 3, 7, 8, 3]
    assert resolve_eos_id(bert, "[CLS]") == 2
    with pytest.raises(UserError, match="--eos-token"):
        resolve_eos_id(bert, "<nope>")


def test_held_out_split_is_seeded_random_not_contiguous() -> None:
    train, held = split_documents(100, 0.1, seed=3)
    assert len(held) == 10 and len(train) == 90
    assert set(train) | set(held) == set(range(100)) and not set(train) & set(held)
    assert held.tolist() != list(range(held[0], held[0] + 10))
    assert split_documents(100, 0.1, seed=3)[1].tolist() == held.tolist()


def test_global_batch_is_dealt_the_same_for_ranks_and_accumulation() -> None:
    blocks = epoch_order(10, epoch=0, seed=1)[:4]
    two_ranks = [micro_batch_indices(blocks, 0, r, 2, 2) for r in range(2)]
    accum_two = [micro_batch_indices(blocks, m, 0, 1, 2) for m in range(2)]
    assert two_ranks == accum_two
    assert sorted(sum(two_ranks, [])) == sorted(blocks.tolist())
    assert micro_batch_indices(blocks[:1], 0, 1, 2, 2) == [-1]  # an empty slot pads


def test_a_data_folder_leaves_out_hidden_folders_and_a_run_inside_it(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """--train-file FOLDER takes its text files in any suffix case, in subfolders too, but not
    hidden files and folders (`.ipynb_checkpoints`) nor a domainlm run's folder put inside it: a
    run whose --output-dir lies in its data folder continues with the same command (its
    metrics.jsonl was read as data: "each JSON line needs a string field")."""
    from domainlm.cli import main
    from domainlm.data.corpus import text_files

    data = tmp_path / "data"
    (data / "more").mkdir(parents=True)
    (data / ".ipynb_checkpoints").mkdir()
    lines = [f"document number {i} of the folder" for i in range(40)]
    for name in ("a.txt", "more/B.TXT", ".hidden.txt", ".ipynb_checkpoints/a-checkpoint.txt"):
        (data / name).write_text("\n".join(lines) + "\n")
    expected = [data / "a.txt", data / "more" / "B.TXT"]
    assert text_files(data) == expected
    args = ["train", "--model", str(tiny_model_dir), "--train-file", str(data), "--output-dir",
            str(data / "run"), "--block-size", "32", "--batch-size", "2", "--quiet"]  # fmt: skip
    assert main([*args, "--max-steps", "1"]) == 0
    assert text_files(data) == expected  # run/metrics.jsonl and the rest: not data
    assert main([*args, "--max-steps", "2"]) == 0  # continued from checkpoint-1
    assert (data / "run" / "checkpoint-2").is_dir()
