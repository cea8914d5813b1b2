"""Security (issue 5): weights only as safetensors, no unpickling of anything but plain tensors,
model code from the hub only with --trust-remote-code. (That a run writes nothing outside its
output dir and the cache is tested on a real run in test_reliability.py.)"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
import torch

import domainlm
from domainlm.errors import UserError

PACKAGE = Path(domainlm.__file__).parent


def calls(attr: str) -> list[tuple[str, ast.Call]]:
    """Every call `<something>.<attr>(...)` or `<attr>(...)` in the package source."""
    found = []
    for file in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name == attr:
                found.append((f"{file.name}:{node.lineno}", node))
    return found


def keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_every_torch_load_is_weights_only() -> None:
    loads = [(where, c) for where, c in calls("load") if ast.unparse(c.func).startswith("torch.")]
    assert loads, "expected the checkpoint loader to use torch.load"
    for where, call in loads:
        value = keyword(call, "weights_only")
        assert isinstance(value, ast.Constant) and value.value is True, where


def test_no_pickle_and_no_unsafe_numpy_load() -> None:
    """pickle only in run/sharded.py, as the restricted unpickler of DCP's .metadata (an
    allow-list of its classes; a crafted file is refused: tests/test_sharded.py)."""
    for file in PACKAGE.rglob("*.py"):
        text = file.read_text()
        assert "allow_pickle=True" not in text, file.name
        assert "pickle.load(" not in text and "pickle.loads(" not in text, file.name
        if file.relative_to(PACKAGE).as_posix() != "run/sharded.py":
            assert "import pickle" not in text, file.name
    sharded = (PACKAGE / "run" / "sharded.py").read_text()
    assert "class MetadataUnpickler(pickle.Unpickler)" in sharded
    assert "def find_class(self, module: str, name: str)" in sharded


def test_trust_remote_code_comes_only_from_the_flag() -> None:
    uses = [(w, keyword(c, "trust_remote_code")) for w, c in calls_with("trust_remote_code")]
    assert uses
    for where, value in uses:
        # Never a literal True: the value is the user's --trust-remote-code (or a parameter).
        assert not (isinstance(value, ast.Constant) and value.value is True), where


def calls_with(kw: str) -> list[tuple[str, ast.Call]]:
    out = []
    for file in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Call) and any(k.arg == kw for k in node.keywords):
                out.append((f"{file.name}:{node.lineno}", node))
    return out


# PeftModel.from_pretrained takes no use_safetensors: domainlm refuses an adapter folder without
# adapter_model.safetensors before calling it (test_a_pickled_adapter_is_refused_unopened).
SAFETENSORS_CHECKED_BEFORE = {"PeftModel.from_pretrained"}


def test_from_pretrained_models_use_safetensors_only() -> None:
    model_loads = [(w, c) for w, c in calls("from_pretrained") if "Model" in ast.unparse(c.func)]
    assert model_loads
    for where, call in model_loads:
        if any(ast.unparse(call.func).endswith(name) for name in SAFETENSORS_CHECKED_BEFORE):
            continue
        value = keyword(call, "use_safetensors")
        assert isinstance(value, ast.Constant) and value.value is True, where
    for where, call in calls("save_pretrained"):
        value = keyword(call, "safe_serialization")
        assert value is None or (isinstance(value, ast.Constant) and value.value), where


def test_pickled_weights_are_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A folder whose weights are only a pickle (pytorch_model.bin) is not loaded."""
    from domainlm.model.loading import load_model

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(weights), folder / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(UserError, match=f"could not load the model in {folder}"):
        load_model(str(folder))


class _WritesAMarker:
    """Unpickling this runs code: it writes a file (what a malicious pickle would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.write_text, (self.marker, "pickle code ran"))


def test_a_pickled_adapter_is_refused_unopened(tiny_model_dir: Path, tmp_path: Path) -> None:
    """An adapter folder whose weights are only a pickle (adapter_model.bin) is refused with one
    line, before the pickle is opened (peft itself would torch.load it)."""
    import json
    import pickle

    from domainlm.model.lora import load_any_model

    folder, marker = tmp_path / "adapter", tmp_path / "marker"
    folder.mkdir()
    config = {"peft_type": "LORA", "base_model_name_or_path": str(tiny_model_dir), "r": 2}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(_WritesAMarker(marker)))
    with pytest.raises(UserError, match="adapter_model.safetensors"):
        load_any_model(str(folder))
    assert not marker.exists()


def test_checkpoint_files_are_safetensors_and_a_weights_only_state(tmp_path: Path) -> None:
    from domainlm.model.loading import build_scratch_model, gpt2_tokenizer
    from domainlm.run.checkpoint import STATE_FILE, load_training_state, save_checkpoint

    model = build_scratch_model("tiny")
    path = save_checkpoint(tmp_path, 1, model, gpt2_tokenizer(), {"step": 1, "rng": torch.ones(2)})
    assert (path / "model.safetensors").is_file()
    assert not list(path.glob("*.bin"))
    assert load_training_state(path)["step"] == 1

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("pwned",))

    torch.save({"step": 2, "x": Evil()}, path / STATE_FILE)
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        load_training_state(path)
