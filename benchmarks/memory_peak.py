"""Measured peak training memory on the CPU against `domainlm inspect`'s plan (model/memory.py).

    PYTHONPATH=. python benchmarks/memory_peak.py [--quick | --lora-only | --fsdp] [--only 0,3]
        [--json out.json]

Each configuration runs in a fresh subprocess (the project's malloc settings, as `train()` sets
them): the model is built (random init) in the dtype a run loads it in (model/memory.py's
`load_dtype_for`: float32 for full fine-tuning, the precision's dtype for LoRA), then handed to
`run/train.py`'s own `build_model`, which a run calls: LoRA adapters attached by model/lora.py
(default targets, r=8, alpha 16, dropout 0.05) with `--lora`, fast kernels, gradient
checkpointing when asked, the chunked loss, fused AdamW over the trainable parameters. It is
trained for 4 steps of one micro-batch (forward under autocast, backward, clipping, update).
Two measures:

- tensors: the peak of live tensor bytes (every storage PyTorch allocates, followed from its
  creation to its release by a dispatch mode, in a third step; parameters and AdamW state
  counted from the start). This is what the plan models, and what CUDA's
  `max_memory_allocated` reports on a GPU.
- RSS: the process's peak resident memory (VmHWM) minus its resident memory after imports,
  before the model is built: what the machine must have, including the allocator's
  retained/fragmented blocks and library buffers. The plan's peak does not model them; its
  process bound (model/memory.py's `host_bound`, what `inspect`'s fit check uses on the CPU)
  is meant to stay above this.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

CONFIGS = [
    # name, model, precision, checkpointing, lora, batch, block[, --load-dtype (default auto)]
    ("tiny", "gpt2:tiny", "fp32", False, False, 8, 256),
    ("tiny", "gpt2:tiny", "bf16", False, False, 8, 256),
    ("mini", "gpt2:mini", "bf16", False, False, 8, 256),
    ("mini", "gpt2:mini", "bf16", True, False, 8, 256),
    ("llama-small", "llama", "fp32", False, False, 4, 256),
    ("llama-small", "llama", "bf16", False, False, 4, 256),
    ("llama-small", "llama", "bf16", True, False, 4, 256),
    ("124M", "gpt2:gpt2", "bf16", False, False, 4, 256),
    ("124M", "gpt2:gpt2", "bf16", True, False, 4, 256),
    ("124M", "gpt2:gpt2", "fp32", False, False, 4, 256),
    ("tiny", "gpt2:tiny", "fp32", False, True, 8, 256),
    ("mini", "gpt2:mini", "bf16", False, True, 8, 256),
    ("mini", "gpt2:mini", "bf16", True, True, 8, 256),
    ("llama-small", "llama", "bf16", False, True, 4, 256),
    ("llama-small", "llama", "bf16", True, True, 4, 256),
    ("124M", "gpt2:gpt2", "bf16", False, True, 4, 256),
    ("124M", "gpt2:gpt2", "bf16", True, True, 4, 256),
    ("llama-small", "llama", "bf16", False, True, 4, 256, "float32"),
    ("llama-small", "llama", "bf16", False, False, 4, 256, "bfloat16"),  # pure bf16
    # a small micro-batch: the end of the backward is the peak (a tied head's two gradients)
    ("124M", "gpt2:gpt2", "fp32", True, False, 1, 64),
    # Gemma 2's soft-capped logits: the loss takes the full (tokens, vocabulary) logits
    ("gemma2-small", "gemma2", "bf16", False, False, 8, 256),
    ("gemma2-small", "gemma2", "bf16", False, True, 8, 256),
]
# Under `--strategy fsdp` (--fsdp): full fine-tuning, sharded over 2 or 3 gloo ranks on this CPU.
# The small micro-batches (1 x 64) make the backward's moment the peak: the sharded gradients,
# the root's whole gradients and the layers gathered in the backward.
FSDP_CONFIGS = [
    # ranks, then the fields of CONFIGS
    (2, ("tiny", "gpt2:tiny", "fp32", False, False, 8, 256)),
    (2, ("mini", "gpt2:mini", "bf16", True, False, 8, 256)),
    (2, ("124M", "gpt2:gpt2", "fp32", False, False, 4, 256)),
    (2, ("124M", "gpt2:gpt2", "bf16", False, False, 4, 256)),
    (2, ("124M", "gpt2:gpt2", "bf16", True, False, 4, 256)),
    (2, ("124M", "gpt2:gpt2", "fp32", True, False, 1, 64)),
    (3, ("124M", "gpt2:gpt2", "fp32", True, False, 1, 64)),
    (2, ("llama-small", "llama", "bf16", False, False, 4, 256)),
    (2, ("llama-small", "llama", "fp32", True, False, 1, 64)),
    (3, ("llama-small", "llama", "bf16", True, False, 1, 64)),
    (2, ("llama-small", "llama", "bf16", True, False, 1, 64, "bfloat16")),  # pure bf16
]
RSS_STEPS = 4
QUICK = [c for c in CONFIGS if c[0] in ("tiny", "mini")]
LORA_ONLY = [c for c in CONFIGS if c[4]]


def model_config(spec: str):  # type: ignore[no-untyped-def]
    """The transformers config of a benchmark model: a scratch GPT-2 shape, a small Llama, or
    a small Gemma 2 (its logits soft-capped)."""
    if spec.startswith("gpt2:"):
        from domainlm.model.loading import scratch_config

        return scratch_config(spec.split(":", 1)[1])
    if spec == "gemma2":
        from transformers import Gemma2Config

        return Gemma2Config(
            vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            max_position_embeddings=1024, final_logit_softcapping=30.0,
        )  # fmt: skip
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
    )  # fmt: skip


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


class LiveTensorBytes:
    """A dispatch mode that follows every new CPU storage to its release; `peak` is the most
    bytes alive at once. Storages are known by their StorageImpl (`_cdata`, stable while FSDP
    resizes one to 0 bytes and back: `resized`, which `follow_storage_resizes` calls); a
    DTensor counts as its local shard."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                out = func(*args, **(kwargs or {}))
                tracker.seen(out)
                return out

        self.mode, self.live, self.peak, self.sizes = Mode(), 0, 0, {}

    def add(self, tensor) -> None:  # type: ignore[no-untyped-def]
        """Count `tensor`'s storage from now until it is released (once, however many views)."""
        from torch.distributed.tensor import DTensor

        if isinstance(tensor, DTensor):
            tensor = tensor.to_local()
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.sizes or storage.nbytes() == 0:
            return
        self.sizes[key] = storage.nbytes()
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self.release, key)

    def seen(self, out) -> None:  # type: ignore[no-untyped-def]
        import torch
        from torch.utils._pytree import tree_leaves

        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self.add(t)

    def resized(self, storage, nbytes: int) -> None:  # type: ignore[no-untyped-def]
        key = storage._cdata
        if key not in self.sizes:
            self.sizes[key] = 0
            weakref.finalize(storage, self.release, key)
        self.live += nbytes - self.sizes[key]
        self.sizes[key] = nbytes
        self.peak = max(self.peak, self.live)

    def release(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)


