"""LoRA (issue 15 item 1): adapters on a frozen base, peft's adapter folder, the merged folder,
resume, adapter folders as --model, DDP, and the settings that are refused.

References here do not call the code under test: a fresh load of the base folder, peft's own
`PeftModel.from_pretrained`, transformers' own `from_pretrained`, and the merged weights
recomputed by hand as W + alpha / r * B @ A from the adapter file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ModuleTemp, uneven_corpus, write_lines
from safetensors.torch import load_file

from domainlm import TrainConfig, train
from domainlm.cli import main
from domainlm.errors import TrainingAborted, UserError
from domainlm.model.loading import gpt2_tokenizer
from domainlm.model.lora import LoraSettings, attach_lora, target_modules
from domainlm.model.loss import CausalLMLoss
from domainlm.run import guard

GPT2_TARGETS = ["c_attn", "c_fc", "c_proj"]  # attention in/out, MLP in/out (c_proj: both)
LLAMA_TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def corpus(module_tmp: ModuleTemp) -> tuple[Path, Path]:
    root = module_tmp.mktemp("lora-data")
    docs = uneven_corpus(50, seed=3)
    return write_lines(root / "train.txt", docs[:42]), write_lines(root / "valid.txt", docs[42:])


@pytest.fixture(scope="module")
def llama_dir(module_tmp: ModuleTemp) -> Path:
    """A tiny random-init Llama (2 layers, 64 wide) with GPT-2's tokenizer, saved as a folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = module_tmp.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=50257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=50256, eos_token_id=50256,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    gpt2_tokenizer().save_pretrained(folder)
    return folder


def config(model: Path | str, corpus: tuple[Path, Path], out: Path, **kw: object) -> TrainConfig:
    values: dict[str, object] = dict(
        model=str(model), train_file=str(corpus[0]), validation_file=str(corpus[1]),
        output_dir=str(out), block_size=32, batch_size=2, grad_accum=2, lr=1e-2, max_steps=6,
        save_steps=3, eval_steps=100, logging_steps=1, precision="fp32", quiet=True, lora=True,
    )  # fmt: skip
    values.update(kw)
    return TrainConfig(**values)


def load_base(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir: Path, corpus: tuple[Path, Path], module_tmp: ModuleTemp) -> dict:
    """A LoRA run on tiny GPT-2 (fp32), with the trained in-memory model captured at the end."""
    import domainlm.run.train as train_module

    captured: dict = {}
    real_save = train_module.save_model_folder

    def capturing_save(run, *args):  # type: ignore[no-untyped-def]
        captured["model"] = run.net.model
        return real_save(run, *args)

    out = module_tmp.mktemp("lora-run") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "save_model_folder", capturing_save)
        result = train(config(tiny_model_dir, corpus, out, sample_prompts=["the"], sample_every=3))
    return {"out": out, "model": captured["model"], "result": result}


# ----------------------------------------------------------------------------- target layers


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_default_targets_are_the_block_linears_and_only_adapters_get_gradients(
    family: str, tiny_model_dir: Path, llama_dir: Path
) -> None:
    base = load_base(tiny_model_dir if family == "gpt2" else llama_dir)
    expected = GPT2_TARGETS if family == "gpt2" else LLAMA_TARGETS
    assert target_modules(base, None) == expected
    head = base.get_output_embeddings()
    peft_model = attach_lora(base, LoraSettings(r=4), seed=0, base_name="x")
    inner = peft_model.get_base_model()
    assert inner.get_output_embeddings() is head and type(head) is torch.nn.Linear  # not adapted
    adapted = {n.rsplit(".", 2)[0] for n, _ in inner.named_parameters() if "lora_A" in n}
    assert len(adapted) == 2 * (4 if family == "gpt2" else 7)  # every block linear, both layers
    ids = torch.randint(0, 50257, (2, 16))
    targets = torch.roll(ids, -1, dims=1)
    CausalLMLoss(inner)(ids, targets).sum().backward()
    with_grad = {n for n, p in inner.named_parameters() if p.grad is not None}
    lora_params = {n for n, p in inner.named_parameters() if "lora_" in n}
    assert with_grad == lora_params and lora_params
    assert all(not p.requires_grad for n, p in inner.named_parameters() if "lora_" not in n)


# ----------------------------------------------------------------------------- a run


