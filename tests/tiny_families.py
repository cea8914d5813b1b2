"""Tiny random-init models of the causal-LM families domainlm is tested on (docs/models.md).

Each is 2 layers, 64 wide, with GPT-2's real vocabulary (50,257) and its offline tokenizer
(`gpt2_tokenizer`), dropout off, saved as a plain Hugging Face folder: what a user's
`--model FOLDER` would be, built in a fraction of a second with nothing downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from domainlm.model.loading import gpt2_tokenizer

EOS = 50256
COMMON: dict[str, Any] = dict(
    vocab_size=50257, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS
)
# Decoder shape shared by the Llama-like families: 4 query heads, 2 key/value heads (grouped).
_LLAMA_LIKE: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    attention_dropout=0.0,
)
# model_type -> config fields. Every dropout is 0, so a forward pass is a function of its inputs.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(_LLAMA_LIKE),
    "qwen2": dict(_LLAMA_LIKE),
    "mistral": dict(_LLAMA_LIKE, sliding_window=None),
    "gemma": dict(_LLAMA_LIKE, num_key_value_heads=1, head_dim=16),
    # final_logit_softcapping small enough to matter for a random-init model's small logits:
    # a loss path that skips it is visibly wrong (tests/test_architectures.py).
    "gemma2": dict(_LLAMA_LIKE, head_dim=16, final_logit_softcapping=0.5),
    "phi3": dict(_LLAMA_LIKE, num_key_value_heads=4, resid_pdrop=0.0, embd_pdrop=0.0),
    "gpt_neox": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    ),
    "opt": dict(
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=64,
        dropout=0.0,
        attention_dropout=0.0,
    ),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4, hidden_dropout=0.0, attention_dropout=0.0),
    # The current families users start from (Qwen 3, Gemma 3, OLMo 2, SmolLM 3), Phi-1/2 (a
    # biased head, parallel attention and MLP) and StarCoder 2 (biased layers, its own norm).
    "qwen3": dict(_LLAMA_LIKE, head_dim=16),
    "gemma3_text": dict(_LLAMA_LIKE, head_dim=16),
    "olmo2": dict(_LLAMA_LIKE),
    "smollm3": dict(_LLAMA_LIKE),
    "phi": dict(_LLAMA_LIKE, num_key_value_heads=4, resid_pdrop=0.0, embd_pdrop=0.0),
    "starcoder2": dict(_LLAMA_LIKE, residual_dropout=0.0, embedding_dropout=0.0),
    # Granite divides its logits by logits_scaling after the head (full-logits path); 4, not its
    # default 1, so that a loss that skipped it would be visibly wrong.
    "granite": dict(_LLAMA_LIKE, logits_scaling=4.0),
}
# Families whose attention takes restarting position ids as document boundaries (--packing docs).
PACKS_DOCUMENTS = frozenset(FAMILIES) - {"opt", "bloom"}


def family_config(family: str, **overrides: Any) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family], **overrides})


def build_family_model(family: str, seed: int = 0, **overrides: Any) -> Any:
    """A seeded random-init model of the family, in eval mode."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(family_config(family, **overrides)).eval()


def save_family_folder(family: str, folder: Path, seed: int = 0, **overrides: Any) -> Path:
    """The family's tiny model and GPT-2's tokenizer as a Hugging Face folder."""
    build_family_model(family, seed, **overrides).save_pretrained(folder)
    gpt2_tokenizer().save_pretrained(folder)
    return folder
