"""Shared fixtures: tiny GPT-2 models built locally (no hub), small corpora, an isolated cache.

The tests compute on the CPU, also on a machine with GPUs: `DOMAINLM_DEVICE=cpu` is set here, before
any test runs, and it is the default of `--device` (domainlm/model/device.py `device_choice`) for
`train`, `perplexity`, `generate` and `inspect`, in this process and in every subprocess and
torchrun rank the tests start (they inherit os.environ). One line instead of `--device cpu` in every
command; a test that wants the GPU says `--device cuda` (tests/test_cuda.py), which overrides it.
Without this, on a GPU machine the CPU tests' numbers would come from the GPU and their two-rank
gloo runs would ask for two GPUs.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["DOMAINLM_DEVICE"] = (
    "cpu"  # not setdefault: a DOMAINLM_DEVICE=cuda shell still gets CPU tests
)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own token cache, so no test sees another's cache hits."""
    cache = tmp_path / "token-cache"
    monkeypatch.setenv("DOMAINLM_CACHE", str(cache))
    return cache


def pytest_sessionstart(session: pytest.Session) -> None:
    """Remove the folders earlier, finished test sessions left under pytest's temporary root
    (the folder of a live session holds a lock and stays), now rather than at this session's
    end as pytest does: a CI machine that kept three sessions' folders (before this project's
    `tmp_path_retention_count = 1`) had too little disk left for the next run."""
    import time

    factory = session.config._tmp_path_factory  # type: ignore[attr-defined]
    if factory._given_basetemp is not None:  # --basetemp: the user's folder, cleared by pytest
        return
    try:
        from _pytest.pathlib import cleanup_numbered_dir
    except ImportError:  # pytest moved it: left to pytest's own clean-up at the end
        return
    ours = factory.getbasetemp()  # made first: it is the newest, kept
    day = 24 * 3600
    cleanup_numbered_dir(ours.parent, "pytest-", keep=1,
                         consider_lock_dead_if_created_before=time.time() - 3 * day)  # fmt: skip


class ModuleTemp:
    """Folders for one test module's shared files (what its module-scoped fixtures build: models,
    corpora, whole training runs), all under one folder that `module_tmp` removes when the
    module's tests are done.

    pytest's own `tmp_path_factory.mktemp` folders live until the session ends: the architecture
    matrix alone left 2.7 GB of runs there, the suite 15 GB or more, and with the default
    retention of three sessions' folders a CI machine ran out of disk (ENOSPC) mid-run."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def mktemp(self, name: str) -> Path:
        """A new empty folder named `name`, numbered as pytest numbers its own (name0, name1)."""
        number = 0
        while (self.root / f"{name}{number}").exists():
            number += 1
        folder = self.root / f"{name}{number}"
        folder.mkdir()
        return folder


@pytest.fixture(scope="module")
def module_tmp(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ModuleTemp]:
    """A test module's shared folders, removed after its last test unless a test failed
    meanwhile: a failing test's files are kept to look at, as `tmp_path_retention_policy =
    "failed"` (pyproject.toml) keeps a failing test's tmp_path and removes a passing one's."""
    root = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    failures_before = request.session.testsfailed
    yield ModuleTemp(root)
    if request.session.testsfailed == failures_before:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scratch:tiny saved as a Hugging Face folder, dropout off (deterministic forward passes)."""
    from domainlm.model.loading import save_scratch_folder

    folder = tmp_path_factory.mktemp("tiny-model")
    return save_scratch_folder(
        "tiny", folder, seed=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )


@pytest.fixture
def weight_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The folders (or hub ids) whose weights `AutoModelForCausalLM.from_pretrained` reads from
    here on, in order: a test asserts what a command reads, not only what it prints."""
    import transformers

    reads: list[str] = []
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def counting(cls, *args, **kwargs):  # type: ignore[no-untyped-def]
        reads.append(str(args[0]))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(counting))
    return reads


def write_lines(path: Path, lines: list[str], newline: str = "\n") -> Path:
    path.write_text(newline.join(lines) + newline, encoding="utf-8")
    return path


def uneven_corpus(n: int = 60, seed: int = 0) -> list[str]:
    """Documents of uneven length from a small vocabulary (fast to learn, deterministic)."""
    from domainlm.demo import word_documents

    return word_documents(n, seed)


@pytest.fixture(scope="module")
def one_thread_like_the_ranks():
    """torch on one thread for a module's in-process runs, as each torchrun rank of the tests is
    (OMP_NUM_THREADS=1): a matmul split over two threads sums in another order, and on a CPU
    with AMX (bf16 tiles) the difference between a 2-rank run and its one-process reference grew
    past the tests' float bounds (1.5e-5 against 1e-5 in weights) though the code was right."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def refuse_writes_in(monkeypatch: pytest.MonkeyPatch, locked: Path) -> None:
    """Make `locked` act as a folder on a read-only mount. Tests may run as root, for whom
    chmod does not forbid writing, so the failure is injected: the writability probe (a file
    made with tempfile.mkstemp) fails there with EROFS, as on a read-only file system."""
    import errno
    import tempfile

    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, **kwargs):  # type: ignore[no-untyped-def]
        if Path(kwargs.get("dir", "")).resolve() == locked.resolve():
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(locked))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
