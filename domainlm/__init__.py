"""domainlm: fine-tune GPT-2 or any Hugging Face causal LM on your own text, and measure it honestly.

The command line is a thin layer over these functions:

    from domainlm import TrainConfig, train
    result = train(TrainConfig(model="scratch:tiny", train_file="train.txt", output_dir="out"))
"""

from domainlm.config import TrainConfig
from domainlm.errors import UserError
from domainlm.evaluation.perplexity import PerplexityConfig, PerplexityReport, evaluate_perplexity
from domainlm.model.loading import load_model
from domainlm.run.train import TrainResult, train

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
