"""Memory (issue 15 item 2): the plan's weights/gradients/optimizer figures against counts from
the real model; gradient checkpointing changes no loss or gradient and keeps fewer activations;
--load-dtype reaches the parameters; `inspect --model` prints the plan from a config alone;
bad values are one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import uneven_corpus, write_lines

from domainlm.cli import main
from domainlm.config import TrainConfig
from domainlm.errors import UserError
from domainlm.model.loading import build_scratch_model, load_model, scratch_config
from domainlm.model.loss import CausalLMLoss
from domainlm.model.memory import (
    enable_gradient_checkpointing,
    load_dtype_for,
    plan_memory,
)

ROOT = Path(__file__).resolve().parents[1]


def _reference_lora_params(model: torch.nn.Module, r: int) -> int:
    """r x (in + out) for every Conv1D/Linear inside the transformer blocks, counted by hand."""
    total = 0
    for name, module in model.named_modules():
        if ".h." not in f".{name}" or not hasattr(module, "weight") or module.weight.dim() != 2:
            continue
        if type(module).__name__ in ("Conv1D", "Linear"):
            total += r * sum(module.weight.shape)
    return total


def test_plan_counts_equal_the_real_models_parameters():
    model = build_scratch_model("tiny")
    params = sum(p.numel() for p in model.parameters())  # tied head counted once
    plan = plan_memory(
        scratch_config("tiny"), model="scratch:tiny", batch_size=2, block_size=64,
        precision="fp32", lora_r=4,
    )  # fmt: skip
    full = plan.scenarios["full"]
    assert plan.trainable_full == params
    assert (full.weights, full.gradients, full.optimizer) == (4 * params, 4 * params, 8 * params)
    assert full.weight_copies == 0  # no autocast in fp32
    lora = _reference_lora_params(model, 4)
    assert plan.trainable_lora == lora
    lora_terms = plan.scenarios["lora"]
    assert (lora_terms.gradients, lora_terms.optimizer) == (4 * lora, 8 * lora)
    bf16 = plan_memory(
        scratch_config("tiny"), model="scratch:tiny", batch_size=2, block_size=64,
        precision="bf16", lora_r=4,
    )  # fmt: skip
    assert bf16.scenarios["lora"].weights == 2 * params + 4 * lora  # bf16 base, fp32 adapters
    assert bf16.scenarios["full"].weights == 4 * params  # mixed precision: fp32 master weights
    for name in ("full", "lora"):  # checkpointing keeps less
        assert bf16.scenarios[name + "+ckpt"].activations < bf16.scenarios[name].activations
        assert bf16.scenarios[name + "+ckpt"].peak < bf16.scenarios[name].peak


def _loss_grads_and_saved_bytes(checkpointing: bool) -> tuple[float, dict, int]:
    torch.manual_seed(0)
    model = build_scratch_model("tiny", seed=3).train()  # dropout on: masks must be replayed
    if checkpointing:
        enable_gradient_checkpointing(model)
    loss = CausalLMLoss(model)
    ids = torch.randint(0, 50257, (4, 257), generator=torch.Generator().manual_seed(1))
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(7)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        nll = loss(ids[:, :-1], ids[:, 1:]).sum()
    nll.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return float(nll.detach()), grads, sum(saved.values())


def test_gradient_checkpointing_same_loss_and_grads_fewer_saved_activations():
    loss_plain, grads_plain, saved_plain = _loss_grads_and_saved_bytes(False)
    loss_ckpt, grads_ckpt, saved_ckpt = _loss_grads_and_saved_bytes(True)
    assert loss_ckpt == pytest.approx(loss_plain, rel=1e-6)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # the tensors the autograd graph keeps outside recomputed layers: activation memory
    assert saved_ckpt < 0.6 * saved_plain


def test_load_dtype_for_rules():
    assert load_dtype_for("auto", "bf16", lora=False) == torch.float32
    assert load_dtype_for("auto", "bf16", lora=True) == torch.bfloat16
    assert load_dtype_for("auto", "fp16", lora=True) == torch.float16
    assert load_dtype_for("auto", "fp32", lora=True) == torch.float32
    assert load_dtype_for("bfloat16", "bf16", lora=False) == torch.bfloat16  # pure bf16: allowed
    for args in (
        ("bfloat16", "fp32", False),
        ("float16", "fp16", False),
        ("float64", "bf16", True),
    ):
        with pytest.raises(UserError):
            load_dtype_for(*args)


def test_load_dtype_reaches_the_parameters(tmp_path, tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert {
        p.dtype for p in load_model("scratch:tiny", dtype=torch.bfloat16).model.parameters()
    } == {torch.bfloat16}
    train = write_lines(tmp_path / "train.txt", uneven_corpus(30, seed=2))
    from domainlm.run.train import train as run_train

    out = tmp_path / "out"
    run_train(
        TrainConfig(
            model=str(tiny_model_dir), train_file=str(train), output_dir=str(out), block_size=32,
            batch_size=2, max_steps=2, precision="bf16", load_dtype="bfloat16", device="cpu",
            gradient_checkpointing=True, quiet=True, save_steps=2,
        )
    )  # fmt: skip
    from safetensors import safe_open

    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.bfloat16}  # noqa: SIM118


def test_inspect_model_prints_the_plan_from_a_config_alone(tmp_path):
    folder = tmp_path / "config-only"
    scratch_config("mini").save_pretrained(folder)  # config.json, no weights, no tokenizer
    assert [p.name for p in folder.iterdir()] == ["config.json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DOMAINLM_DEVICE": "cpu"}
    cmd = [sys.executable, "-m", "domainlm", "inspect", "--model", str(folder), "--batch-size", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    params = sum(p.numel() for p in build_scratch_model("mini").parameters())
    assert f"{params / 1e6:,.1f}M parameters" in out.stdout
    for label in ("full fine-tuning", "full + --gradient-checkpointing", "LoRA r=8"):
        assert label in out.stdout
    assert "fits with:" in out.stdout
    row = next(line for line in out.stdout.splitlines() if "full fine-tuning" in line).split()
    assert float(row[2]) == pytest.approx(params * 4 / 1024**3, abs=0.006)  # weights, GiB


def test_inspect_a_run_folder_plans_at_the_runs_block_and_batch(tmp_path, tiny_model_dir, capsys):
    """A run trained at block 32, batch 3, fp32 is planned at 32 x 3 in fp32, not at the model's
    context of 256, the default batch of 8 and the device's precision; the user's own flags
    still win."""
    from domainlm import train

    run = tmp_path / "run"
    train_file = write_lines(tmp_path / "train.txt", uneven_corpus(30, seed=2))
    train(TrainConfig(
        model=str(tiny_model_dir), train_file=str(train_file), output_dir=str(run),
        block_size=32, batch_size=3, max_steps=2, precision="fp32", quiet=True,
    ))  # fmt: skip
    for target in (run, run / "checkpoint-2"):
        assert main(["inspect", "--model", str(target), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        plan = report["memory_plan"]
        assert (plan["block_size"], plan["batch_size"], plan["precision"]) == (32, 3, "fp32")
        assert "--block-size 32, --batch-size 3 and --precision fp32" in report["note"]
    assert main(["inspect", "--model", str(run), "--json", "--block-size", "16"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["memory_plan"]["block_size"], report["memory_plan"]["batch_size"]) == (16, 3)
    assert main(["inspect", "--model", str(tiny_model_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)  # not a run: the model's context, batch 8
    assert (report["memory_plan"]["block_size"], report["memory_plan"]["batch_size"]) == (256, 8)
    assert report["note"] is None


def test_inspect_model_json_plan(tmp_path, capsys):
    folder = tmp_path / "config-only"
    scratch_config("mini").save_pretrained(folder)
    assert main(["inspect", "--model", str(folder), "--json", "--precision", "fp32"]) == 0
    plan = json.loads(capsys.readouterr().out)["memory_plan"]
    params = sum(p.numel() for p in build_scratch_model("mini").parameters())
    full = plan["scenarios"]["full"]
    assert (full["weights"], full["gradients"], full["optimizer"]) == (
        4 * params, 4 * params, 8 * params
    )  # fmt: skip


@pytest.mark.parametrize(
    "argv",
    [
        ["inspect", "--model", "scratch:tiny", "--lora-targets", "nope"],
        ["inspect", "--model", "scratch:tiny", "--load-dtype", "bfloat16", "--precision", "fp32"],
        ["inspect", "--model", "scratch:tiny", "--block-size", "99999"],
        ["inspect", "--model", "scratch:tiny", "--lora-dropout", "1.5"],
        ["inspect", "--model", "/no/such/folder"],
    ],
)
def test_bad_values_are_one_line_errors(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("domainlm: error:") and "\n" not in err


def test_bad_train_values_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="load-dtype"):
        TrainConfig(model="m", train_file="t", output_dir="o", load_dtype="float64")


def _tiny_llama_config(kv_heads: int = 4):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
    )  # fmt: skip


def _family_config(family: str):  # type: ignore[no-untyped-def]
    """gpt2 (scratch:tiny), llama (4 heads) or llama-gqa (4 query heads, 1 key/value head)."""
    if family == "gpt2":
        return scratch_config("tiny")
    return _tiny_llama_config(kv_heads=1 if family == "llama-gqa" else 4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lora_plan_counts_equal_the_real_peft_model(family):
    """The plan's LoRA weights, gradients, AdamW state and autocast copies against the bytes of
    a real peft model built as `train --lora` builds it (bf16 base, default targets, r=8,
    make_optimizer over the trainable parameters), after one step."""
    from transformers import AutoModelForCausalLM

    from domainlm.model.device import autocast
    from domainlm.model.lora import LoraSettings, attach_lora
    from domainlm.run.train import make_optimizer

    cfg = scratch_config("tiny") if family == "gpt2" else _tiny_llama_config()
    plan = plan_memory(cfg, model=family, batch_size=2, block_size=32, precision="bf16")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(cfg).to(load_dtype_for("auto", "bf16", lora=True))
    model = attach_lora(base, LoraSettings(), seed=0, base_name=family).train()
    config = TrainConfig(model=family, train_file="t", output_dir="o", lora=True, device="cpu")
    optimizer = make_optimizer(model, config, torch.device("cpu"))
    loss = CausalLMLoss(model.get_base_model())
    ids = torch.randint(0, cfg.vocab_size, (2, 33))
    with autocast(torch.device("cpu"), "bf16"):
        nll = loss(ids[:, :-1], ids[:, 1:]).mean()
    nll.backward()
    optimizer.step()

    def nbytes(tensors) -> int:  # type: ignore[no-untyped-def]
        return sum(t.numel() * t.element_size() for t in tensors)

    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    assert {p.dtype for p in trainable} == {torch.float32}
    assert all(p.grad is None for p in params if not p.requires_grad)  # frozen: no gradients
    terms = plan.scenarios["lora"]
    assert plan.trainable_lora == sum(p.numel() for p in trainable)
    assert terms.weights == nbytes(params)
    assert terms.gradients == nbytes(p.grad for p in trainable)
    moments = [v for s in optimizer.state.values() for k, v in s.items() if k != "step"]
    assert len(optimizer.state) == len(trainable) and terms.optimizer == nbytes(moments)
    assert terms.weight_copies == 2 * plan.trainable_lora  # autocast caches the adapters only


@pytest.mark.parametrize(
    ("family", "base_dtype", "lora"),
    [
        ("gpt2", torch.bfloat16, True),
        ("llama", torch.bfloat16, True),
        ("llama", torch.float32, True),
        ("llama-gqa", torch.bfloat16, True),
        ("gpt2", torch.float32, False),
        ("llama", torch.float32, False),
        ("llama-gqa", torch.float32, False),
    ],
)
def test_layer_activations_equal_what_autograd_keeps(family, base_dtype, lora):
    """The bytes one transformer layer (fast kernels, bf16 autocast) saves for the backward,
    followed with saved-tensor hooks, against the plan's `layer_activations` plus the autocast
    copies of that layer's float32 matrices (within 3%: the rotary tables and the norms'
    per-token scales are not counted). Full fine-tuning, and LoRA (default targets, dropout
    0.05; the copies are of the float32 adapters and, with a float32 base, of its matrices).
    A plan that counted the frozen base's inputs as in full fine-tuning, or left out the
    adapters' inputs and dropout masks, is 15-30% off here; one that counted grouped-query
    attention's key and value at the query's width (llama-gqa: 1 key/value head for 4 query
    heads) is 4-5% over."""
    from transformers import AutoModelForCausalLM

    from domainlm.model.device import autocast
    from domainlm.model.fastpath import use_fast_kernels
    from domainlm.model.lora import LoraSettings, attach_lora
    from domainlm.model.memory import (
        BatchShape,
        layer_activations,
        lora_adapters,
        meta_model,
        model_shape,
    )

    cfg = _family_config(family)
    shape = model_shape(meta_model(cfg))
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(cfg).to(base_dtype).train()
    model = attach_lora(base, LoraSettings(), seed=0, base_name=family).train() if lora else base
    use_fast_kernels(model)
    layers = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}
    inside = [False]
    layers[1].register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    layers[1].register_forward_hook(lambda *_: inside.__setitem__(0, False))

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if inside[0] and storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, cfg.vocab_size, (4, 65))
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with hooks, autocast(torch.device("cpu"), "bf16"):
        CausalLMLoss(model.get_base_model() if lora else model)(ids[:, :-1], ids[:, 1:]).sum()
    weight = torch.finfo(base_dtype).bits // 8
    eager = shape.kv_heads == shape.heads  # as plan_memory decides it on the CPU
    batch = BatchShape(4, 64, compute=2, weight=weight, autocast=True, eager_scores=eager)
    adapters = lora_adapters(shape, 8, list(shape.linears), 0.05) if lora else None
    load = "float32" if weight == 4 else "auto"
    plan = plan_memory(cfg, model=family, batch_size=4, block_size=64, precision="bf16",
                       load_dtype=load)  # fmt: skip
    scenario = plan.scenarios["lora" if lora else "full"]
    copies = scenario.weight_copies // shape.layers  # the plan's, for one layer
    by_hand = [(8 * (i + o) if lora else 0) + (i * o if weight == 4 else 0)
               for i, o in shape.linears.values()]  # fmt: skip
    assert copies == 2 * sum(by_hand)
    planned = layer_activations(shape, batch, adapters) + copies
    assert planned == pytest.approx(sum(saved.values()), rel=0.03)


def test_plan_against_measured_peaks_on_the_cpu(tmp_path):
    """benchmarks/memory_peak.py on five rows (full bf16, LoRA fp32, LoRA bf16 with
    checkpointing, GPT-2 124M at 1 x 64 tokens, whose peak is the end of the backward, where
    the tied head's two gradients are added, and a small Gemma 2, whose soft-capped logits take
    the full-logits loss the plan took for the chunked one: 0.40x the measured peak), each
    trained 4 steps in its own process: the plan's
    peak within 6% of the measured peak of live tensor bytes (the issue asks 15%; 6% catches a
    missing tied-head sum, -13%), and the process bound the CPU fit check uses at or above the
    measured resident peak (docs/memory.md)."""
    out = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "memory_peak.py"), "--only",
         "1,10,12,19,20", "--json", str(out)],
        check=True, capture_output=True, env=env, timeout=300,
    )  # fmt: skip
    rows = json.loads(out.read_text())
    assert [(r["lora"], r["precision"], r["ckpt"], r["batch"]) for r in rows] == [
        (False, "bf16", False, 8), (True, "fp32", False, 8), (True, "bf16", True, 8),
        (False, "fp32", True, 1), (False, "bf16", False, 8),
    ]  # fmt: skip
    for row in rows:
        assert 0.94 <= row["plan_peak"] / row["tensor_peak"] <= 1.06, row
        assert row["rss_peak"] <= row["plan_process_bound"], row


@pytest.mark.parametrize(("batch", "accum"), [(16, 3), (15, 1)])
def test_the_flags_that_fit_keep_the_blocks_per_step(batch: int, accum: int) -> None:
    """Smaller micro-batches come with the --grad-accum that keeps --batch-size x --grad-accum
    blocks per step (docs/memory.md): 16 x 3 is not told 8 x 2, nor 15 x 1 told 7 x 3."""
    import re

    from domainlm.model.memory import HEADROOM, fitting_flags

    cfg = scratch_config("tiny")
    plan_at = lambda b: plan_memory(  # noqa: E731
        cfg, model="scratch:tiny", batch_size=b, block_size=256, precision="fp32", device="cpu"
    )
    plan = plan_at(batch)
    smallest = min(t.fit_bytes for t in plan.scenarios.values())
    plan.available = int(smallest / HEADROOM) - 1  # no way fits at this micro-batch
    answer = fitting_flags(plan, plan_at, accum)
    found = re.search(r"--batch-size (\d+) --grad-accum (\d+)", answer)
    assert found, answer
    micro, steps = int(found[1]), int(found[2])
    assert micro < batch and micro * steps == batch * accum, answer
    # the largest micro-batch that divides the blocks per step and fits some way
    fits = lambda b: any(  # noqa: E731
        t.fit_bytes <= HEADROOM * plan.available for t in plan_at(b).scenarios.values()
    )
    assert fits(micro)
    assert not any(fits(b) for b in range(micro + 1, batch + 1) if batch * accum % b == 0)


def test_the_cpu_fit_check_asks_for_the_process_bound_not_the_tensor_peak():
    """On the CPU a way to train fits when its process bound (tensors + the allocator's
    fragmentation + the runtime) fits, not its tensor peak alone; on a GPU the tensor peak."""
    from domainlm.model.memory import HEADROOM, fitting_flags

    cfg = scratch_config("tiny")
    plan = plan_memory(cfg, model="scratch:tiny", batch_size=8, block_size=256,
                       precision="bf16", device="cpu")  # fmt: skip
    full = plan.scenarios["full"]
    assert full.fit_bytes > full.peak + (full.peak - full.weights - full.optimizer)
    replan = lambda batch: plan_memory(  # noqa: E731
        cfg, model="scratch:tiny", batch_size=batch, block_size=256, precision="bf16", device="cpu"
    )
    plan.available = int(full.peak / HEADROOM) + 1  # the tensors fit, the process does not
    assert fitting_flags(plan, replan) != "as it is"
    plan.available = int(full.fit_bytes / HEADROOM) + 1
    assert fitting_flags(plan, replan) == "as it is"
    gpu = plan_memory(cfg, model="scratch:tiny", batch_size=8, block_size=256,
                      precision="bf16", device="cuda")  # fmt: skip
    assert all(t.fit_bytes == t.peak for t in gpu.scenarios.values())


def test_a_run_that_will_not_fit_is_told_before_the_weights_load(
    tmp_path, tiny_model_dir, monkeypatch, capsys, weight_reads
):
    """Train checks the memory plan of its settings against the memory free before it loads the
    weights: too little is one warning naming the need, the memory free and the flags that fit
    (the run goes on), or with --strict exit 2 before anything is loaded or written. The need is
    the plan's full fine-tuning row, the one `inspect --model M` prints for the same settings."""
    import domainlm.model.memory as memory

    train_file = write_lines(tmp_path / "train.txt", uneven_corpus(30, seed=2))
    shape = ["--block-size", "32", "--batch-size", "4", "--precision", "fp32"]
    assert main(["inspect", "--model", str(tiny_model_dir), "--json", *shape]) == 0
    plan = json.loads(capsys.readouterr().out)["memory_plan"]
    need = plan["scenarios"]["full"]["fit_bytes"]
    free = need  # short of the 10% headroom: does not fit
    monkeypatch.setattr(memory, "available_bytes", lambda device: free)
    loads = weight_reads  # the weights read (conftest.py)
    argv = ["train", "--model", str(tiny_model_dir), "--train-file", str(train_file),
            "--max-steps", "1", "--quiet", *shape]  # fmt: skip
    assert main(["inspect", "--model", str(tiny_model_dir), "--json", *shape]) == 0
    fits = json.loads(capsys.readouterr().out)["fits"]  # inspect's answer, same memory free
    out = tmp_path / "strict"
    assert main([*argv, "--output-dir", str(out), "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert f"needs about {need / 1024**3:.1f} GiB of system RAM (full fine-tuning" in err[0]
    assert f"and {free / 1024**3:.1f} GiB are free for it" in err[0]
    assert (
        f"fits with: {fits} (" in err[0] and "--strict: stopped before loading the model" in err[0]
    )
    assert not out.exists() and loads == []  # nothing written, no weights read
    out = tmp_path / "warned"
    assert main([*argv, "--output-dir", str(out)]) == 0  # advice: the run goes on
    warnings = [line for line in capsys.readouterr().err.splitlines() if "memory:" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: memory: this run needs")
    assert (out / "model.safetensors").is_file() and len(loads) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on this machine share its RAM
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1.5 * need)
    assert main([*argv, "--output-dir", str(tmp_path / "two"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "per process (2 on this machine)" in err
    assert f"and {0.75 * need / 1024**3:.1f} GiB are free for it" in err
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # one process, 1.5x its need free: fits, no word
    assert main([*argv, "--output-dir", str(tmp_path / "fits")]) == 0
    assert "memory:" not in capsys.readouterr().err
