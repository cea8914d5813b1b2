"""`domainlm generate`: read what a model writes; samples while training; the memorization check.

Prompts become token ids (each continues from EOS, or from BOS for tokenizers that put one before
a text, as every training document does: `LoadedModel.start_ids`), the token
loop of `sampling.py` continues them in batches, and the text is decoded here. With one prompt the
text streams to the terminal as it is produced. `--check-memorization` looks every continuation up
in an index of the training tokens (`memorize.py`) and warns when it recites training data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from domainlm.config import (
    DEVICES,
    DOC_SEPARATORS,
    ENCODING_ERRORS,
    PRECISIONS,
    TRAIN_DATA_FILE,
    check_device,
    check_seed,
    opt,
    read_run_settings,
)
from domainlm.errors import UserError
from domainlm.text.memorize import NGRAM

SAMPLES_FILE = "samples.jsonl"
# Settings of the samples written while training: varied enough to read, the same seed at every
# step so that successive samples differ because the model changed, not the dice.
TRAINING_TEMPERATURE, TRAINING_TOP_K = 0.8, 50
SHOWN_TRAINING_CHARS = 200


@dataclass
class GenerateConfig:
    """Everything `domainlm generate` needs. `generate_texts(GenerateConfig(...))` runs it."""

    model: str = opt(
        None, "Model folder (e.g. a training run's output), hub id, or scratch:NAME.", required=True
    )
    prompts: list[str] | None = opt(None, "Prompts to continue (or --prompt TEXT, repeatable).")
    prompts_file: str | None = opt(None, "File of prompts, one per line.")
    max_new_tokens: int = opt(100, "Most tokens generated per sample (fewer when EOS comes).")
    temperature: float = opt(1.0, "Sampling temperature; 0 is greedy (always the likeliest token).")
    top_k: int = opt(50, "Sample among the K likeliest tokens only (0: all).")
    top_p: float = opt(
        1.0, "Nucleus sampling: the smallest set of tokens holding this probability."
    )
    repetition_penalty: float = opt(
        1.0,
        "Divide the positive logits of tokens seen in the prompt or the sample so far by this, "
        "and multiply their negative ones by it, as transformers does (1: off). Unlike "
        "transformers' generate, the start token in front of the prompt (BOS, or EOS) does not "
        "count as seen.",
    )
    num_samples: int = opt(1, "Samples per prompt.")
    seed: int | None = opt(
        None,
        "Seed: the same seed, model and prompt give the same text, whatever the other prompts "
        "and --batch-size (in fp32; in bf16 another batch shape may round a logit differently).",
    )
    batch_size: int = opt(16, "Sequences generated together.")
    json: bool = opt(False, "Print one JSON object per sample instead of text.")
    precision: str = opt(
        "auto", "Compute precision (auto: bf16 on GPU, fp32 on CPU).", choices=PRECISIONS
    )
    device: str | None = opt(
        None,
        "Where to compute: auto (this rank's GPU when PyTorch sees one, else the CPU), cpu, or "
        "cuda (an error without a GPU). Default: $DOMAINLM_DEVICE or auto.",
        choices=DEVICES,
    )
    check_memorization: bool = opt(
        False, "Report the longest span of each sample copied verbatim from the training data."
    )
    train_file: str | None = opt(
        None, "Training data for --check-memorization. Default: the run's, for a run's folder."
    )
    memorization_threshold: int = opt(
        50,
        "Warn when a sample copies at least this many tokens verbatim (at least "
        f"{NGRAM}: the shortest span the memorization index finds).",
    )
    cache_dir: str | None = opt(
        None, "Token cache folder. Default: $DOMAINLM_CACHE or ~/.cache/domainlm."
    )
    doc_sep: str = opt("line", "How the training file separates documents.", choices=DOC_SEPARATORS)
    encoding_errors: str = opt(
        "strict", "Invalid UTF-8 in the training file.", choices=ENCODING_ERRORS
    )
    text_column: str = opt("text", "The training file's text column (.parquet, .csv, .jsonl).")
    eos_token: str | None = opt(None, "End-of-text token, when the tokenizer has none.")
    trust_remote_code: bool = opt(False, "Allow model code from the hub (only if you trust it).")

    def __post_init__(self) -> None:
        if not self.model:
            raise UserError("--model is required")
        for name in ("max_new_tokens", "num_samples", "batch_size", "memorization_threshold"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be a positive number")
        if self.memorization_threshold < NGRAM:
            raise UserError(
                f"--memorization-threshold must be at least {NGRAM}, got "
                f"{self.memorization_threshold}: the memorization index finds copied spans of "
                f"{NGRAM} tokens or more"
            )
        self.settings()  # checks temperature, top-k, top-p and the penalty
        check_seed(self.seed)
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}")
        check_device(self.device)

    def settings(self) -> Any:
        from domainlm.text.sampling import SamplingSettings

        return SamplingSettings(
            temperature=self.temperature,
            top_k=self.top_k or None,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
        )


@dataclass
class Sample:
    """One continuation of one prompt, and (when checked) what it copies from the training data.

    `stopped_at_context`: the model's context (n_positions) ended it before `max_new_tokens`.
    `prompt_tokens`: the positions before the continuation, the start tokens (EOS or BOS)
    included; with the new tokens they are what the context holds.
    """

    prompt: str
    sample: int
    text: str
    tokens: list[int]
    stopped_at_eos: bool
    memorization: dict[str, Any] | None = None
    stopped_at_context: bool = False
    prompt_tokens: int = 0
    prompt_number: int = 1  # its place among the prompts, from 1 (a prompt given twice: two)

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "sample": self.sample,
            "text": self.text,
            "new_tokens": len(self.tokens),
            "stopped_at_eos": self.stopped_at_eos,
            "stopped_at_context": self.stopped_at_context,
            "memorization": self.memorization,
        }


# ----------------------------------------------------------------------------- library


def read_prompts(config: GenerateConfig) -> list[str]:
    """The prompts of --prompt/--prompts and --prompts-file, in that order."""
    prompts = list(config.prompts or [])
    if config.prompts_file:
        path = Path(config.prompts_file)
        if not path.is_file():
            problem = "a folder, not a file of prompts" if path.is_dir() else "no such file"
            raise UserError(f"--prompts-file {path}: {problem}")
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            from domainlm.data.corpus import invalid_utf8_lines_shown

            raise UserError(
                f"--prompts-file {path}: invalid UTF-8 on line(s) "
                f"{invalid_utf8_lines_shown(raw, 1)}; save it as UTF-8"
            ) from None
        from_file = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
        if not from_file:
            raise UserError(f"--prompts-file {path} holds no prompt (it is empty or blank)")
        prompts += from_file
    if not prompts:
        raise UserError("give a prompt: --prompt TEXT or --prompts-file FILE (one prompt per line)")
    return prompts


def generate_samples(
    model: Any,
    tokenizer: Any,
    eos_id: int,
    prompts: list[str],
    *,
    max_new_tokens: int,
    settings: Any,
    seed: int | None,
    num_samples: int = 1,
    batch_size: int = 16,
    context_length: int | None = None,
    precision: str = "fp32",
    on_text: Any = None,
    start: list[int] | None = None,
) -> list[Sample]:
    """Continue every prompt `num_samples` times, in batches; the model is used in eval mode.
    `start`: the tokens before every prompt (`LoadedModel.start_ids`; default the EOS).
    `on_text(text)`, if given, receives the growing text of the first sequence of each batch.
    With `context_length`, a continuation ends where the model's context does (`sample_batch`);
    such samples are marked `stopped_at_context`.
    """
    import torch

    from domainlm.model.device import autocast
    from domainlm.text.sampling import make_generator, sample_batch, sample_seed

    device = next(model.parameters()).device
    rows = [(i, k) for i in range(len(prompts)) for k in range(num_samples)]  # (prompt, sample)
    start_tokens = 1 if start is None else len(start)
    encoded = encode_prompts(tokenizer, prompts, start_tokens, context_length)
    generators = {(i, k): make_generator(sample_seed(seed, prompts[i], k), device) for i, k in rows}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id

    cut = {
        (i, k)
        for i, k in rows
        if context_length is not None
        and start_tokens + len(encoded[prompts[i]]) + max_new_tokens > context_length
    }
    batches = sample_batches(rows, cut, batch_size)
    was_training = model.training
    model.eval()
    done: dict[tuple[int, int], Sample] = {}
    try:
        for batch in batches:
            first = encoded[prompts[batch[0][0]]]

            def show(generated: list[list[int]], first: list[int] = first) -> None:
                on_text(decode_continuation(tokenizer, first, generated[0]))

            with torch.no_grad(), autocast(device, precision):
                results = sample_batch(
                    model,
                    [encoded[prompts[i]] for i, _ in batch],
                    eos_id=eos_id,
                    max_new_tokens=max_new_tokens,
                    settings=settings,
                    generator=[generators[row] for row in batch],
                    context_length=context_length,
                    pad_id=pad_id,
                    on_step=show if on_text else None,
                    start=start,
                )
            for (i, k), result in zip(batch, results, strict=True):
                prompt = prompts[i]
                text = decode_continuation(tokenizer, encoded[prompt], result.tokens)
                sample = Sample(prompt, k, text, result.tokens, result.stopped_at_eos)
                sample.prompt_tokens = start_tokens + len(encoded[prompt])
                sample.prompt_number = i + 1
                # sample_batch ends a sequence at EOS, at max_new_tokens, or where the context
                # is full (a row it cuts is alone): short of both others, the context.
                sample.stopped_at_context = context_length is not None and not (
                    result.stopped_at_eos or len(result.tokens) >= max_new_tokens
                )
                done[(i, k)] = sample
    finally:
        model.train(was_training)
    return [done[row] for row in rows]


def encode_prompts(
    tokenizer: Any,
    prompts: list[str],
    start_tokens: int = 1,
    context_length: int | None = None,
    what: str = "prompt",
) -> dict[str, list[int]]:
    """Each prompt's token ids, without the start tokens. Text is text, as in training:
    `<|endoftext|>` typed is its characters, not the special token. A prompt that does not fit
    the context after the start tokens is a UserError, before anything is generated."""
    encoded = {
        p: tokenizer(p, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        for p in prompts
    }
    room = None if context_length is None else context_length - start_tokens
    for number, prompt in enumerate(prompts, start=1):
        if room is not None and len(encoded[prompt]) > room:
            raise UserError(
                f"{what} {number} is {len(encoded[prompt]):,} tokens: the model's context of "
                f"{context_length:,} holds at most {room:,} after the {start_tokens} start "
                "token(s); shorten it"
            )
    return encoded


def sample_batches(
    rows: list[tuple[int, int]], cut: set[tuple[int, int]], batch_size: int
) -> list[list[tuple[int, int]]]:
    """`rows` (prompt, sample) in batches of `batch_size`; a row the context cuts short runs
    alone, since in a batch it would stop where the longest prompt fills the context. Each row
    draws from its own generator, so batching changes no sample."""
    free = [row for row in rows if row not in cut]
    batches = [free[i : i + batch_size] for i in range(0, len(free), batch_size)]
    return batches + [[row] for row in rows if row in cut]


# Han ideographs (with extensions A and the compatibility block), CJK punctuation, kana, Hangul
# syllables and full-width forms: scripts written without spaces between characters.
_CJK = "\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
_SPACE_BETWEEN_CJK = re.compile(f"(?<=[{_CJK}]) (?=[{_CJK}])")
_ONE_CJK = re.compile(f"[{_CJK}]")
_SPACES_CJK: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def spaces_cjk(tokenizer: Any) -> bool:
    """Whether `tokenizer.decode` puts a space between CJK characters: BERT-style WordPiece
    tokenizers do (the `uer/gpt2-chinese-*` models decode "今天" as "今 天"), byte-level BPE and
    SentencePiece ones do not. Probed once per tokenizer by decoding the tokens of two CJK
    characters from its vocabulary (none there: no CJK text to join)."""
    try:
        return _SPACES_CJK[tokenizer]
    except (KeyError, TypeError):
        pass
    cjk = _ONE_CJK.fullmatch
    pair = [i for t, i in tokenizer.get_vocab().items() if cjk(t)][:2]  # two characters' tokens
    found = len(pair) == 2 and bool(_SPACE_BETWEEN_CJK.search(tokenizer.decode(pair)))
    with contextlib.suppress(TypeError):  # not weak-referenceable: probe again next time
        _SPACES_CJK[tokenizer] = found
    return found


def decode_text(tokenizer: Any, ids: list[int]) -> str:
    """`tokenizer.decode(ids)`, without the spaces a BERT-style tokenizer puts between CJK
    characters (its tokens carry no spaces of their own there, so none are lost)."""
    text = tokenizer.decode(ids)
    return _SPACE_BETWEEN_CJK.sub("", text) if spaces_cjk(tokenizer) else text


def decode_continuation(tokenizer: Any, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text that `new_ids` add after the prompt, so that `prompt + text` reads right.

    Decoded with the prompt's last token as context, minus that token's own text: decoded alone,
    a continuation loses its leading space under SentencePiece tokenizers (their decoder strips
    the space of the first "▁word"), giving "the catsat" for "the cat" + " sat". When the context
    does not decode to a prefix (a character split across the join), the continuation alone.
    """
    if not prompt_ids or not new_ids:
        return decode_text(tokenizer, new_ids)
    context = [int(prompt_ids[-1])]
    head = decode_text(tokenizer, context)
    full = decode_text(tokenizer, context + list(new_ids))
    if full.startswith(head):
        return full[len(head) :]
    return decode_text(tokenizer, new_ids)


