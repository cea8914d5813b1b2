"""domainlm: fine-tune GPT-2 or any Hugging Face causal LM on your own text, and measure it honestly.

The command line is a thin layer over these functions:

    from domainlm import TrainConfig, train
    result = train(TrainConfig(model="scratch:tiny", train_file="train.txt", output_dir="out"))

The names below are imported on first use (module `__getattr__`), not when the package is: every
`import domainlm.x` runs this file first, and an eager `import torch` here would make the command
line (domainlm/entry.py) spend its first seconds, where Ctrl-C must still exit cleanly, in it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from domainlm.config import TrainConfig
    from domainlm.errors import UserError
    from domainlm.evaluation.perplexity import (
        PerplexityConfig,
        PerplexityReport,
        evaluate_perplexity,
    )
    from domainlm.model.loading import load_model
    from domainlm.run.train import TrainResult, train

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "PerplexityConfig": "domainlm.evaluation.perplexity",
    "PerplexityReport": "domainlm.evaluation.perplexity",
    "TrainConfig": "domainlm.config",
    "TrainResult": "domainlm.run.train",
    "UserError": "domainlm.errors",
    "evaluate_perplexity": "domainlm.evaluation.perplexity",
    "load_model": "domainlm.model.loading",
    "train": "domainlm.run.train",
}

__all__ = [
    "PerplexityConfig",
    "PerplexityReport",
    "TrainConfig",
    "TrainResult",
    "UserError",
    "evaluate_perplexity",
    "load_model",
    "train",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use, and keep the name here for the next time."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
