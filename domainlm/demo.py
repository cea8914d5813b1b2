"""`domainlm demo`: the main job on an embedded default, offline, with no user data.

The domain corpus is one the machine already has: the docstrings of Python's standard library,
one per line (whitespace collapsed), split into train and validation by a seeded shuffle.
"""

from __future__ import annotations

import ast
import random
import sysconfig
from pathlib import Path

from domainlm.config import TrainConfig, require_positive
from domainlm.errors import UserError
from domainlm.model.lora import is_adapter_folder

MIN_CHARS, MAX_CHARS = 40, 2000


def stdlib_docstrings(limit: int | None = None) -> list[str]:
    """Unique docstrings of the standard library's modules, classes and functions, one line each."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    docs: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if any(
            part in {"test", "tests", "idlelib", "site-packages", "lib2to3"} for part in path.parts
        ):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                text = ast.get_docstring(node)
                if not text:
                    continue
                line = " ".join(text.split())
                if MIN_CHARS <= len(line) <= MAX_CHARS and line not in seen:
                    seen.add(line)
                    docs.append(line)
        if limit is not None and len(docs) >= limit:
            break
    return docs


SMALL_VOCABULARY = (
    "the cat dog sat ran on a mat in house big small red blue and then it away".split()
)


def word_documents(n: int, seed: int = 0) -> list[str]:
    """A small synthetic corpus for tests and benchmarks: n documents of 3 to 40 words drawn
    from an 18-word vocabulary (fast to learn, uneven lengths, deterministic)."""
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(SMALL_VOCABULARY) for _ in range(rng.randint(3, 40))) for _ in range(n)
    ]


# Written into a demo's --output-dir: the folder is the demo's, its files may be rewritten.
DEMO_MARKER = ".domainlm-demo"
MARKER_TEXT = "written by `domainlm demo`: its data/ and model/ may be rewritten\n"


def write_demo_corpus(
    folder: Path, seed: int = 0, owned: bool = True, marker: Path | None = None
) -> tuple[Path, Path]:
    """data/train.txt and valid.txt of the demo; a file already there with other text is
    rewritten only when the folder is a demo's (`owned`), else refused (it is the user's).
    `marker`, the demo's, is written first: a demo killed while writing its corpus is still
    the demo's folder."""
    docs = stdlib_docstrings()
    random.Random(seed).shuffle(docs)
    n_valid = max(1, len(docs) // 20)
    train_file, valid_file = folder / "train.txt", folder / "valid.txt"
    texts = {
        train_file: "\n".join(docs[n_valid:]) + "\n",
        valid_file: "\n".join(docs[:n_valid]) + "\n",
    }
    for path, text in texts.items():
        if not owned and path.exists() and path.read_bytes() != text.encode("utf-8"):
            raise UserError(
                f"{path} exists and was not written by `domainlm demo`: the demo would replace "
                "it; pass another --output-dir"
            )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # --output-dir a file, or under one; not writable
        raise UserError(
            f"cannot create {folder} ({exc.strerror or exc}); pass another --output-dir"
        ) from exc
    if marker is not None:
        marker.write_text(MARKER_TEXT)
    for path, text in texts.items():
        path.write_text(text, encoding="utf-8")
    return train_file, valid_file


DEMO_STEPS = 180
DEMO_BLOCK = 256  # tokens a block; a --preset with a shorter context trains at its context


def stopped_demo(model_dir: Path, model: str, steps: int) -> bool:
    """`model_dir` holds a demo run of this model and length that stopped before its end
    (Ctrl-C, a kill) and saved a checkpoint: the demo continues it, not starts it again."""
    from domainlm.run.checkpoint import list_checkpoints, read_run_file

    run = read_run_file(model_dir)
    if not isinstance(run, dict) or run.get("finished"):
        return False
    settings = run.get("config")
    if not isinstance(settings, dict):
        return False
    same = settings.get("model") == model and settings.get("max_steps") == steps
    return same and bool(list_checkpoints(model_dir))


def run_demo(output_dir: Path, max_steps: int | None = None, model: str = "scratch:mini") -> None:
    from domainlm.run.train import train

    if max_steps is not None:
        require_positive("max_steps", max_steps)
    if is_adapter_folder(model):  # refused before the corpus is written, as below
        raise UserError(
            f"--preset {model} is a LoRA adapter folder: the demo trains a whole model; give a "
            "model folder (a LoRA run's merged/), a hub id or a scratch: preset"
        )
    # An unknown preset, or a hub model not cached when offline, is refused before the corpus
    # is written (its config alone is read).
    from domainlm.model.loading import context_length
    from domainlm.model.memory import model_config_of

    # 256 tokens a block, or a --preset's shorter context (the error named train's --block-size)
    block_size = min(DEMO_BLOCK, context_length(model_config_of(model)))
    steps = max_steps or DEMO_STEPS
    marker = output_dir / DEMO_MARKER
    train_file, valid_file = write_demo_corpus(
        output_dir / "data", owned=marker.is_file(), marker=marker
    )
    print(f"demo corpus: Python standard library docstrings -> {train_file}, {valid_file}")
    config = TrainConfig(
        model=model,
        train_file=str(train_file),
        validation_file=str(valid_file),
        output_dir=str(output_dir / "model"),
        block_size=block_size,
        batch_size=8,
        lr=2e-3,
        warmup_steps=min(20, steps // 5),  # a short demo (--max-steps 3) still reaches --lr
        scheduler="cosine",
        min_lr_ratio=0.1,
        weight_decay=0.1,
        max_steps=steps,
        eval_steps=60,
        save_steps=60,
        save_total_limit=2,
        logging_steps=10,
        # a demo stopped (Ctrl-C) is continued, as its stop line says; anything else rewritten
        overwrite_output_dir=not stopped_demo(output_dir / "model", model, steps),
        cache_dir=str(output_dir / "cache"),
    )
    result = train(config)
    print(
        f"\nvalidation perplexity: {result.initial_perplexity:.1f} before -> "
        f"{result.final_perplexity:.1f} after {result.steps} steps"
    )
    try:
        from domainlm.text.generate import GenerateConfig, generate_texts

        prompt = "Return the number of"
        sample = generate_texts(
            GenerateConfig(
                model=str(result.output_dir),
                prompts=[prompt],
                max_new_tokens=40,
                temperature=0.8,
                top_k=50,
                seed=0,
            )
        )[0]
        print(f"sample: {prompt}{sample}")
    except ImportError:
        pass