def generate(config: GenerateConfig, out: TextIO | None = None) -> list[Sample]:
    """Load the model, generate, optionally check memorization; print to `out` when given."""
    from domainlm.model.device import pick_device, resolve_precision
    from domainlm.model.lora import load_any_model

    prompts = read_prompts(config)
    loaded = load_any_model(
        config.model, eos_token=config.eos_token, trust_remote_code=config.trust_remote_code
    )
    encode_prompts(
        loaded.tokenizer, prompts, len(loaded.start_ids), loaded.context_length
    )  # too long: refused
    checker = MemorizationChecker.open(config, loaded) if config.check_memorization else None
    device = pick_device(requested=config.device)
    precision = resolve_precision(config.precision, device)
    if device.type == "cpu" and config.precision == "auto":
        precision = "fp32"  # bf16 autocast on CPU is slower for one-token steps; asked: as asked
    model = loaded.model.to(device)
    streaming = (
        out is not None and not config.json and len(prompts) == 1 and config.num_samples == 1
    )
    printer = TextPrinter(out, prompts[0]) if streaming and out is not None else None
    samples = generate_samples(
        model,
        loaded.tokenizer,
        loaded.eos_id,
        prompts,
        max_new_tokens=config.max_new_tokens,
        settings=config.settings(),
        seed=config.seed,
        num_samples=config.num_samples,
        batch_size=config.batch_size,
        context_length=loaded.context_length,
        precision=precision,
        on_text=printer,
        start=loaded.start_ids,
    )
    for sample in samples:
        if checker is not None:
            sample.memorization = checker.check(sample.tokens)
        if out is None:
            continue
        if config.json:
            out.write(json.dumps(sample.to_json(), ensure_ascii=False) + "\n")
        elif printer is not None:
            printer.finish(sample.text)
        else:
            out.write(f"--- prompt {sample.prompt_number}, sample {sample.sample + 1}\n")
            out.write(f"{sample.prompt}{sample.text}\n")
        if checker is not None and not config.json:
            out.write(checker.describe(sample.memorization) + "\n")
        if out is not None:
            out.flush()
    if checker is not None:
        checker.warn(samples)
    note = context_note(samples, loaded.context_length, config.max_new_tokens)
    if out is not None and note is not None:
        print(note, file=sys.stderr)
    return samples