def test_only_the_adapters_change_and_the_checkpoints_hold_only_them(
    lora_run: dict, tiny_model_dir: Path
) -> None:
    out, trained = lora_run["out"], lora_run["model"].get_base_model()
    fresh = dict(load_base(tiny_model_dir).named_parameters())
    for name, param in trained.named_parameters():
        if "lora_" in name:
            continue
        plain = name.replace(".base_layer", "")
        assert torch.equal(param, fresh[plain]), name  # the base bit for bit
    lora_b = [p for n, p in trained.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # initialised to 0, then trained
    samples = (out / "samples.jsonl").read_text().splitlines()  # sampled while training
    assert [json.loads(row)["step"] for row in samples] == [3, 6]
    n_adapter = sum(1 for n, _ in trained.named_parameters() if "lora_" in n)
    base_bytes = (tiny_model_dir / "model.safetensors").stat().st_size
    for folder in (out, out / "checkpoint-3", out / "checkpoint-6"):
        assert not (folder / "model.safetensors").exists()
        adapter = load_file(folder / "adapter_model.safetensors")
        assert len(adapter) == n_adapter and all("lora_" in k for k in adapter)
        assert (folder / "adapter_model.safetensors").stat().st_size < base_bytes / 20
    state = torch.load(out / "checkpoint-6" / "training_state.pt", weights_only=True)
    assert len(state["optimizer"]["state"]) == n_adapter  # AdamW state of the adapters only
    identity = json.loads((out / "run_config.json").read_text())["identity"]
    assert identity["lora"] == {"r": 8, "alpha": 16.0, "dropout": 0.05, "targets": GPT2_TARGETS}


def test_adapter_loads_with_peft_and_the_merged_folder_alone_gives_its_logits(
    lora_run: dict, tiny_model_dir: Path
) -> None:
    from peft import PeftModel

    out = lora_run["out"]
    peft_model = PeftModel.from_pretrained(load_base(tiny_model_dir), out).eval()
    merged = load_base(out / "merged")  # transformers alone
    ids = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = peft_model(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(load_base(tiny_model_dir)(input_ids=ids).logits, expected, atol=1e-3)
    # The merge by hand: W + alpha / r * (B @ A), transposed for GPT-2's Conv1D (in x out).
    adapter, base = load_file(out / "adapter_model.safetensors"), load_base(tiny_model_dir)
    prefix = "base_model.model.transformer.h.0.attn.c_attn"
    delta = adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"]
    by_hand = base.transformer.h[0].attn.c_attn.weight + 16.0 / 8 * delta.T
    assert torch.allclose(merged.transformer.h[0].attn.c_attn.weight, by_hand, atol=1e-6)
    assert torch.equal(merged.transformer.wte.weight, base.transformer.wte.weight)


def test_perplexity_and_generate_on_the_adapter_folder_equal_the_merged_folder(
    lora_run: dict, corpus: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = lora_run["out"]
    scores = {}
    for model in (out, out / "merged", out / "checkpoint-6"):
        argv = ["perplexity", "--model", str(model), "--file", str(corpus[1]), "--block-size",
                "32", "--stride", "31", "--precision", "fp32", "--quiet", "--json"]  # fmt: skip
        assert main(argv) == 0
        scores[model] = json.loads(capsys.readouterr().out)
    adapter, merged = scores[out], scores[out / "merged"]
    assert adapter["tokens"] == merged["tokens"] > 0
    assert adapter["perplexity"] == pytest.approx(merged["perplexity"], rel=1e-5)
    assert scores[out / "checkpoint-6"]["perplexity"] == adapter["perplexity"]
    # The run's own final validation (in memory, same windows) is the adapter folder's figure.
    assert adapter["perplexity"] == pytest.approx(lora_run["result"].final_perplexity, rel=1e-5)
    texts = []
    for model in (out, out / "merged"):
        argv = ["generate", "--model", str(model), "--prompt", "the", "--max-new-tokens", "8",
                "--temperature", "0", "--json"]  # fmt: skip
        assert main(argv) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1]


def test_a_finished_lora_run_started_again_does_nothing(
    lora_run: dict, tiny_model_dir: Path, corpus: tuple[Path, Path], capsys, weight_reads
) -> None:
    """The same command on a finished LoRA run: no base weights read, no evaluation, no adapter
    saved, no merge."""
    out = lora_run["out"]
    written = [out / "adapter_model.safetensors", out / "merged" / "model.safetensors"]
    stamps = [p.stat().st_mtime_ns for p in written]
    capsys.readouterr()
    again = train(config(tiny_model_dir, corpus, out, sample_prompts=["the"], sample_every=3))
    assert "nothing to do" in capsys.readouterr().err
    assert again.final_perplexity == lora_run["result"].final_perplexity
    assert [p.stat().st_mtime_ns for p in written] == stamps
    assert weight_reads == []


def test_report_on_a_lora_run_and_no_merge(
    lora_run: dict, tiny_model_dir: Path, corpus: tuple[Path, Path], tmp_path: Path
) -> None:
    assert main(["report", str(lora_run["out"]), "--output", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "report.html").is_file()
    card = (lora_run["out"] / "README.md").read_text()
    assert "domainlm" in card  # our model card, not peft's
    out = tmp_path / "unmerged"
    assert main(["train", "--model", str(tiny_model_dir), "--train-file", str(corpus[0]),
                 "--output-dir", str(out), "--lora", "--no-merge", "--max-steps", "1",
                 "--block-size", "32", "--quiet"]) == 0  # fmt: skip
    assert (out / "adapter_config.json").is_file() and not (out / "merged").exists()


def test_a_merge_that_no_longer_matches_goes_and_a_users_file_stays(
    tiny_model_dir: Path, corpus: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    """Continued with --no-merge, a run's merged/ of an earlier step is removed (it no longer
    matches the adapter) unless it holds a file domainlm did not write; --overwrite-output-dir
    refuses a user's file inside merged/ or a checkpoint rather than deleting it with them."""
    out = tmp_path / "run"
    train(config(tiny_model_dir, corpus, out, max_steps=3))
    assert (out / "merged" / "model.safetensors").is_file()
    capsys.readouterr()
    train(config(tiny_model_dir, corpus, out, max_steps=4, merge=False, quiet=False))
    assert f"removed {out / 'merged'}: an earlier command's merge" in capsys.readouterr().err
    assert not (out / "merged").exists() and (out / "adapter_model.safetensors").is_file()

    train(config(tiny_model_dir, corpus, out, max_steps=5))  # merges again
    gguf, notes = out / "merged" / "model-q4.gguf", out / "checkpoint-3" / "NOTES.md"
    gguf.write_bytes(b"GGUF")
    notes.write_text("step 3 looked best\n")
    capsys.readouterr()
    overwrite = config(tiny_model_dir, corpus, out, max_steps=2, overwrite_output_dir=True)
    with pytest.raises(UserError, match="holds checkpoint-3/NOTES.md, merged/model-q4.gguf, which"):
        train(overwrite)
    assert gguf.read_bytes() == b"GGUF" and (out / "merged" / "model.safetensors").is_file()
    train(config(tiny_model_dir, corpus, out, max_steps=6, merge=False, quiet=False))
    assert "left in place for merged/model-q4.gguf" in capsys.readouterr().err
    assert gguf.is_file() and notes.is_file()
    gguf.unlink()
    notes.unlink()
    train(overwrite)  # only domainlm's files there now: replaced
    assert not (out / "checkpoint-3").exists() and not (out / "checkpoint-6").exists()
    assert (
        sorted(p.name for p in (out / "merged").iterdir())
        == json.loads((out / "run_config.json").read_text())["merged_files"]
    )


def test_llama_lora_run_merges_to_the_same_logits(
    llama_dir: Path, corpus: tuple[Path, Path], tmp_path: Path
) -> None:
    from peft import PeftModel

    out = tmp_path / "llama"
    train(config(llama_dir, corpus, out, max_steps=2, save_steps=2, lora_r=4, precision="bf16"))
    peft_model = PeftModel.from_pretrained(load_base(llama_dir), out).eval()
    ids = torch.randint(0, 50257, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        got = load_base(out / "merged")(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


# ----------------------------------------------------------------------------- resume


def stop_after_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """SIGTERM this process after `step` (the run's own graceful stop: it saves that step)."""
    calls = iter(range(1, 10_000))

    def delay() -> None:
        if next(calls) == step:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(guard, "step_delay", delay)


def test_a_stopped_and_resumed_bf16_run_is_bit_identical(
    tiny_model_dir: Path, corpus: tuple[Path, Path], tmp_path: Path, monkeypatch
) -> None:
    from domainlm.run.metrics import read_events

    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    train(config(tiny_model_dir, corpus, reference, precision="bf16", merge=False))
    with monkeypatch.context() as patch:
        stop_after_step(patch, 4)
        with pytest.raises(TrainingAborted, match="stopped after step 4"):
            train(config(tiny_model_dir, corpus, stopped, precision="bf16", merge=False))
    result = train(config(tiny_model_dir, corpus, stopped, precision="bf16", merge=False))
    assert result.resumed_from == stopped / "checkpoint-4"
    a = load_file(reference / "adapter_model.safetensors")
    b = load_file(stopped / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def rows(out: Path) -> list[dict]:
        return [{k: v for k, v in e.items() if k != "tokens_per_s"}
                for e in read_events(out / "metrics.jsonl")]  # fmt: skip

    assert rows(stopped) == rows(reference)


# ----------------------------------------------------------------------------- refused


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--lora-r", "4"], "--lora-r needs --lora"),
        (["--lora", "--lora-r", "0"], "--lora-r must be a positive"),
        (["--lora", "--lora-dropout", "1"], "--lora-dropout must be"),
        (["--no-merge"], "--no-merge needs --lora"),
        (["--lora", "--lora-targets", "nope"], "matches no linear layer"),
        (["--lora", "--lora-targets", "lm_head"], "LM head"),
        (["--lora", "--lora-quantization", "4bit"], "QLoRA"),
        (["--lora", "--lora-quantization", "8bit"], "'8bit' is not a quantization domainlm knows"),
        (["--lora", "--strategy", "fsdp"], "fsdp"),
        (["--lora", "--checkpoint-format", "sharded"], "--checkpoint-format sharded"),
    ],
)
def test_bad_lora_settings_are_one_line_and_write_nothing(
    flags: list[str], expected: str, tiny_model_dir: Path, corpus, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    argv = ["train", "--model", str(tiny_model_dir), "--train-file", str(corpus[0]),
            "--output-dir", str(out), *flags]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_a_checkpoint_without_an_adapter_is_one_line_on_resume(tmp_path: Path) -> None:
    """A LoRA run's sharded checkpoint (written before --checkpoint-format sharded was refused
    with --lora) holds no adapter file: continuing from it is a UserError naming what to do,
    not a FileNotFoundError traceback."""
    from domainlm.model.lora import load_adapter_weights

    (tmp_path / "checkpoint-4").mkdir()
    with pytest.raises(UserError, match="holds no adapter .* resume from another checkpoint"):
        load_adapter_weights(None, tmp_path / "checkpoint-4")


def test_a_rank_above_a_layers_width_is_warned_of(
    tiny_model_dir: Path, corpus: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    """--lora-r 100 on layers 64 wide (tiny GPT-2's c_attn: 64 -> 192): the update's rank can be
    at most 64, the rest is parameters and time for nothing; r=64 is not warned of."""
    for r, warned in ((100, True), (64, False)):
        train(config(tiny_model_dir, corpus, tmp_path / f"r{r}", max_steps=1, merge=False,
                     lora_r=r, lora_targets=["c_attn"]))  # fmt: skip
        err = capsys.readouterr().err
        said = f"warning: --lora-r {r} is more than the width of the narrowest layer it adapts (64)"
        assert (said in err) is warned, err


def test_inspect_warns_of_the_rank_train_warns_of(tiny_model_dir: Path, capsys) -> None:
    """`inspect --model M` plans --lora-r 100 on 64-wide layers with train's warning; r=64 without."""
    for r, warned in (("100", True), ("64", False)):
        assert main(["inspect", "--model", str(tiny_model_dir), "--lora-r", r,
                     "--lora-targets", "c_attn"]) == 0  # fmt: skip
        out = capsys.readouterr().out
        said = f"warning: --lora-r {r} is more than the width of the narrowest layer it adapts (64)"
        assert (said in out) is warned, out


def test_an_unknown_target_lists_the_layers_lora_can_adapt(tiny_model_dir: Path) -> None:
    """Not the LM head, which `--lora-targets lm_head` is refused for."""
    from domainlm.errors import UserError

    with pytest.raises(UserError) as caught:
        target_modules(load_base(tiny_model_dir), ("nope",))
    assert str(caught.value).endswith("the layers LoRA can adapt are named c_attn, c_fc, c_proj")


def test_lora_without_peft_names_the_extra(
    tiny_model_dir: Path, corpus, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    out = tmp_path / "out"
    argv = ["train", "--model", str(tiny_model_dir), "--train-file", str(corpus[0]),
            "--output-dir", str(out), "--lora"]  # fmt: skip
    assert main(argv) == 2
    assert "pip install 'domainlm[lora]'" in capsys.readouterr().err
    assert not out.exists()


def test_changing_lora_settings_on_resume_is_refused(
    lora_run: dict, tiny_model_dir: Path, corpus, tmp_path: Path, capsys
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(lora_run["out"], copy)
    before = sorted(p.name for p in copy.iterdir())
    base = ["train", "--model", str(tiny_model_dir), "--train-file", str(corpus[0]),
            "--validation-file", str(corpus[1]), "--output-dir", str(copy), "--block-size", "32",
            "--max-steps", "8"]  # fmt: skip
    was = (
        "--lora --lora-r 8 --lora-alpha 16.0 --lora-dropout 0.05 --lora-targets c_attn c_fc c_proj"
    )
    for flags, now in (
        (["--lora", "--lora-r", "4"], "--lora --lora-r 4 --lora-alpha 16.0"),
        (["--lora", "--lora-targets", "c_attn"], "--lora-dropout 0.05 --lora-targets c_attn;"),
        ([], "this command has no --lora;"),
    ):
        assert main([*base, *flags]) == 2
        err = capsys.readouterr().err
        assert f"belongs to a run trained with {was}, and this command has" in err
        assert now in err and f"to continue that run give {was} again" in err
    assert sorted(p.name for p in copy.iterdir()) == before


def test_a_resume_reads_the_same_base_however_it_is_spelled_and_refuses_other_weights(
    tiny_model_dir: Path, corpus, tmp_path: Path, capsys, monkeypatch
) -> None:
    """The base is read again on resume: `./base/` for `base` goes on; the same folder holding
    other weights (a base trained further, saved over) is refused, nothing written."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--train-file", str(corpus[0]), "--validation-file", str(corpus[1]),
            "--output-dir", "run", "--block-size", "32", "--lora", "--no-merge", "--quiet"]  # fmt: skip
    assert main([*argv, "--model", "base", "--max-steps", "2"]) == 0
    assert main([*argv, "--model", "./base/", "--max-steps", "3"]) == 0, capsys.readouterr().err
    assert "resuming from" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["finished"]["step"] == 3

    other = load_base(base)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.01)
    other.save_pretrained(base)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()}
    assert main([*argv, "--model", "base", "--max-steps", "4"]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("domainlm:")]
    assert line.startswith("domainlm: error: --output-dir run belongs to a LoRA run whose base ")
    assert "weights were other than those in base now" in line
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()} == before


# ----------------------------------------------------------------------------- DDP


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_two_ddp_ranks_train_the_adapter_as_one_rank_with_accumulation(
    tiny_model_dir: Path, corpus: tuple[Path, Path], tmp_path: Path
) -> None:
    """torchrun, 2 processes over gloo, batch 2 each == one process, batch 2 x 2 accumulated."""
    single = tmp_path / "single"
    train(config(tiny_model_dir, corpus, single, max_steps=3, merge=False, lora_dropout=0.0))
    ddp = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master-port={free_port()}", "-m", "domainlm", "train", "--model", str(tiny_model_dir),
           "--train-file", str(corpus[0]), "--validation-file", str(corpus[1]), "--output-dir",
           str(ddp), "--block-size", "32", "--batch-size", "2", "--lr", "1e-2", "--max-steps", "3",
           "--save-steps", "3", "--eval-steps", "100", "--precision", "fp32", "--quiet",
           "--lora", "--lora-dropout", "0", "--no-merge"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 ranks = 4 blocks" in proc.stdout + proc.stderr
    a = load_file(ddp / "adapter_model.safetensors")
    b = load_file(single / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    # Adam divides by |gradient|: the rounding of a near-zero gradient element can move it by up
    # to 1e-4 after 3 steps of lr 1e-2; a gradient not synchronised moves the adapters by ~lr.
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a])
    ref = torch.cat([b[k].flatten() for k in a])
    assert (diff.norm() / ref.norm()).item() < 1e-4
    assert diff.abs().max().item() < 1e-4


# ----------------------------------------------------------------------------- disk space


def du(path: Path) -> int:
    """Bytes of the files under `path` (os.walk; not the code under test)."""
    return sum(os.path.getsize(Path(r) / f) for r, _, files in os.walk(path) for f in files)


def test_the_disk_estimate_counts_the_adapter_and_the_merged_folder(lora_run: dict) -> None:
    """A LoRA checkpoint holds the adapter, not the frozen base, and the final folder adds
    merged/ (the base in float32 with the adapter folded in): the disk check before training
    (--strict refuses a run on this figure) must say so, or it refuses LoRA runs that fit."""
    from transformers import AutoTokenizer

    from domainlm.run.diskspace import estimate_checkpoint

    out = lora_run["out"]
    size = estimate_checkpoint(lora_run["model"], AutoTokenizer.from_pretrained(out), merge=True)
    checkpoint = out / "checkpoint-6"
    adapter = (checkpoint / "adapter_model.safetensors").stat().st_size
    assert abs(size.weights - adapter) / adapter < 0.02, (size.weights, adapter)
    assert abs(size.total - du(checkpoint)) / du(checkpoint) < 0.05, (size, du(checkpoint))
    merged = du(out / "merged")
    assert abs(size.merged - merged) / merged < 0.02, (size.merged, merged)
    final = sum(
        du(p) if p.is_dir() else p.stat().st_size
        for p in out.iterdir()
        if not p.name.startswith("checkpoint-") and p.name not in ("metrics.jsonl", "tensorboard")
    )
    assert abs(size.model_folder - final) / final < 0.10, (size.model_folder, final)


# ----------------------------------------------------------------------------- export, failures


def test_export_merges_an_adapter_checkpoint_into_a_plain_folder(
    lora_run: dict, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`domainlm export` on checkpoint-3 (not the final adapter): the base with that
    checkpoint's adapter folded in, by hand: W + alpha / r * (B @ A)."""
    checkpoint, out = lora_run["out"] / "checkpoint-3", tmp_path / "exported"
    assert main(["export", str(checkpoint), str(out)]) == 0
    exported = load_base(out)  # transformers alone
    adapter, base = load_file(checkpoint / "adapter_model.safetensors"), load_base(tiny_model_dir)
    prefix = "base_model.model.transformer.h.1.mlp.c_fc"
    delta = adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"]
    by_hand = base.transformer.h[1].mlp.c_fc.weight + 16.0 / 8 * delta.T
    assert torch.allclose(exported.transformer.h[1].mlp.c_fc.weight, by_hand, atol=1e-6)
    assert not torch.allclose(by_hand, base.transformer.h[1].mlp.c_fc.weight, atol=1e-4)
    assert (out / "tokenizer.json").is_file() and not (out / "adapter_config.json").exists()
    # the final folder of a run (no checkpoint marker) exports to its merged/ weights
    final = tmp_path / "final"
    assert main(["export", str(lora_run["out"]), str(final)]) == 0
    got, want = (
        load_file(final / "model.safetensors"),
        load_file(lora_run["out"] / "merged" / "model.safetensors"),
    )
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def adapter_copy(run: Path, folder: Path, tokenizer: bool = True) -> Path:
    """A LoRA run's adapter (config, weights, run settings; the tokenizer files if asked) alone."""
    folder.mkdir()
    names = ["adapter_config.json", "adapter_model.safetensors", "run_config.json"]
    if tokenizer:
        names += ["tokenizer.json", "tokenizer_config.json"]
    for name in names:
        shutil.copy(run / name, folder / name)
    return folder


def test_a_damaged_adapter_is_one_line_for_every_command(
    lora_run: dict, corpus: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A truncated adapter_model.safetensors (an interrupted copy): generate, perplexity, export
    and a resume each say so in one line, as for a damaged model, not with a traceback."""
    from domainlm.model.lora import load_adapter_weights

    damaged = adapter_copy(lora_run["out"], tmp_path / "damaged")
    weights = damaged / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    commands = [
        ["generate", "--model", str(damaged), "--prompt", "the", "--max-new-tokens", "2"],
        ["perplexity", "--model", str(damaged), "--file", str(corpus[1]), "--quiet"],
        ["export", str(damaged), str(tmp_path / "exported")],
    ]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0], (argv, err)
        assert f"could not read the weights of {weights}" in err[0], err
        assert "damaged or incomplete" in err[0]
    assert not (tmp_path / "exported").exists()
    with pytest.raises(UserError, match="damaged or incomplete"):
        load_adapter_weights(None, damaged)


def test_export_of_an_adapter_without_tokenizer_files_takes_its_bases(
    lora_run: dict, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """As generate and perplexity do: the adapter alone (no tokenizer files beside it) exports
    with its base's tokenizer, to the same weights as the run's merged/ folder."""
    from transformers import AutoTokenizer

    bare = adapter_copy(lora_run["out"], tmp_path / "bare", tokenizer=False)
    out = tmp_path / "exported"
    assert main(["export", str(bare), str(out)]) == 0
    got = load_file(out / "model.safetensors")
    want = load_file(lora_run["out"] / "merged" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    text = "the river, 42 times"
    base_ids = AutoTokenizer.from_pretrained(tiny_model_dir)(text).input_ids
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == base_ids


def test_an_adapter_whose_base_is_gone_names_where_the_base_came_from(
    lora_run: dict, corpus: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    orphan = tmp_path / "orphan"
    shutil.copytree(lora_run["out"] / "checkpoint-6", orphan)
    config_file = orphan / "adapter_config.json"
    settings = json.loads(config_file.read_text())
    settings["base_model_name_or_path"] = str(tmp_path / "gone")
    config_file.write_text(json.dumps(settings))
    assert main(["perplexity", "--model", str(orphan), "--file", str(corpus[1]), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert f"{orphan} is a LoRA adapter whose base model" in err[0]
    assert "base_model_name_or_path in its adapter_config.json" in err[0]
    config_file.write_text('{"base_model_name_or_path": "x",')  # cut short: not "names no base"
    assert main(["perplexity", "--model", str(orphan), "--file", str(corpus[1]), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{config_file} is not valid JSON" in err[0], err


def test_an_adapter_whose_base_folder_now_holds_other_weights_is_warned_of(
    tiny_model_dir: Path, corpus: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    """The base folder replaced after the run (other weights, same names): perplexity and export
    still run, but say that the adapter is applied to weights it did not learn on (they said
    nothing, and gave other figures than the run's); the base as trained: no warning."""
    from domainlm.model.loading import save_scratch_folder

    base, out = tmp_path / "base", tmp_path / "run"
    shutil.copytree(tiny_model_dir, base)
    train(config(base, corpus, out, max_steps=1, save_steps=1, merge=False))
    score = ["perplexity", "--model", str(out), "--file", str(corpus[1]), "--quiet"]
    capsys.readouterr()
    assert main(score) == 0
    assert "warning" not in capsys.readouterr().err
    save_scratch_folder("tiny", tmp_path / "other", seed=5)
    shutil.copy(tmp_path / "other" / "model.safetensors", base / "model.safetensors")
    for argv in (score, ["export", str(out / "checkpoint-1"), str(tmp_path / "exported")]):
        assert main(argv) == 0
        err = capsys.readouterr().err
        assert f"warning: the base model {base} holds other weights than the run that" in err
        assert "give the base it was trained on" in err


def test_an_adapter_run_on_a_scratch_base_scores_and_inspects_as_its_base(
    corpus: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A scratch:NAME base is random weights from the run's seed (run_config.json, beside the
    adapter or one folder up): with any other seed the adapter sits on another model. The run's
    own final validation, in memory, is the reference."""
    out = tmp_path / "scratch-lora"
    result = train(TrainConfig(
        model="scratch:tiny", train_file=str(corpus[0]), validation_file=str(corpus[1]),
        output_dir=str(out), lora=True, merge=False, seed=7, max_steps=2, block_size=32,
        batch_size=2, precision="fp32", quiet=True,
    ))  # fmt: skip
    for model in (out, out / "checkpoint-2"):
        argv = ["perplexity", "--model", str(model), "--file", str(corpus[1]), "--block-size",
                "32", "--stride", "31", "--precision", "fp32", "--quiet", "--json"]  # fmt: skip
        assert main(argv) == 0
        score = json.loads(capsys.readouterr().out)["perplexity"]
        assert score == pytest.approx(result.final_perplexity, rel=1e-6)
    orphan = tmp_path / "orphan"  # the adapter alone: no run file says the seed
    shutil.copytree(out / "checkpoint-2", orphan)
    assert main(["perplexity", "--model", str(orphan), "--file", str(corpus[1]), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no run_config.json beside it says the seed" in err[0], err
    # `inspect` on the adapter run: the base's shape, at the run's block and batch size
    from domainlm.model.loading import build_scratch_model

    assert main(["inspect", "--model", str(out), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["memory_plan"]
    params = sum(p.numel() for p in build_scratch_model("tiny").parameters())
    assert (plan["shape"]["params"], plan["block_size"], plan["batch_size"]) == (params, 32, 2)
    argv = ["inspect", "--model", str(out), "--train-file", str(corpus[0]), "--time-steps", "1",
            "--json"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["time"]["seconds_per_step"] > 0
    # `train --model` on it: one line saying what it is and what to give instead
    argv = ["train", "--model", str(out), "--train-file", str(corpus[0]), "--output-dir",
            str(tmp_path / "on"), "--max-steps", "1"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{out} is a LoRA adapter folder, not a model" in err[0], err
    assert f"domainlm export {out} MERGED" in err[0] and not (tmp_path / "on").exists()


def test_out_of_memory_while_merging_is_one_line_and_keeps_the_run(
    tiny_model_dir: Path, corpus: tuple[Path, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The merge needs a float32 copy of the base after training: where that allocation fails
    (here peft's merge raises what a failed CPU allocation raises), the run stops with one line
    naming `domainlm export`, the adapter, results and report written, and no merged/ left."""
    from peft.tuners.lora import LoraModel

    def no_memory(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 411420968 bytes.")  # fmt: skip

    monkeypatch.setattr(LoraModel, "merge_and_unload", no_memory)
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_model_dir), "--train-file", str(corpus[0]),
            "--validation-file", str(corpus[1]), "--output-dir", str(out), "--lora",
            "--max-steps", "2", "--block-size", "32", "--quiet"]  # fmt: skip
    assert main(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("domainlm:")]
    assert len(err) == 1 and err[0].startswith("domainlm: stopped: out of memory while merging")
    assert f"`domainlm export {out} OUT`" in err[0] and "--no-merge" in err[0]
    assert (out / "adapter_model.safetensors").is_file() and not (out / "merged").exists()
    assert (out / "eval_results.json").is_file() and (out / "report.html").is_file()
    monkeypatch.undo()
    assert main(["export", str(out), str(tmp_path / "later")]) == 0  # the way out it names
    assert (tmp_path / "later" / "model.safetensors").is_file()


def test_the_memory_plan_counts_the_merge_and_says_when_it_does_not_fit(lora_run: dict) -> None:
    """`inspect`'s plan holds the --merge step: the merged model's float32 bytes (what
    lora.load_merged builds, measured on the run's merged/ folder) beside the run's weights in
    system RAM; where that is more than the RAM free, the flags that fit add --no-merge."""
    from dataclasses import replace

    from transformers import AutoConfig

    from domainlm.model.memory import fitting_flags, plan_memory

    out = lora_run["out"]
    merged = load_base(out / "merged")
    merged_bytes = sum(p.numel() * p.element_size() for p in merged.parameters())
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    plan = plan_memory(AutoConfig.from_pretrained(out / "merged"), model="m", batch_size=2,
                       block_size=32, precision="fp32", device="cpu")  # fmt: skip
    assert plan.merge_bytes - plan.scenarios["lora"].weights == merged_bytes
    # LoRA is the answer (full fine-tuning made not to fit), and the merge does not fit
    tight = replace(
        plan, available=plan.scenarios["lora"].fit_bytes * 2, host_available=merged_bytes
    )
    tight.scenarios = {**plan.scenarios, "full": replace(plan.scenarios["full"], fit_bytes=2**50),
                       "full+ckpt": replace(plan.scenarios["full+ckpt"], fit_bytes=2**50)}  # fmt: skip
    assert fitting_flags(tight, lambda b: tight).startswith("--lora --no-merge (merging at the end")
    assert fitting_flags(replace(tight, host_available=2**40), lambda b: tight) == "--lora"


def test_inspect_and_the_card_tell_a_lora_run_by_its_own_adapters(
    tiny_model_dir: Path, corpus: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    """`inspect --model RUN` of a LoRA run at r=4 on c_attn alone plans that, not the default
    r=8 on every block linear; a flag given still wins. Its model card says it is an adapter,
    with what settings and how it loads, and what `--precision auto` resolved to; the start
    line counts its few trainable parameters as they are, not as 0.00M."""
    out = tmp_path / "run"
    train(config(tiny_model_dir, corpus, out, max_steps=1, lora_r=4, lora_targets=["c_attn"],
                 lora_dropout=0.0, merge=False, precision="auto"))  # fmt: skip
    assert re.search(r", LoRA: [1-9][0-9,]* trainable\n", capsys.readouterr().err)
    card = (out / "README.md").read_text()
    assert (
        f"A LoRA adapter for `{tiny_model_dir}` trained with domainlm (r=4, alpha=16.0, "
        "dropout=0.0, on `c_attn`): this folder is the adapter in PEFT's format "
        f"(`PeftModel.from_pretrained`); `domainlm export {out} OUT` merges it into its base."
    ) in card
    resolved = json.loads((out / "run_config.json").read_text())["precision"]
    assert resolved in ("bf16", "fp32") and f"| precision | auto ({resolved}) |" in card
    assert main(["inspect", "--model", str(out), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["memory_plan"]
    assert (plan["lora_r"], plan["lora_targets"]) == (4, ["c_attn"])
    assert main(["inspect", "--model", str(out)]) == 0
    text = capsys.readouterr().out
    assert "--lora-r 4, --lora-dropout 0.0 and --lora-targets c_attn" in text
    assert main(["inspect", "--model", str(out), "--lora-r", "16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["memory_plan"]["lora_r"] == 16
    # the adapter alone, copied without its run's files: its adapter_config.json says the same
    alone = tmp_path / "alone"
    alone.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(out / name, alone / name)
    assert main(["inspect", "--model", str(alone), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["memory_plan"]
    assert (plan["lora_r"], plan["lora_targets"]) == (4, ["c_attn"])
    assert plan["trainable_lora"] == 2 * 4 * (64 + 3 * 64)  # 2 layers' c_attn, 64 -> 192
    assert main(["inspect", "--model", str(alone)]) == 0
    assert "planned at the adapter's --lora-r 4" in capsys.readouterr().out
    settings = json.loads((alone / "adapter_config.json").read_text())
    for key, value in (("r", "8"), ("r", True), ("lora_dropout", "x")):  # a TypeError traceback
        (alone / "adapter_config.json").write_text(json.dumps({**settings, key: value}))
        assert main(["inspect", "--model", str(alone)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"adapter_config.json: {key} is {value!r}, not a" in err[0], err
    # targets its base lacks: named as the adapter's, not as a --lora-targets the user never gave
    (alone / "adapter_config.json").write_text(
        json.dumps({**settings, "target_modules": ["q_proj"]})
    )
    assert main(["inspect", "--model", str(alone)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lora-targets q_proj matches no linear layer" in err[0], err
    assert "taken from the adapter's" in err[0] and "adapter_config.json" in err[0], err


def test_inspect_takes_the_lora_targets_train_takes(
    tiny_model_dir: Path, corpus: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    """`--lora-targets attn.c_proj` (a dotted suffix: the attention's output projection, not the
    MLP's c_proj) trains; `inspect` plans it with the trainable count the run had, from the flag
    and from the run's folder and checkpoint (whose adapter config names the full layer names),
    where it used to refuse them all ("no such linear layer")."""
    out = tmp_path / "run"
    from peft import PeftConfig

    train(config(tiny_model_dir, corpus, out, max_steps=1, save_steps=1, merge=False,
                 lora_targets=["attn.c_proj"]))  # fmt: skip
    assert "LoRA: 2,048 trainable" in capsys.readouterr().err

    adapted = PeftConfig.from_pretrained(out).target_modules
    assert sorted(adapted) == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
    by_hand = 2 * 8 * (64 + 64)  # two layers' attention output projection, 64 -> 64, r=8
    for argv in (
        ["inspect", "--model", str(tiny_model_dir), "--lora-targets", "attn.c_proj"],
        ["inspect", "--model", str(out)],
        ["inspect", "--model", str(out / "checkpoint-1")],
    ):
        assert main([*argv, "--json"]) == 0, capsys.readouterr().err
        assert json.loads(capsys.readouterr().out)["memory_plan"]["trainable_lora"] == by_hand


def test_train_on_a_merged_lora_run_names_its_merged_folder(
    lora_run: dict, corpus: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    """A LoRA run folder given to `train --model` names its merged/ when it has one (not an
    export that would write it again)."""
    out = lora_run["out"]
    argv = ["train", "--model", str(out), "--train-file", str(corpus[0]), "--output-dir",
            str(tmp_path / "on"), "--max-steps", "1"]  # fmt: skip
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.endswith(f"give its merged model ({out / 'merged'}), or its base model with --lora")
    assert not (tmp_path / "on").exists()