def follow_storage_resizes(tracker: LiveTensorBytes) -> None:
    """FSDP frees a gathered parameter by resizing its storage to 0 bytes and gathers it again
    into the same storage (`UntypedStorage.resize_`, outside the dispatcher): tell the tracker."""
    import torch

    resize = torch.UntypedStorage.resize_

    def resize_and_count(storage, nbytes):  # type: ignore[no-untyped-def]
        out = resize(storage, nbytes)
        tracker.resized(storage, int(nbytes))
        return out

    torch.UntypedStorage.resize_ = resize_and_count  # type: ignore[method-assign]


def build(spec: dict, cfg, ctx):  # type: ignore[no-untyped-def]
    """The model, loss and optimizer of a configuration, built by the run's own `build_model`
    (run/train.py) from a TrainConfig, on weights in the dtype a run loads them in; under
    torchrun (`ctx`) sharded by FSDP, as `--strategy fsdp` does."""
    import torch
    from transformers import AutoModelForCausalLM

    from domainlm.config import TrainConfig
    from domainlm.model.distributed import weights_from_rank_0
    from domainlm.model.loading import LoadedModel, meta_model_of
    from domainlm.model.memory import load_dtype_for
    from domainlm.run.train import build_model

    config = TrainConfig(
        model=spec["model"], train_file="unused.txt", output_dir="unused", device="cpu",
        precision=spec["precision"], batch_size=spec["batch"], block_size=spec["block"],
        gradient_checkpointing=spec["ckpt"], lora=spec["lora"], load_dtype=spec["load_dtype"],
        strategy="fsdp" if ctx.enabled else "auto",
    )  # fmt: skip
    dtype = load_dtype_for(config.load_dtype, spec["precision"], spec["lora"])
    torch.manual_seed(0)
    # as model/loading.py's load_model builds a scratch: preset: random init, cast to the dtype;
    # under torchrun as a run does: rank 0 alone, the others on meta (build_model gives them
    # rank 0's dtypes and weights)
    if weights_from_rank_0(ctx) and not ctx.is_main:
        model = meta_model_of(cfg)
    else:
        model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    loaded = LoadedModel(model, None, 0, spec["block"], spec["model"])
    data = SimpleNamespace(loaded=loaded, resume_from=None)  # what build_model reads of RunData
    return build_model(config, data, ctx, torch.device("cpu"), spec["precision"])  # type: ignore[arg-type]