def context_note(samples: list[Sample], context_length: int, max_new_tokens: int) -> str | None:
    """One line for a run whose samples the model's context cut short of --max-new-tokens, else
    None. The numbers are those of the sample that used the most positions."""
    stopped = [s for s in samples if s.stopped_at_context]
    if not stopped:
        return None
    fullest = max(stopped, key=lambda s: s.prompt_tokens + len(s.tokens))
    which = "" if len(samples) == 1 else f"{len(stopped)} of {len(samples)} samples "
    example = "" if len(stopped) == 1 else "e.g. "  # each at its own prompt's length
    return (
        f"domainlm: note: {which}stopped at the model's context of {context_length} positions "
        f"({example}prompt {fullest.prompt_tokens} + {len(fullest.tokens)} new tokens), "
        f"before --max-new-tokens {max_new_tokens}"
    )


def generate_texts(config: GenerateConfig) -> list[str]:
    """The continuations (text after each prompt), prompt by prompt, `num_samples` each."""
    return [s.text for s in generate(config, out=None)]


def run_generate(config: GenerateConfig) -> list[Sample]:
    """The command: print to stdout (streaming one prompt), warnings to stderr."""
    return generate(config, out=sys.stdout)


class TextPrinter:
    """Writes the text of one sequence as it grows, holding back an incomplete UTF-8 character."""

    def __init__(self, out: TextIO, prompt: str) -> None:
        self.out = out
        self.printed = 0
        out.write(prompt)
        out.flush()

    def __call__(self, text: str) -> None:
        if text.endswith("\ufffd"):
            return  # a multi-byte character is split across tokens; wait for the rest
        self.out.write(text[self.printed :])
        self.out.flush()
        self.printed = len(text)

    def finish(self, text: str) -> None:
        self.out.write(text[self.printed :] + "\n")
        self.printed = len(text)


