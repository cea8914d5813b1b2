"""`--precision`: what `auto` picks on a GPU, and the error for a bf16 request without native bf16."""

from __future__ import annotations

import pytest
import torch

from domainlm.errors import UserError
from domainlm.model.device import resolve_precision

GPU = torch.device("cuda", 0)


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch):
    """Pretend to be an NVIDIA GPU of a given compute capability; torch.cuda.is_bf16_supported()
    answers as it does on such GPUs by default: True, counting emulation."""

    def make(capability: tuple[int, int]) -> None:
        monkeypatch.setattr(torch.version, "hip", None)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)

    return make


@pytest.mark.parametrize(
    "capability, name, expected",
    [((7, 5), "T4", "fp16"), ((7, 0), "V100", "fp16"), ((8, 0), "A100", "bf16"),
     ((8, 9), "L4", "bf16"), ((9, 0), "H100", "bf16")],
)  # fmt: skip
def test_auto_is_bf16_only_on_gpus_with_native_bf16(
    fake_gpu, capability: tuple[int, int], name: str, expected: str
) -> None:
    fake_gpu(capability)
    assert resolve_precision("auto", GPU) == expected, name


def test_explicit_bf16_on_an_older_gpu_is_a_one_line_error(fake_gpu) -> None:
    fake_gpu((7, 5))
    with pytest.raises(UserError) as caught:
        resolve_precision("bf16", GPU)
    message = str(caught.value)
    assert "\n" not in message
    assert "compute capability 7.5" in message and "--precision fp16" in message
    assert resolve_precision("fp16", GPU) == "fp16"  # what the message proposes is accepted
    fake_gpu((8, 0))
    assert resolve_precision("bf16", GPU) == "bf16"