def child(spec: dict) -> dict:
    """One configuration in this process (under torchrun: one rank of it, sharded by FSDP):
    the measured peaks and the plan's (under torchrun: the highest of any rank's)."""
    from domainlm.model.malloc import reuse_freed_host_memory

    reuse_freed_host_memory()
    from domainlm.model.distributed import DistContext, setup_distributed, teardown_distributed

    ctx = setup_distributed(device="cpu", strategy="fsdp") if spec["ranks"] > 1 else DistContext()
    try:
        return measure(spec, ctx)
    finally:  # as a run does
        teardown_distributed(ctx)


def measure(spec: dict, ctx) -> dict:  # type: ignore[no-untyped-def]
    """`child`'s measurement, in a process group already joined (`ctx`) or none."""
    import torch

    from domainlm.model.device import autocast
    from domainlm.model.memory import plan_memory

    ranks = spec["ranks"]
    torch.set_num_threads(max(1, 2 // ranks))
    cfg = model_config(spec["model"])
    plan = plan_memory(cfg, model=spec["model"], batch_size=spec["batch"],
                       block_size=spec["block"], precision=spec["precision"],
                       load_dtype=spec["load_dtype"], fsdp_ranks=ranks)  # fmt: skip
    baseline = rss_kib("VmRSS")
    net = build(spec, cfg, ctx)
    model, train_module, optim = net.model, net.train_module, net.optimizer
    device = torch.device("cpu")
    ids = torch.randint(0, cfg.vocab_size, (spec["batch"], spec["block"] + 1))

    def step() -> None:
        with autocast(device, spec["precision"]):
            nll = train_module(ids[:, :-1], ids[:, 1:]).sum()
        (nll / ids[:, 1:].numel()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)

    for _ in range(RSS_STEPS):  # glibc's heap reaches its plateau by the third step
        step()
    rss_peak = (rss_kib("VmHWM") - baseline) * 1024
    tracker = LiveTensorBytes()  # parameters and AdamW state alive from the start
    for param in model.parameters():
        tracker.add(param)
    for state in optim.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim():
                tracker.add(value)
    follow_storage_resizes(tracker)
    with tracker.mode:
        step()
    name = ("lora" if spec["lora"] else "full") + ("+ckpt" if spec["ckpt"] else "")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # DTensor: global
    tensor_peak = tracker.peak
    if ranks > 1:  # the rank with the highest peaks (the ranks differ by padding only)
        import torch.distributed as dist

        peaks = torch.tensor([tensor_peak, rss_peak], dtype=torch.float64)
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        tensor_peak, rss_peak = (int(v) for v in peaks.tolist())
    return {**spec, "tensor_peak": tensor_peak, "rss_peak": rss_peak,
            "trainable": trainable,
            "plan_trainable": plan.trainable_lora if spec["lora"] else plan.trainable_full,
            "plan_peak": plan.scenarios[name].peak,
            "plan_process_bound": plan.scenarios[name].fit_bytes}  # fmt: skip


def run_child(spec: dict) -> dict:
    """`child(spec)` in a fresh process, or in `spec["ranks"]` under torchrun (rank 0's row)."""
    command = [sys.executable, __file__, "--child", json.dumps(spec)]
    if spec["ranks"] > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--standalone",
                        f"--nproc-per-node={spec['ranks']}"]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:  # what the child said, for whoever reads the failure
        raise RuntimeError(
            f"{spec['name']} ({spec['precision']}, {spec['ranks']} rank(s)) failed with "
            f"exit code {out.returncode}:\n{out.stderr[-4000:]}"
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="the small configurations only")
    parser.add_argument("--lora-only", action="store_true", help="the LoRA configurations only")
    parser.add_argument(
        "--only", help="the configurations at these 0-based indexes (1,4,...) of the chosen list"
    )
    parser.add_argument(
        "--fsdp",
        action="store_true",
        help="the FSDP configurations (one rank's peaks, under torchrun)",
    )
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args()
    if args.child:
        row = child(json.loads(args.child))
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(row), flush=True)
        sys.stderr.flush()
        # Out now, past the C++ destructors: a gloo rank of this child, its group destroyed and
        # its row written, died of SIGABRT at exit ("terminate called without an active
        # exception", no Python frame left) in 5 of 31 runs (PyTorch 2.13, CPU); 0 of 30 since.
        # A bare FSDP2 script under `torchrun --standalone` does it too (3 of 30), `domainlm
        # train --strategy fsdp` under it did not (0 of 40).
        os._exit(0)
    rows = []
    print(
        "| model | training | precision | grad. ckpt | batch x block | plan MiB | tensors MiB "
        "| plan/tensors | RSS MiB | plan/RSS | process bound MiB | bound/RSS |"
    )
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    chosen = QUICK if args.quick else LORA_ONLY if args.lora_only else CONFIGS
    ranked = [(1, c) for c in chosen]
    if args.fsdp:
        ranked = FSDP_CONFIGS
    if args.only:
        ranked = [ranked[int(i)] for i in args.only.split(",")]
    for ranks, (name, model, precision, ckpt, lora, batch, block, *load) in ranked:
        spec = dict(
            name=name, model=model, precision=precision, ckpt=ckpt, lora=lora, batch=batch,
            block=block, load_dtype=load[0] if load else "auto", ranks=ranks,
        )  # fmt: skip
        row = run_child(spec)
        rows.append(row)
        mib = 1024**2
        tuning = ("LoRA r=8" if lora else "full") + (f", {load[0]} weights" if load else "")
        tuning += f", FSDP {ranks} ranks (one rank)" if ranks > 1 else ""
        print(f"| {name} | {tuning} | {precision} | {'yes' if ckpt else 'no'} | {batch} x {block} "
              f"| {row['plan_peak'] / mib:.0f} | {row['tensor_peak'] / mib:.0f} "
              f"| {row['plan_peak'] / row['tensor_peak']:.3f} | {row['rss_peak'] / mib:.0f} "
              f"| {row['plan_peak'] / row['rss_peak']:.3f} | {row['plan_process_bound'] / mib:.0f} "
              f"| {row['plan_process_bound'] / row['rss_peak']:.2f} |", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