# ----------------------------------------------------------------------------- memorization


def trained_documents(stream: Any, run: dict[str, Any]) -> Any:
    """The documents of `stream` the run of run file `run` trained on, as the file's document
    numbers: all but its held-out split when it had no --validation-file (None: all of them; a
    single document cannot be split, and `check_the_runs_tokens` refuses it)."""
    from domainlm.data.blocks import split_documents

    settings = run.get("config") or {}
    if settings.get("validation_file") or stream.num_documents < 2:
        return None
    share, seed = settings.get("validation_split", 0.05), settings.get("seed", 42)
    return split_documents(stream.num_documents, share, seed)[0]


def is_the_runs_data(stream: Any, run: dict[str, Any], trained: Any) -> bool | None:
    """Whether `stream` (of it, the documents `trained`; None: all) is what the run of run file
    `run` trained on: its identity's train_data fingerprint. None: the run file has none. A run
    that held documents out had more than one."""
    from domainlm.data.tokens import stream_fingerprint

    expected = (run.get("identity") or {}).get("train_data")
    if not isinstance(expected, str):
        return None
    if trained is None and not (run.get("config") or {}).get("validation_file"):
        return False  # a single document: the run split its data, so it had more than one
    return stream_fingerprint(stream if trained is None else stream.select(trained)) == expected


