"""reuse_freed_host_memory: freed 64 MB tensors' pages are reused, not faulted in again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SNIPPET = """
import json, resource, sys
import torch
import transformers  # a run has it imported before its first step (the heap it shapes matters)
from domainlm.model.malloc import reuse_freed_host_memory
applied = reuse_freed_host_memory()
def faults_for_a_fresh_block():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.empty(16 * 2**20, dtype=torch.float32)  # 64 MB
    block.fill_(1.0)
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
# The heap settles after a first block or two (a small allocation can land in a freed block, so
# the next one grows the heap once); a training loop is that steady state: count cycles 4-8.
for _ in range(3):
    faults_for_a_fresh_block()
steady = sum(faults_for_a_fresh_block() for _ in range(5))
print(json.dumps({"applied": applied, "faults": steady}))
"""


def run_snippet(system_malloc: bool) -> dict:
    env = dict(os.environ)
    env.pop("DOMAINLM_SYSTEM_MALLOC", None)
    if system_malloc:
        env["DOMAINLM_SYSTEM_MALLOC"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", SNIPPET], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_blocks_are_reused_without_page_faults_unless_opted_out() -> None:
    pages = 64 * 2**20 // 4096  # 16,384 pages of 4 KiB in a block; 5 blocks measured
    reused = run_snippet(system_malloc=False)
    assert reused["applied"] is True
    assert reused["faults"] < pages // 2, reused
    system = run_snippet(system_malloc=True)  # glibc default: mmap per block, faulted afresh
    assert system["applied"] is False
    assert system["faults"] > 4 * pages, system
