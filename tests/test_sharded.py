"""Sharded checkpoints in one process (issue 17 item 2): --checkpoint-format sharded, its resume,
`domainlm export`, and the guard on what torch.distributed.checkpoint unpickles.

One process writes one shard; the same code writes one per rank under FSDP, and checkpoints move
between rank counts in tests/test_sharded_distributed.py (torchrun, gloo). Runs are in-process
`domainlm train` on scratch:tiny (dropout 0.1), CPU, fp32.
"""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import ModuleTemp, uneven_corpus, write_lines
from safetensors.torch import load_file

from domainlm.cli import main as cli_main
from domainlm.errors import UserError
from domainlm.run import checkpoint as ckpt
from domainlm.run.metrics import read_events
from domainlm.run.sharded import dcp_load, is_sharded_checkpoint


@pytest.fixture(scope="module")
def corpus(module_tmp: ModuleTemp) -> Path:
    folder = module_tmp.mktemp("corpus")
    write_lines(folder / "train.txt", uneven_corpus(40, seed=0))
    write_lines(folder / "valid.txt", uneven_corpus(8, seed=1))
    return folder


def train_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", "scratch:tiny",
        "--train-file", str(corpus / "train.txt"),
        "--validation-file", str(corpus / "valid.txt"),
        "--output-dir", str(out),
        "--block-size", "32", "--batch-size", "2", "--max-steps", "4", "--save-steps", "2",
        "--logging-steps", "1", "--lr", "1e-3", "--precision", "fp32", "--quiet", *extra,
    ]  # fmt: skip


def events(out: Path) -> list[dict]:
    rows = read_events(out / "metrics.jsonl")
    for row in rows:
        row.pop("tokens_per_s", None)
    return rows


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def runs(corpus: Path, module_tmp: ModuleTemp) -> dict[str, Path]:
    root = module_tmp.mktemp("runs")
    full, sharded = root / "full", root / "sharded"
    assert cli_main(train_args(corpus, full)) == 0
    assert cli_main(train_args(corpus, sharded, "--checkpoint-format", "sharded")) == 0
    return {"full": full, "sharded": sharded}