def check_the_runs_tokens(
    stream: Any, run: dict[str, Any], model: str, train_file: str, trained: Any
) -> None:
    """`is_the_runs_data`, or a UserError: what was read as the run's data is not (changed)."""
    if is_the_runs_data(stream, run, trained) is False:
        raise UserError(
            f"--check-memorization: {train_file} is not the text {model} was trained on (its "
            "tokens differ from the run's); pass --train-file with the training data"
        )


def is_the_runs_file(train_file: str, run: dict[str, Any]) -> bool:
    """`train_file` is where the run of run file `run` read its training data (its recorded
    absolute path)."""
    recorded = run.get(TRAIN_DATA_FILE)
    path = recorded.get("path") if isinstance(recorded, dict) else None
    return isinstance(path, str) and Path(train_file).resolve() == Path(path).resolve()


def the_runs_training_data(model: str, run: dict[str, Any]) -> str:
    """The training data of the run whose run file is `run`, for --check-memorization: where the
    run recorded it (absolute), else its --train-file as typed (relative to the folder the run
    was started in, perhaps not this one). Missing is a UserError; that it is the text the run
    trained on is checked once tokenized (`check_the_runs_tokens`)."""
    typed = str(run["config"]["train_file"])
    recorded = run.get(TRAIN_DATA_FILE)
    recorded = recorded if isinstance(recorded, dict) else {}
    places = [p for p in (recorded.get("path"), typed) if isinstance(p, str)]
    found = next((p for p in places if Path(p).exists()), None)
    if found is None:
        raise UserError(
            f"--check-memorization: the training data of {model}, {typed}, is not found "
            f"(looked for {' and '.join(dict.fromkeys(places))}); pass --train-file"
        )
    return found


