"""The GPU benchmark scripts work before a GPU is lent: benchmarks/gpu_lora.py's dry run on the CPU
(both tools, the same LoRA settings), and the shapes it measures are the sizes it names."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def lora_parameters(config: dict, r: int) -> int:
    """LoRA's trainable count for a Llama shape, by hand: r x (in + out) for each of q, k, v, o,
    gate, up and down in every layer."""
    h, f = config["hidden_size"], config["intermediate_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    linears = [(h, h), (h, kv), (h, kv), (h, h), (h, f), (h, f), (f, h)]
    return config["num_hidden_layers"] * sum(r * (i + o) for i, o in linears)


def test_gpu_lora_dry_run_trains_both_tools_with_the_same_adapters(tmp_path: Path) -> None:
    from gpu_lora import LLAMA_TINY

    out = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DOMAINLM_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_lora.py"), "--shapes", "tiny",
         "--work-dir", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    row = json.loads(out.read_text())["llama-tiny"]
    expected = lora_parameters(LLAMA_TINY, r=8)
    for tool in ("domainlm", "trainer"):
        assert row[tool]["trainable"] == expected, (tool, row[tool])
        assert row[tool]["steps"] == row["steps"] == 8, (tool, row[tool])
        assert math.isfinite(row[tool]["tokens_per_s"]) and row[tool]["tokens_per_s"] > 0
    assert "| llama-tiny, 128 x 4 | yes | 16,384 / 16,384 |" in done.stdout


def test_the_measured_llama_shapes_are_the_sizes_they_are_called() -> None:
    """1B-class and 8B-class (with GPT-2's vocabulary of 50,257), counted on the meta device."""
    from gpu_lora import LLAMA_1B, LLAMA_8B
    from transformers import LlamaConfig, LlamaForCausalLM

    def parameters(shape: dict) -> int:
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(vocab_size=50257, **shape))
        return sum(p.numel() for p in model.parameters())

    assert 1.0e9 < parameters(LLAMA_1B) < 1.2e9
    # Llama 3 8B is 8.03B with its 128,256-token vocabulary; 2 x 78k x 4096 fewer rows here
    assert parameters(LLAMA_8B) == 8_030_261_248 - 2 * (128_256 - 50_257) * 4096
