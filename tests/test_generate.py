"""Generation, its command line and the memorization check (issue 8)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ModuleTemp, uneven_corpus, write_lines

from domainlm.cli import main
from domainlm.data.tokens import load_token_stream
from domainlm.errors import UserError
from domainlm.model.loading import load_model, tokenizer_fingerprint
from domainlm.text.generate import (
    GenerateConfig,
    MemorizationChecker,
    TextPrinter,
    context_note,
    generate_samples,
    generate_texts,
)
from domainlm.text.memorize import NGRAM, NgramIndex, source_line
from domainlm.text.sampling import SamplingSettings, sample_batch


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    loaded = load_model(str(tiny_model_dir))
    loaded.model.eval()
    return loaded


def manual_greedy(model, prompt: list[int], eos: int, steps: int) -> list[int]:
    """Slow and obvious: the whole sequence through the model at every step, no cache, argmax."""
    ids = [eos, *prompt]
    out = []
    for _ in range(steps):
        with torch.no_grad():
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        if token == eos:
            break
        out.append(token)
        ids.append(token)
    return out


def test_temperature_zero_equals_the_argmax_path(tiny) -> None:
    prompts = [[464, 3797, 3332, 319], [40], [1212, 318, 257, 1332, 286, 262, 7427]]  # uneven
    got = sample_batch(
        tiny.model,
        prompts,
        eos_id=tiny.eos_id,
        max_new_tokens=8,
        settings=SamplingSettings(temperature=0),
    )
    for prompt, result in zip(prompts, got, strict=True):
        assert result.tokens == manual_greedy(tiny.model, prompt, tiny.eos_id, 8)
        assert len(result.tokens) == 8 and not result.stopped_at_eos


def test_a_seed_makes_sampling_reproducible(tiny) -> None:
    def run(seed: int) -> list[str]:
        samples = generate_samples(
            tiny.model,
            tiny.tokenizer,
            tiny.eos_id,
            ["the cat", "a dog sat"],
            max_new_tokens=8,
            settings=SamplingSettings(temperature=1.0, top_k=0, top_p=0.95),
            seed=seed,
            num_samples=2,
        )
        assert [(s.prompt, s.sample) for s in samples] == [
            ("the cat", 0),
            ("the cat", 1),
            ("a dog sat", 0),
            ("a dog sat", 1),
        ]
        return [s.text for s in samples]

    torch.manual_seed(0)
    first = run(7)
    torch.manual_seed(123)  # the global RNG plays no part
    assert run(7) == first
    assert run(8) != first
    assert len(set(first)) == 4  # samples of one prompt differ from each other


def test_a_sample_is_its_seed_and_prompt_whatever_runs_beside_it(tiny) -> None:
    """The same seed and prompt give the same text at any batch size and with other prompts
    before it (each sample draws from its own generator); a prompt the context would cut runs
    alone, so a longer prompt in its batch does not shorten it."""

    def texts(prompts: list[str], batch_size: int, max_new_tokens: int = 8) -> dict[str, list[str]]:
        samples = generate_samples(
            tiny.model, tiny.tokenizer, tiny.eos_id, prompts,
            max_new_tokens=max_new_tokens, settings=SamplingSettings(temperature=1.0),
            seed=3, num_samples=2, batch_size=batch_size,
        )  # fmt: skip
        by_prompt: dict[str, list[str]] = {}
        for s in samples:
            by_prompt.setdefault(s.prompt, []).append(s.text)
        return by_prompt

    alone = texts(["the model"], batch_size=1)["the model"]
    assert texts(["the model", "we measure"], batch_size=16)["the model"] == alone
    assert texts(["hi", "the model"], batch_size=2)["the model"] == alone
    assert len(set(alone)) == 2  # its two samples differ

    context = tiny.context_length
    long_prompt = " ".join(["word"] * (context - 20))
    samples = generate_samples(
        tiny.model, tiny.tokenizer, tiny.eos_id, ["the model", long_prompt],
        max_new_tokens=context, settings=SamplingSettings(temperature=0), seed=1,
        context_length=context,
    )  # fmt: skip
    for sample in samples:  # EOS aside, each fills the context from its own prompt
        assert sample.stopped_at_eos or sample.prompt_tokens + len(sample.tokens) == context
    assert len(samples[0].tokens) > len(samples[1].tokens)


def test_generation_stops_at_eos(tiny) -> None:
    prompt = [464, 3797]
    greedy = manual_greedy(tiny.model, prompt, tiny.eos_id, 10)
    # Declare the first greedy token that was not generated before (at k >= 1) the end of text:
    # the sequence must stop right before it.
    k = next(i for i in range(1, len(greedy)) if greedy[i] not in greedy[:i])
    stop = greedy[k]
    got = sample_batch(
        tiny.model,
        [prompt, [40, 1101]],
        eos_id=stop,
        pad_id=tiny.eos_id,
        max_new_tokens=10,
        settings=SamplingSettings(temperature=0),
    )
    assert got[0].tokens == greedy[:k] and got[0].stopped_at_eos
    assert len(got[1].tokens) <= 10

    # A model biased towards the real EOS ends at once, with an empty continuation.
    bias = torch.zeros(tiny.vocab_size)
    bias[tiny.eos_id] = 1e4
    hook = tiny.model.lm_head.register_forward_hook(lambda m, i, out: out + bias)
    try:
        samples = generate_samples(
            tiny.model,
            tiny.tokenizer,
            tiny.eos_id,
            ["hello"],
            max_new_tokens=20,
            settings=SamplingSettings(temperature=1.0),
            seed=0,
        )
    finally:
        hook.remove()
    assert samples[0].text == "" and samples[0].tokens == [] and samples[0].stopped_at_eos


def test_demo_api_and_bad_options(tiny_model_dir: Path) -> None:
    config = GenerateConfig(
        model=str(tiny_model_dir),
        prompts=["the cat", "x"],
        max_new_tokens=6,
        temperature=0.8,
        top_k=50,
        seed=0,
    )
    texts = generate_texts(config)
    assert len(texts) == 2 and texts == generate_texts(config)
    for bad in (dict(temperature=-1), dict(top_p=0), dict(max_new_tokens=0)):
        with pytest.raises(UserError):
            GenerateConfig(model=str(tiny_model_dir), prompts=["a"], **bad)
    with pytest.raises(UserError, match="give a prompt"):
        generate_texts(GenerateConfig(model=str(tiny_model_dir)))


def test_cli_streams_one_prompt_and_prints_json_for_many(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["generate", "--model", str(tiny_model_dir), "--max-new-tokens", "5", "--seed", "1"]
    assert main([*base, "--prompt", "The cat", "--temperature", "0"]) == 0
    streamed = capsys.readouterr().out
    expected = generate_texts(
        GenerateConfig(
            model=str(tiny_model_dir), prompts=["The cat"], max_new_tokens=5, temperature=0, seed=1
        )
    )[0]
    assert streamed == f"The cat{expected}\n"

    prompts = write_lines(tmp_path / "prompts.txt", ["one", "two", "three"])
    assert main([*base, "--prompts-file", str(prompts), "--num-samples", "2", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in records] == ["one", "one", "two", "two", "three", "three"]
    assert all(r["new_tokens"] <= 5 for r in records)

    assert main([*base, "--prompts-file", str(tmp_path / "missing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main([*base, "--prompts-file", str(tmp_path)]) == 2  # a folder: said as one
    assert f"--prompts-file {tmp_path}: a folder, not a file of prompts" in capsys.readouterr().err
    blank = write_lines(tmp_path / "blank.txt", ["", "  "])
    assert main([*base, "--prompt", "a", "--prompts-file", str(blank)]) == 2
    assert f"--prompts-file {blank} holds no prompt" in capsys.readouterr().err


def test_every_prompt_given_is_continued_in_order_and_numbered_by_its_place(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--prompt and --prompts together, and --prompts repeated, keep every prompt in the order
    given (a later --prompts replaced the earlier ones); a prompt given twice is numbered twice."""
    base = ["generate", "--model", str(tiny_model_dir), "--max-new-tokens", "2", "--seed", "1"]
    given = ["--prompt", "first", "--prompts", "second", "third", "--prompts", "fourth"]
    assert main([*base, *given, "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in records] == ["first", "second", "third", "fourth"]
    assert main([*base, "--prompt", "the cat", "--prompt", "the cat"]) == 0
    headers = [x for x in capsys.readouterr().out.splitlines() if x.startswith("--- prompt")]
    assert headers == ["--- prompt 1, sample 1", "--- prompt 2, sample 1"]


def test_a_prompt_that_spells_a_special_token_is_its_characters(tiny) -> None:
    """Text is text in prompts as in training: `<|endoftext|>` typed is GPT-2's seven tokens
    for those characters (<, |, end, of, text, |, >), after the start token, not one EOS."""
    (sample,) = generate_samples(
        tiny.model, tiny.tokenizer, tiny.eos_id, ["<|endoftext|>"], max_new_tokens=1,
        settings=SamplingSettings(temperature=0.0), seed=0,
    )  # fmt: skip
    assert sample.prompt_tokens == 1 + 7
    assert tiny.tokenizer.convert_tokens_to_ids(["<", "|", "end", "of", "text", "|", ">"]) == [
        27, 91, 437, 1659, 5239, 91, 29,
    ]  # fmt: skip


# ----------------------------------------------------------------------------- the context's end

SHORT_CONTEXT = 32  # positions of `short_context_model_dir`; "the cat" + the EOS before it: 3


@pytest.fixture(scope="module")
def short_context_model_dir(module_tmp: ModuleTemp) -> Path:
    """scratch:tiny with a context of 32 positions: generation runs into it within a second."""
    from domainlm.model.loading import save_scratch_folder

    folder = module_tmp.mktemp("short-context-model")
    return save_scratch_folder(
        "tiny", folder, seed=0, n_positions=SHORT_CONTEXT, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0,
    )  # fmt: skip


def context_notes(err: str) -> list[str]:
    return [line for line in err.splitlines() if "context" in line]


def test_a_full_context_is_reported_in_json_and_on_stderr(
    short_context_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue: 400 tokens asked, 29 given (the context is full), and not a word said about it."""
    base = ["generate", "--model", str(short_context_model_dir), "--temperature", "0", "--json"]
    assert main([*base, "--prompt", "the cat", "--max-new-tokens", "400"]) == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    assert record["new_tokens"] == SHORT_CONTEXT - 3
    assert (record["stopped_at_eos"], record["stopped_at_context"]) == (False, True)
    assert context_notes(captured.err) == [
        "domainlm: note: stopped at the model's context of 32 positions "
        "(prompt 3 + 29 new tokens), before --max-new-tokens 400"
    ]

    # One note per run, not per sample.
    assert main([*base, "--prompt", "the cat", "--prompt", "a", "--max-new-tokens", "50"]) == 0
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["new_tokens"] for r in records] == [29, 30]  # each its own prompt's room
    assert all(r["stopped_at_context"] for r in records)
    assert context_notes(captured.err) == [
        "domainlm: note: 2 of 2 samples stopped at the model's context of 32 positions "
        "(e.g. prompt 3 + 29 new tokens), before --max-new-tokens 50"
    ]

    # Exactly the room left, or less: --max-new-tokens ends it, nothing to report.
    for room in ("29", "5"):
        assert main([*base, "--prompt", "the cat", "--max-new-tokens", room]) == 0
        captured = capsys.readouterr()
        record = json.loads(captured.out)
        assert record["new_tokens"] == int(room) and not record["stopped_at_context"]
        assert context_notes(captured.err) == []


def test_a_prompt_longer_than_the_context_is_refused_before_anything_is_written(
    short_context_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """31 tokens fit the context of 32 after the start token, 32 do not: one line naming the
    prompt and the limit, exit 2, nothing on stdout (the streamed prompt was echoed before the
    error); in train, --sample-prompts likewise before the run writes anything."""
    fits, too_long = " the" * (SHORT_CONTEXT - 1), " the" * SHORT_CONTEXT
    base = ["generate", "--model", str(short_context_model_dir), "--max-new-tokens", "3"]
    assert main([*base, "--prompt", fits]) == 0
    capsys.readouterr()
    assert main([*base, "--prompt", "a cat", "--prompt", too_long]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip() == (
        f"domainlm: error: prompt 2 is {SHORT_CONTEXT} tokens: the model's context of "
        f"{SHORT_CONTEXT} holds at most {SHORT_CONTEXT - 1} after the 1 start token(s); shorten it"
    )
    assert main([*base, "--prompt", too_long]) == 2
    assert capsys.readouterr().out == ""
    train_file = write_lines(tmp_path / "train.txt", uneven_corpus(20))
    out = tmp_path / "run"
    assert main(["train", "--model", str(short_context_model_dir), "--train-file",
                 str(train_file), "--output-dir", str(out), "--max-steps", "1",
                 "--sample-prompts", too_long]) == 2  # fmt: skip
    assert "--sample-prompts: prompt 1 is" in capsys.readouterr().err and not out.exists()


def test_the_note_follows_streamed_text(
    short_context_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["generate", "--model", str(short_context_model_dir), "--prompt", "the cat"]
    assert main([*args, "--temperature", "0", "--max-new-tokens", "100"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("the cat") and "note" not in captured.out
    assert captured.err.strip() == (
        "domainlm: note: stopped at the model's context of 32 positions "
        "(prompt 3 + 29 new tokens), before --max-new-tokens 100"
    )


def test_eos_is_not_the_context(tiny) -> None:
    """A sample that ends at EOS, with room in the context, is not `stopped_at_context`."""
    bias = torch.zeros(tiny.vocab_size)
    bias[tiny.eos_id] = 1e4
    hook = tiny.model.lm_head.register_forward_hook(lambda m, i, out: out + bias)
    try:
        (sample,) = generate_samples(
            tiny.model, tiny.tokenizer, tiny.eos_id, ["hello"], max_new_tokens=400,
            settings=SamplingSettings(temperature=0), seed=0, context_length=SHORT_CONTEXT,
        )  # fmt: skip
    finally:
        hook.remove()
    assert sample.stopped_at_eos and not sample.stopped_at_context
    assert context_note([sample], SHORT_CONTEXT, 400) is None


# ----------------------------------------------------------------------------- memorization


def planted_corpus(tmp_path: Path) -> tuple[Path, str, int]:
    """A training file with one distinctive line (on file line 31, after a blank line)."""
    lines = uneven_corpus(40, seed=3)
    planted = (
        "Quantum lighthouse keepers of Ouagadougou tabulate seventeen violet harmonicas "
        "beneath the cathedral of forgotten umbrellas while zebras recite Fibonacci numbers"
    )
    lines = lines[:29] + ["", planted] + lines[29:]
    return write_lines(tmp_path / "train.txt", lines), planted, 31


def test_memorization_finds_a_planted_span(tiny, tmp_path: Path, isolated_cache: Path) -> None:
    train_file, planted, line_number = planted_corpus(tmp_path)
    tok = tiny.tokenizer
    cached = load_token_stream(
        train_file, tok, tiny.eos_id, tokenizer_fingerprint(tok, tiny.eos_id), isolated_cache
    )
    index, hit, _ = NgramIndex.load_or_build(cached.stream, isolated_cache, cached.key)
    assert not hit
    planted_ids = tok(planted, add_special_tokens=False)["input_ids"]
    copied = planted_ids[3 : 3 + 20]
    # Fresh text: token ids that occur nowhere in the corpus (it has ~20 distinct words).
    fresh = np.random.default_rng(0).integers(30000, 40000, size=60).tolist()
    sample = fresh[:15] + copied + fresh[15:30]

    span = index.longest_copy(sample)
    assert span is not None
    assert (span.length, span.sample_start) == (20, 15)
    assert list(cached.stream.tokens[span.train_start : span.train_start + 20]) == copied
    assert source_line(train_file, span.document) == line_number
    assert index.longest_copy(fresh) is None
    assert index.longest_copy(copied[: NGRAM - 1]) is None  # shorter than an n-gram: not reported

    checker = MemorizationChecker(index, tok, str(train_file), "line", threshold=20)
    result = checker.check(sample)
    assert result["copied_tokens"] == 20 and result["over_threshold"]
    assert result["train_line"] == line_number and result["train_text"] == planted
    assert not MemorizationChecker(index, tok, str(train_file), "line", 21).check(sample)[
        "over_threshold"
    ]
    assert checker.check(fresh) == {"copied_tokens": 0, "over_threshold": False}

    again, hit, _ = NgramIndex.load_or_build(cached.stream, isolated_cache, cached.key)
    assert hit and np.array_equal(np.asarray(again.packed), index.packed)


def test_memorization_index_matches_a_brute_force_search() -> None:
    """Longest common substring by brute force on a small random stream with repeats."""
    from domainlm.data.tokens import TokenStream

    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 6, size=3000).astype(np.uint16)  # small alphabet: many repeats
    stream = TokenStream(tokens, np.array([1, 1500, 3000]))
    index = NgramIndex.build(stream)
    for trial in range(5):
        start = int(rng.integers(1, 2900))
        sample = np.concatenate(
            [rng.integers(0, 6, 10), tokens[start : start + 30], rng.integers(0, 6, 10)]
        )
        best = 0
        for j in range(len(sample)):
            for p in range(len(tokens)):
                k = 0
                while (
                    j + k < len(sample) and p + k < len(tokens) and sample[j + k] == tokens[p + k]
                ):
                    k += 1
                best = max(best, k)
        span = index.longest_copy(sample.tolist())
        assert span is not None and span.length == best, trial
        got = tokens[span.train_start : span.train_start + span.length]
        assert list(got) == list(sample[span.sample_start : span.sample_start + span.length])


def test_cli_memorization_check(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train_file, _, _ = planted_corpus(tmp_path)
    args = [
        "generate",
        "--model",
        str(tiny_model_dir),
        "--prompt",
        "the cat",
        "--max-new-tokens",
        "8",
        "--seed",
        "0",
        "--check-memorization",
        "--train-file",
        str(train_file),
        "--json",
    ]
    assert main(args) == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    assert record["memorization"]["copied_tokens"] in range(0, 9)
    assert "memorization index built" in captured.err
    assert main(args) == 0
    assert "memorization index loaded" in capsys.readouterr().err
    no_train = ["generate", "--model", str(tiny_model_dir), "--prompt", "a", "--check-memorization"]
    assert main(no_train) == 2
    assert "--train-file" in capsys.readouterr().err
    # A run's folder, or a checkpoint in it, names its own training file (run_config.json).
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--train-file", str(train_file),
                 "--output-dir", str(run), "--max-steps", "2", "--save-steps", "2",
                 "--block-size", "32", "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    for model in (run, run / "checkpoint-2"):
        argv = ["generate", "--model", str(model), "--prompt", "the cat", "--max-new-tokens", "8",
                "--check-memorization", "--json"]  # fmt: skip
        assert main(argv) == 0
        assert json.loads(capsys.readouterr().out)["memorization"] is not None


def test_a_runs_training_data_is_found_from_any_folder_and_checked(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    """--check-memorization of a run trained on `--train-file train.txt` (relative) reads that
    file from any working folder, never another train.txt there, and refuses the file changed
    or gone (a check against other text would say "nothing copied")."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    write_lines(project / "train.txt", uneven_corpus(30, seed=0))
    monkeypatch.chdir(project)
    assert main(["train", "--model", str(tiny_model_dir), "--train-file", "train.txt",
                 "--output-dir", "run", "--max-steps", "1", "--block-size", "32", "--quiet"]) == 0  # fmt: skip
    monkeypatch.chdir(elsewhere)
    write_lines(elsewhere / "train.txt", [f"another text altogether, line {i}" for i in range(30)])
    argv = ["generate", "--model", str(project / "run"), "--prompt", "the cat",
            "--max-new-tokens", "4", "--check-memorization", "--json"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    assert f"tokens of {project / 'train.txt'}, less the run's 2 held-out documents)" in (
        capsys.readouterr().err
    )
    # A run file from before the path was recorded: its --train-file as typed, from the working
    # folder, checked against the tokens the run trained on (less its held-out 5%).
    run_file = project / "run" / "run_config.json"
    recorded = json.loads(run_file.read_text())
    run_file.write_text(json.dumps({k: v for k, v in recorded.items() if k != "train_data_file"}))
    assert main(argv) == 2
    assert "train.txt is not the text" in capsys.readouterr().err  # elsewhere's train.txt
    monkeypatch.chdir(project)
    assert main(argv) == 0  # the run's own, as typed, from the folder it was started in
    run_file.write_text(json.dumps(recorded))
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    with open(project / "train.txt", "a") as handle:
        handle.write("a line added after the run\n")
    assert main(argv) == 2
    assert "is not the text" in capsys.readouterr().err
    (project / "train.txt").write_text("one document, which the run could not have split\n")
    assert main(argv) == 2
    assert "is not the text" in capsys.readouterr().err
    (project / "train.txt").unlink()
    (elsewhere / "train.txt").unlink()
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "the training data of" in line and "is not found" in line and "--train-file" in line


def test_a_runs_held_out_documents_are_not_memorization_sources(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run without --validation-file held 10% of its documents out: the model never trained on
    them, so a sample repeating one is no copy of its training data. Each trained document is
    found at its own line of the file; no held-out one is found at all."""
    from domainlm.data.blocks import split_documents
    from domainlm.text.generate import GenerateConfig

    words = "amber basil cedar delta ember fjord grove harbor island jasper kettle lumen".split()
    rng = np.random.default_rng(3)
    docs = [f"entry {i}: " + " ".join(rng.choice(words, 14)) for i in range(20)]
    train_file = write_lines(tmp_path / "train.txt", docs)
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--train-file", str(train_file),
                 "--output-dir", str(run), "--max-steps", "1", "--block-size", "32",
                 "--validation-split", "0.1", "--seed", "7", "--quiet"]) == 0  # fmt: skip
    trained, held = split_documents(len(docs), 0.1, 7)  # the split as blocks.py documents it
    loaded = load_model(str(run))
    config = GenerateConfig(model=str(run), check_memorization=True, cache_dir=str(tmp_path / "c"))
    checker = MemorizationChecker.open(config, loaded)
    said = capsys.readouterr().err
    for number, doc in enumerate(docs):
        tokens = loaded.tokenizer(doc, add_special_tokens=False)["input_ids"]
        found = checker.check(tokens)
        if number in held:
            assert found["copied_tokens"] == 0, (number, found)
        else:
            assert found["copied_tokens"] == len(tokens) and found["train_line"] == number + 1
    assert len(held) == 2 and len(trained) == 18 and "less the run's 2 held-out documents" in said
    # --train-file the run's own data (the README's spelling): the same; another copy of the
    # text with a line more is not the run's data, and is searched whole.
    named = GenerateConfig(model=str(run), check_memorization=True, train_file=str(train_file),
                           cache_dir=str(tmp_path / "c"))  # fmt: skip
    checker = MemorizationChecker.open(named, loaded)
    tokens = loaded.tokenizer(docs[int(held[0])], add_special_tokens=False)["input_ids"]
    assert checker.check(tokens)["copied_tokens"] == 0
    more = write_lines(tmp_path / "more.txt", [*docs, "one more line"])
    other = GenerateConfig(model=str(run), check_memorization=True, train_file=str(more),
                           cache_dir=str(tmp_path / "c"))  # fmt: skip
    assert MemorizationChecker.open(other, loaded).check(tokens)["copied_tokens"] == len(tokens)


def test_train_file_naming_the_runs_data_is_read_as_the_run_read_it(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--check-memorization --train-file the run's own file, of a run with --doc-sep blank: the
    file is read with the run's --doc-sep (generate's default is line: another stream, not the
    run's data, so its held-out documents were searched too)."""
    from domainlm.text.generate import GenerateConfig

    words = "amber basil cedar delta ember fjord grove harbor island jasper kettle lumen".split()
    rng = np.random.default_rng(4)
    paragraphs = [" ".join(rng.choice(words, 8)) + "\n" + " ".join(rng.choice(words, 8))
                  for _ in range(20)]  # fmt: skip
    train_file = tmp_path / "paragraphs.txt"
    train_file.write_text("\n\n".join(paragraphs) + "\n")
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--train-file", str(train_file),
                 "--doc-sep", "blank", "--output-dir", str(run), "--max-steps", "1",
                 "--block-size", "32", "--quiet"]) == 0  # fmt: skip
    loaded = load_model(str(run))
    capsys.readouterr()
    config = GenerateConfig(model=str(run), check_memorization=True, train_file=str(train_file),
                            cache_dir=str(tmp_path / "c"))  # fmt: skip
    MemorizationChecker.open(config, loaded)
    assert "less the run's 1 held-out documents" in capsys.readouterr().err


def test_sampling_with_dropout_leaves_the_rng_and_train_mode_alone(tmp_path: Path) -> None:
    """What samples during training rely on, with dropout on (GPT-2's 0.1): the samples are those
    of eval mode, the model is back in train mode, and the global RNG (dropout masks) is where it
    was. The training run itself is checked in test_report (same losses with and without samples);
    this catches a sampler that draws from the global RNG even when training reseeds every step."""
    from domainlm.model.loading import save_scratch_folder

    loaded = load_model(str(save_scratch_folder("tiny", tmp_path / "model", seed=0)))
    model = loaded.model
    assert model.config.resid_pdrop == 0.1

    def run() -> list[list[int]]:
        samples = generate_samples(
            model, loaded.tokenizer, loaded.eos_id, ["the cat", "a dog sat"], max_new_tokens=6,
            settings=SamplingSettings(temperature=1.0, top_k=50), seed=5,
        )  # fmt: skip
        return [s.tokens for s in samples]

    model.eval()
    in_eval = run()
    model.train()
    torch.manual_seed(11)
    before = torch.get_rng_state()
    assert run() == in_eval  # dropout off while sampling
    assert model.training  # back in train mode
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG untouched


def sentencepiece_llama_tokenizer(folder: Path):  # type: ignore[no-untyped-def]
    """A real SentencePiece BPE model trained here, wrapped as transformers' LlamaTokenizer.

    transformers 5 builds LlamaTokenizer from `vocab` and `merges` (its converter reads the
    .model file through protobuf); for a SentencePiece BPE model the merges are the pairs of
    pieces whose concatenation is a piece, in the order of that piece's id (its merge rank).
    The wrapper is checked to encode exactly as SentencePiece itself does.
    """
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    lines = uneven_corpus(300, seed=1)
    corpus = write_lines(folder / "sp-corpus.txt", lines)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "sp"), vocab_size=100, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    sp = spm.SentencePieceProcessor(model_file=str(folder / "sp.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    pieces = [p for p in vocab if not sp.is_control(vocab[p]) and not sp.is_unknown(vocab[p])]
    merges = sorted(
        ((a, b) for a in pieces for b in pieces if a + b in vocab), key=lambda m: vocab["".join(m)]
    )
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges)
    for line in lines[:50]:
        assert tokenizer(line, add_special_tokens=False)["input_ids"] == sp.encode(line)
    return tokenizer


def test_continuation_keeps_its_leading_space_with_sentencepiece(tmp_path: Path) -> None:
    """Issue 12 item 10: decoded alone, "▁sat" loses its space ("the catsat")."""
    from domainlm.model.loading import build_scratch_model

    tokenizer = sentencepiece_llama_tokenizer(tmp_path)
    sat = tokenizer.convert_tokens_to_ids("▁sat")
    assert tokenizer.decode([sat]) == "sat"  # the SentencePiece decoder strips a leading space
    model = build_scratch_model(
        "tiny", vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2
    ).eval()
    bias = torch.zeros(len(tokenizer))
    bias[sat] = 1e4  # the model says " sat" every time
    hook = model.lm_head.register_forward_hook(lambda m, i, out: out + bias)
    streamed = io.StringIO()
    printer = TextPrinter(streamed, "the cat")
    try:
        samples = generate_samples(
            model, tokenizer, tokenizer.eos_token_id, ["the cat", "a dog"], max_new_tokens=2,
            settings=SamplingSettings(temperature=0), seed=0,
        )  # fmt: skip
        (one,) = generate_samples(
            model, tokenizer, tokenizer.eos_token_id, ["the cat"], max_new_tokens=2,
            settings=SamplingSettings(temperature=0), seed=0, on_text=printer,
        )  # fmt: skip
    finally:
        hook.remove()
    assert [s.tokens for s in samples] == [[sat, sat], [sat, sat]]
    assert [s.prompt + s.text for s in samples] == ["the cat sat sat", "a dog sat sat"]
    printer.finish(one.text)
    assert streamed.getvalue() == "the cat sat sat\n"  # what the terminal shows, as it grows


def chinese_wordpiece_tokenizer(folder: Path, text: str):  # type: ignore[no-untyped-def]
    """A BERT-style tokenizer as the `uer/gpt2-chinese-*` models have: one WordPiece token per
    Chinese character, `[CLS] text [SEP]`, and a decoder that joins tokens with spaces."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(text) | {"ai"}))}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[(t, vocab[t]) for t in ("[CLS]", "[SEP]")]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        pad_token="[PAD]", mask_token="[MASK]",
    )  # fmt: skip


def test_chinese_from_a_bert_style_tokenizer_reads_without_spaces(tmp_path: Path) -> None:
    """A BERT-style tokenizer decodes "今天天气" as "今 天 天 气"; the text domainlm shows (the
    terminal, --json, samples.jsonl) is the characters as written. The model here is steered to
    say the sentence's next character after each one; the reference is the sentence itself."""
    from domainlm.model.loading import build_scratch_model
    from domainlm.text.generate import decode_text, spaces_cjk

    sentence = "今天气候很好，我们一起去公园散步吧。"  # no character twice
    tokenizer = chinese_wordpiece_tokenizer(tmp_path, sentence)
    assert tokenizer.decode(tokenizer("今天", add_special_tokens=False)["input_ids"]) == "今 天"
    ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
    following = {a: b for a, b in zip(ids[1:-1], ids[2:], strict=True)}  # after "今天": "气候..."
    model = build_scratch_model("tiny", vocab_size=len(tokenizer)).eval()

    def steer(module, args, kwargs, output):  # type: ignore[no-untyped-def]
        last = int(kwargs["input_ids"][0, -1])
        output.logits[0, -1, following.get(last, tokenizer.sep_token_id)] += 1e4
        return output

    hook = model.register_forward_hook(steer, with_kwargs=True)
    streamed = io.StringIO()
    printer = TextPrinter(streamed, "今天")
    try:
        (one,) = generate_samples(
            model, tokenizer, tokenizer.sep_token_id, ["今天"], max_new_tokens=len(ids) - 2,
            settings=SamplingSettings(temperature=0), seed=0, on_text=printer,
        )  # fmt: skip
    finally:
        hook.remove()
    assert one.prompt + one.text == sentence
    printer.finish(one.text)
    assert streamed.getvalue() == sentence + "\n"  # what the terminal shows, as it grows
    # Only spaces between two CJK characters go; a Latin word keeps its spaces.
    mixed = tokenizer("今天ai很好", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(mixed) == "今 天 ai 很 好"
    assert decode_text(tokenizer, mixed) == "今天 ai 很好"
    # Tokenizers that keep CJK text together are left alone.
    gpt2 = load_model("scratch:tiny").tokenizer
    assert not spaces_cjk(gpt2) and spaces_cjk(tokenizer)
    assert decode_text(gpt2, gpt2("今天 天气")["input_ids"]) == "今天 天气"


@pytest.mark.parametrize(("asked", "used"), [("auto", "fp32"), ("bf16", "bf16"), ("fp32", "fp32")])
def test_an_asked_precision_is_used_on_the_cpu(
    tiny_model_dir: Path, monkeypatch, asked: str, used: str
) -> None:
    """On the CPU --precision auto generates in fp32 (bf16 autocast is slower for one-token
    steps); a precision asked for is used as asked (bf16 was silently fp32)."""
    import domainlm.text.generate as generation

    seen: list[str] = []
    real = generation.generate_samples

    def recording(*args, **kwargs):
        seen.append(kwargs["precision"])
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "generate_samples", recording)
    config = GenerateConfig(model=str(tiny_model_dir), prompts=["the cat"], max_new_tokens=2,
                            temperature=0, precision=asked, device="cpu")  # fmt: skip
    assert len(generate_texts(config)) == 1
    assert seen == [used]


def test_a_memorization_threshold_below_the_shortest_span_found_is_refused(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The index finds copied spans of NGRAM tokens or more: a lower threshold was accepted and
    a shorter copy then reported as copied_tokens 0. Refused in one line naming the minimum."""
    args = ["generate", "--model", str(tiny_model_dir), "--prompt", "a", "--max-new-tokens", "1"]
    assert main([*args, "--memorization-threshold", str(NGRAM - 1)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"domainlm: error: --memorization-threshold must be at least {NGRAM}, got {NGRAM - 1}: "
        f"the memorization index finds copied spans of {NGRAM} tokens or more"
    ]
    assert GenerateConfig(model=str(tiny_model_dir), prompts=["a"], memorization_threshold=NGRAM)
    with pytest.raises(SystemExit):
        main([*args, "--help"])
    assert f"at least {NGRAM}" in " ".join(capsys.readouterr().out.split())