class MemorizationChecker:
    """Looks samples up in the n-gram index of the training token stream and describes the result."""

    def __init__(
        self,
        index: Any,
        tokenizer: Any,
        train_file: str,
        doc_sep: str,
        threshold: int,
        file_documents: Any = None,
    ):
        self.index = index
        self.tokenizer = tokenizer
        self.train_file = train_file
        self.doc_sep = doc_sep
        self.threshold = threshold
        self.file_documents = file_documents  # the file's number of each indexed document

    @classmethod
    def open(cls, config: GenerateConfig, loaded: Any) -> MemorizationChecker:
        """Tokenize (or read the cached tokens of) the training data; build or load its index."""
        from domainlm.data.corpus import text_files
        from domainlm.data.tokens import default_cache_dir, load_token_stream
        from domainlm.model.loading import tokenizer_fingerprint
        from domainlm.text.memorize import NgramIndex

        train_file, cache_dir = config.train_file, config.cache_dir
        doc_sep, errors, column = config.doc_sep, config.encoding_errors, config.text_column
        found = read_run_settings(config.model)  # a run folder, or a checkpoint in one
        explicit = train_file is not None
        run = found[1].get("config") if found else None
        if not explicit and (not isinstance(run, dict) or not run.get("train_file")):
            raise UserError(
                "--check-memorization needs --train-file (or --model a domainlm run's folder)"
            )
        # --train-file naming the run's own data reads it as the run did (--doc-sep, ...)
        runs_own = isinstance(run, dict) and explicit and is_the_runs_file(train_file, found[1])
        if isinstance(run, dict) and (not explicit or runs_own):
            train_file = train_file if explicit else the_runs_training_data(config.model, found[1])
            cache_dir = cache_dir or run.get("cache_dir")
            doc_sep = run.get("doc_sep", doc_sep)
            errors = run.get("encoding_errors", errors)
            column = run.get("text_column", column)
        text_files(train_file)
        cached = load_token_stream(
            train_file,
            loaded.tokenizer,
            loaded.eos_id,
            tokenizer_fingerprint(loaded.tokenizer, loaded.eos_id, loaded.document_prefix),
            cache_dir,
            doc_sep,
            errors,
            column,
            prefix=loaded.document_prefix,
        )
        stream, key, trained = cached.stream, cached.key, None
        if found is not None:  # the run's own data: what it trained on, less its held-out split
            trained = trained_documents(stream, found[1])
            if not explicit:
                check_the_runs_tokens(stream, found[1], config.model, str(train_file), trained)
            elif not is_the_runs_data(stream, found[1], trained):
                trained = None  # another text (or one not checkable): searched whole
        if trained is not None:
            stream = stream.select(trained)
            key = f"{key}.trained-{hashlib.sha256(trained.tobytes()).hexdigest()[:16]}"
        folder = Path(cache_dir) if cache_dir else default_cache_dir()
        index, hit, seconds = NgramIndex.load_or_build(stream, folder, key)
        how = "loaded" if hit else "built"
        held = cached.stream.num_documents - len(trained) if trained is not None else 0
        left = f", less the run's {held} held-out documents" if held else ""
        print(
            f"memorization index {how} in {seconds:.1f}s ({len(stream.tokens):,} training "
            f"tokens of {train_file}{left})",
            file=sys.stderr,
        )
        threshold = config.memorization_threshold
        return cls(index, loaded.tokenizer, str(train_file), doc_sep, threshold, trained)

    def check(self, tokens: list[int]) -> dict[str, Any]:
        """The longest copied span of a sample: its length, where it is, and the training line."""
        span = self.index.longest_copy(tokens)
        if span is None:
            return {"copied_tokens": 0, "over_threshold": False}
        from domainlm.text.memorize import source_line

        line_tokens = self.index.document_tokens(span.document)
        document = (
            span.document
            if self.file_documents is None
            else int(self.file_documents[span.document])
        )
        return {
            "copied_tokens": span.length,
            "over_threshold": span.length >= self.threshold,
            "sample_token_start": span.sample_start,
            "copied_text": decode_text(
                self.tokenizer, tokens[span.sample_start : span.sample_start + span.length]
            ),
            "train_document": document + 1,
            "train_line": source_line(self.train_file, document, self.doc_sep),
            "train_text": decode_text(self.tokenizer, line_tokens.tolist())[:SHOWN_TRAINING_CHARS],
        }

    def describe(self, result: dict[str, Any] | None) -> str:
        if not result or not result["copied_tokens"]:
            return f"memorization: no span of {NGRAM}+ tokens copied from the training data"
        where = self._where(result)
        return (
            f"memorization: longest copied span {result['copied_tokens']} tokens, from {where}: "
            f"{result['train_text']!r}"
        )

    def warn(self, samples: list[Sample]) -> None:
        for number, sample in enumerate(samples, start=1):
            result = sample.memorization
            if result and result["over_threshold"]:
                print(
                    f"warning: sample {number} repeats {result['copied_tokens']} tokens verbatim "
                    f"from {self._where(result)} (--memorization-threshold {self.threshold})",
                    file=sys.stderr,
                )

    def _where(self, result: dict[str, Any]) -> str:
        if result.get("train_line"):
            return f"{self.train_file} line {result['train_line']}"
        return f"{self.train_file} document {result['train_document']}"


