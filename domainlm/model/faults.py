"""Fault injection for tests: out-of-memory errors on demand (see docs/reliability.md).

It lives below the run because the loss's forward pass calls it; run/guard.py holds the other injections.
"""

from __future__ import annotations

import os

import torch

OOM_ABOVE_ENV = "DOMAINLM_INJECT_OOM_ABOVE"
OOM_AFTER_BACKWARD_ENV = "DOMAINLM_INJECT_OOM_AFTER_BACKWARD"
OOM_RANK_ENV = "DOMAINLM_INJECT_OOM_RANK"


def _inject_oom(variable: str, rows: int) -> None:
    limit = os.environ.get(variable)
    rank = os.environ.get(OOM_RANK_ENV)
    if rank and rank != os.environ.get("RANK", "0"):
        return
    if limit and rows > int(limit):
        raise torch.OutOfMemoryError(f"injected by {variable}={limit}: micro-batch of {rows} rows")


def maybe_inject_oom(rows: int) -> None:
    """Fault injection: raise OutOfMemoryError for a forward pass on more rows than allowed."""
    _inject_oom(OOM_ABOVE_ENV, rows)


def maybe_inject_oom_after_backward(rows: int) -> None:
    """Fault injection: raise OutOfMemoryError once a micro-batch's backward pass is done."""
    _inject_oom(OOM_AFTER_BACKWARD_ENV, rows)