def test_sharded_checkpoint_layout_and_bit_identical_resume(
    corpus: Path, runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sharded = runs["sharded"]
    step2 = sharded / "checkpoint-2"
    assert is_sharded_checkpoint(step2) and ckpt.checkpoint_problem(step2) is None
    names = sorted(p.name for p in step2.iterdir())
    assert ".metadata" in names and "__0_0.distcp" in names and "model.safetensors" not in names
    marker = json.loads((step2 / ckpt.MARKER).read_text())
    assert set(marker["files"]) == set(names) - {ckpt.MARKER}  # every shard is checksummed
    assert "optimizer" not in ckpt.load_training_state(step2)  # it is in the shards
    assert same_weights(sharded, runs["full"])  # the final model: a plain folder, same weights

    # The newest checkpoint's shard is corrupt: found by its checksum, skipped for checkpoint-2,
    # and the run resumed from there ends bit-identical to the uninterrupted full-format run.
    out = tmp_path / "resumed"
    shutil.copytree(sharded, out)
    flip_a_byte(out / "checkpoint-4" / "__0_0.distcp")
    (out / "model.safetensors").unlink()
    capsys.readouterr()
    assert cli_main(train_args(corpus, out, "--checkpoint-format", "sharded")) == 0
    err = capsys.readouterr().err
    assert "skipping checkpoint-4: __0_0.distcp does not match its checksum" in err
    assert f"resuming from {out / 'checkpoint-2'} at step 2" in err
    assert same_weights(out, runs["full"])
    assert events(out) == events(runs["full"])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_sharded_save_cut_short_is_never_resumed_and_rotation_waits_for_publication(
    corpus: Path, runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every rank's shards are written into .checkpoint-4.tmp; a failure before its marker
    leaves checkpoint-2 (not rotated away by --save-total-limit 1) as the resume point."""
    from domainlm.run import sharded

    real = sharded.publish_checkpoint

    def dies_at_4(output_dir: Path, step: int, *args: object, **kwargs: object) -> Path:
        if step == 4:
            raise OSError(5, "Input/output error")
        return real(output_dir, step, *args, **kwargs)

    out = tmp_path / "out"
    args = train_args(corpus, out, "--checkpoint-format", "sharded", "--save-total-limit", "1")
    with monkeypatch.context() as patch:
        patch.setattr(sharded, "publish_checkpoint", dies_at_4)
        with pytest.raises(OSError, match="Input/output error"):
            cli_main(args)
    assert [c.step for c in ckpt.list_checkpoints(out)] == [2]
    assert (out / ".checkpoint-4.tmp" / "__0_0.distcp").is_file()  # written, never published
    assert not (out / "checkpoint-4").exists()
    assert cli_main(args) == 0
    assert [c.step for c in ckpt.list_checkpoints(out)] == [4]  # 2 rotated once 4 was complete
    assert same_weights(out, runs["full"])


def test_a_full_run_resumes_from_a_sharded_checkpoint(
    corpus: Path, runs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "resumed"
    shutil.copytree(runs["sharded"], out)
    shutil.rmtree(out / "checkpoint-4")
    assert cli_main(train_args(corpus, out, "--checkpoint-format", "full")) == 0
    assert not is_sharded_checkpoint(out / "checkpoint-4")
    assert (out / "checkpoint-4" / "model.safetensors").is_file()
    assert same_weights(out, runs["full"])


def logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
    with torch.no_grad():
        return model(torch.arange(40).reshape(2, 20)).logits


@pytest.mark.parametrize("kind", ["full", "sharded"])
def test_export_gives_a_plain_folder_with_the_runs_logits(
    kind: str, runs: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    out = tmp_path / "exported"
    assert cli_main(["export", str(runs[kind] / "checkpoint-4"), str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    # checkpoint-4 is the last step: its logits are those of the run's final model, exactly
    assert torch.equal(logits(out), logits(runs["full"]))
    assert AutoTokenizer.from_pretrained(out)("a b").input_ids


def test_export_keeps_the_dtype_the_checkpoint_holds(corpus: Path, tmp_path: Path) -> None:
    """A pure bf16 run's checkpoint (--load-dtype bfloat16) exports as the bf16 tensors it holds,
    bit for bit, not as a float32 copy twice its size that transformers loads as float32."""
    run, out = tmp_path / "bf16-run", tmp_path / "exported"
    flags = ("--precision", "bf16", "--load-dtype", "bfloat16", "--max-steps", "2")
    assert cli_main(train_args(corpus, run, *flags)) == 0
    assert cli_main(["export", str(run / "checkpoint-2"), str(out)]) == 0
    exported, held = load_file(out / "model.safetensors"), load_file(run / "model.safetensors")
    assert {t.dtype for t in held.values()} == {torch.bfloat16}
    assert exported.keys() == held.keys()
    assert all(exported[k].dtype == torch.bfloat16 for k in exported)
    assert all(torch.equal(exported[k], held[k]) for k in held)


def test_export_refuses_a_corrupt_checkpoint_and_a_used_folder(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(runs["sharded"] / "checkpoint-2", broken)
    flip_a_byte(broken / "__0_0.distcp")
    assert cli_main(["export", str(broken), str(tmp_path / "out")]) == 2
    assert "__0_0.distcp does not match its checksum" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    assert cli_main(["export", str(runs["sharded"] / "checkpoint-2"), str(used)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert sorted(p.name for p in used.iterdir()) == ["keep.txt"]

    # a finished run's folder is a model folder already: said so, not "being written"
    assert cli_main(["export", str(runs["full"]), str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert "is a model folder already" in err and "being written" not in err
    assert not (tmp_path / "again").exists()
    # A file, and a folder of other things (a report's): each said as it is, nothing written.
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.html").write_text("<html></html>")
    (tmp_path / "notes.txt").write_text("mine")
    for given, problem in [
        ("notes.txt", "a file, not a folder"),
        ("report", "not a checkpoint folder"),
    ]:
        assert cli_main(["export", str(tmp_path / given), str(tmp_path / "x")]) == 2
        assert f"{tmp_path / given}: cannot export it: {problem}" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # A sharded checkpoint cut short before its marker (its config.json is written already):
    # being written, not "a model folder transformers loads"; and transformers cannot load a
    # sharded checkpoint: `--model` says to export it.
    unpublished = tmp_path / ".checkpoint-2.tmp"
    shutil.copytree(runs["sharded"] / "checkpoint-2", unpublished)
    (unpublished / "checkpoint.json").unlink()
    assert cli_main(["export", str(unpublished), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "cannot export it: no completion marker (it was being written" in err
    assert not (tmp_path / "x").exists()
    sharded = runs["sharded"] / "checkpoint-2"
    assert cli_main(["perplexity", "--model", str(sharded), "--text", "a b c d"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        f"domainlm: error: {sharded} is a sharded checkpoint (--checkpoint-format sharded: the "
        "weights in each rank's shards), which transformers cannot load: `domainlm export "
        f"{sharded} OUT` writes a model folder from it (a run resumes from it as it is)"
    )


def test_export_to_a_folder_it_cannot_make_or_fill_is_one_line_and_leaves_nothing(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    checkpoint = str(runs["full"] / "checkpoint-2")
    (tmp_path / "afile").write_text("mine")
    assert cli_main(["export", checkpoint, str(tmp_path / "afile" / "sub")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"domainlm: error: cannot create {tmp_path / 'afile' / 'sub'} (")
    assert (tmp_path / "afile").read_text() == "mine"

    # The disk fills while the weights are written: one line; a folder the export made is
    # removed, an empty one the user made is emptied and kept.
    from transformers import PreTrainedModel

    def full_disk(self, folder, *args, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    (tmp_path / "empty").mkdir()
    for out, left in ((tmp_path / "new" / "model", False), (tmp_path / "empty", True)):
        assert cli_main(["export", checkpoint, str(out)]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line == (
            f"domainlm: error: cannot write {out} (No space left on device); nothing is left there"
        )
        assert out.exists() == left and (not left or not any(out.iterdir()))
    assert not (tmp_path / "new").exists()  # made for the export, with the folder in it


# ----------------------------------------------------------------------------- security

PWNED: list[str] = []


def pwn(note: str) -> str:
    PWNED.append(note)
    return note


class Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (pwn, ("pwned",))


def test_checkpoint_metadata_that_names_other_code_is_refused(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """DCP reads .metadata with pickle: a crafted one must not run code (test_security.py)."""
    folder = tmp_path / "evil"
    shutil.copytree(runs["sharded"] / "checkpoint-2", folder)
    (folder / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UserError, match="test_sharded.pwn, which a checkpoint never holds"):
        dcp_load({"model": {}}, folder)
    assert PWNED == []


def test_non_tensor_values_in_shards_are_loaded_weights_only(tmp_path: Path) -> None:
    """DCP loads non-tensor values with torch.load(weights_only=False); ours must not."""
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "evil"
    warnings.simplefilter("ignore", UserWarning)  # dcp: "assuming ... a single process"
    dcp.save({"lr": Evil(), "w": torch.ones(2)}, checkpoint_id=folder)
    with pytest.raises(UserError, match="cannot load this sharded checkpoint: Weights only load"):
        dcp_load({"lr": 0.0, "w": torch.zeros(2)}, folder)
    assert PWNED == []
    # plain values load as before
    dcp.save({"lr": 0.5, "betas": (0.9, 0.99), "w": torch.ones(2)}, checkpoint_id=tmp_path / "ok")
    state = {"lr": 0.0, "betas": (0.0, 0.0), "w": torch.zeros(2)}
    dcp_load(state, tmp_path / "ok")
    assert state["lr"] == 0.5 and state["betas"] == (0.9, 0.99)
    assert torch.equal(state["w"], torch.ones(2))


def test_the_size_estimate_of_a_sharded_checkpoint_counts_a_tied_weight_twice(
    runs: dict[str, Path],
) -> None:
    """torch.distributed.checkpoint stores a tied weight under each of its names (GPT-2's
    embedding as wte and lm_head): a sharded checkpoint of tiny GPT-2 is ~30% larger than a full
    one, and the disk check and --preempt-grace estimate, made for the full one, were that short.
    The estimate with `sharded` is within 2% of the written folder, as the full one's is."""
    from domainlm.model.loading import load_model
    from domainlm.run.diskspace import estimate_checkpoint, folder_bytes

    loaded = load_model(str(runs["full"]))
    for name, sharded in (("full", False), ("sharded", True)):
        written = folder_bytes(runs[name] / "checkpoint-4")
        size = estimate_checkpoint(loaded.model, loaded.tokenizer, sharded=sharded).total
        assert abs(size - written) / written < 0.02, (name, size, written)
    assert folder_bytes(runs["sharded"] / "checkpoint-4") > 1.2 * folder_bytes(
        runs["full"] / "checkpoint-4"
    )
