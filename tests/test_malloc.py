"""reuse_freed_host_memory: a freed 64 MB tensor's pages are reused, not faulted in again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SNIPPET = """
import json, resource, sys
import torch
from domainlm.malloc import reuse_freed_host_memory
applied = reuse_freed_host_memory()
def faults_for_a_fresh_block():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.empty(16 * 2**20, dtype=torch.float32)  # 64 MB
    block.fill_(1.0)
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_for_a_fresh_block()
print(json.dumps({"applied": applied, "faults": faults_for_a_fresh_block()}))
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
    pages = 64 * 2**20 // 4096  # 16,384 pages of 4 KiB in the block
    reused = run_snippet(system_malloc=False)
    assert reused["applied"] is True
    assert reused["faults"] < pages // 10, reused
    system = run_snippet(system_malloc=True)  # glibc default: mmap per block, faulted afresh
    assert system["applied"] is False
    assert system["faults"] > pages // 2, system