# ----------------------------------------------------------------------------- while training


class TrainingSampler:
    """Samples from fixed prompts every N steps while training: to samples.jsonl and the console.

    Runs on rank 0 with the unwrapped model. It draws from its own generator inside a forked RNG
    and restores the model's train/eval mode, so the training run is the same with or without it.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        eos_id: int,
        prompts: list[str],
        every: int,
        max_new_tokens: int,
        path: Path,
        console: Any,
        precision: str,
        seed: int,
        context_length: int | None = None,
        start: list[int] | None = None,
    ) -> None:
        self.model, self.tokenizer, self.eos_id = model, tokenizer, eos_id
        self.start = start
        self.prompts, self.every, self.max_new_tokens = prompts, every, max_new_tokens
        self.path, self.console, self.precision, self.seed = path, console, precision, seed
        self.context_length = context_length

    @classmethod
    def create(
        cls,
        config: Any,
        loaded: Any,
        model: Any,
        output_dir: Path,
        console: Any,
        ctx: Any,
        precision: str,
        start_step: int,
    ) -> TrainingSampler | None:
        """The sampler of a run with --sample-prompts (on rank 0), else None. Trims samples.jsonl
        to the resumed step (or clears it on a fresh start), as metrics.jsonl is."""
        if not config.sample_prompts or not ctx.is_main:
            return None
        if config.strategy == "fsdp" and ctx.world_size > 1:
            console.warn("--sample-prompts is skipped under FSDP (rank 0 alone holds a shard)")
            return None
        path = Path(output_dir) / SAMPLES_FILE
        trim_samples(path, start_step)
        return cls(
            model,
            loaded.tokenizer,
            loaded.eos_id,
            list(config.sample_prompts),
            config.sample_every or config.eval_steps,
            config.sample_max_new_tokens,
            path,
            console,
            precision,
            config.seed,
            loaded.context_length,
            loaded.start_ids,
        )

    def maybe_sample(self, step: int, final: bool = False) -> list[Sample]:
        """Sample at every `every` steps and at the last one."""
        if step % self.every and not final:
            return []
        import torch

        from domainlm.text.sampling import SamplingSettings

        device = next(self.model.parameters()).device
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            samples = generate_samples(
                self.model,
                self.tokenizer,
                self.eos_id,
                self.prompts,
                max_new_tokens=self.max_new_tokens,
                settings=SamplingSettings(temperature=TRAINING_TEMPERATURE, top_k=TRAINING_TOP_K),
                seed=self.seed,
                context_length=self.context_length,
                precision=self.precision,
                start=self.start,
            )
        with open(self.path, "a", encoding="utf-8") as handle:
            for sample in samples:
                record = {"step": step, "prompt": sample.prompt, "text": sample.text}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        for sample in samples:
            self.console.info(f"sample at step {step}: {sample.prompt}{sample.text}")
        return samples


def trim_samples(path: Path, keep_until_step: int) -> None:
    """Drop samples written after `keep_until_step` (all of them for a fresh start)."""
    if not path.is_file():
        return
    if keep_until_step <= 0:
        path.unlink()
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            break
        if record.get("step", 0) <= keep_until_step:
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    tmp.replace(path)
