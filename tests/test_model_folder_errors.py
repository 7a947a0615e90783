"""Model folders that would run code when loaded: one whose config.json maps the model to its own
Python file (``auto_map``) and one whose ``pytorch_model.bin`` is a pickle that calls a function.
Both are refused with one line naming the reason and the way out, and nothing of theirs runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loramoe.errors import LoramoeError
from loramoe.models import load, load_tokenizer
from tests.conftest import save_tiny


def custom_code_folder(folder: Path, marker: Path) -> Path:
    """A tiny model folder whose config.json sends transformers to ``custom_model.py``, a file that
    writes ``marker`` when imported. Its model type is unknown to transformers, so only that code
    could load it (for a known type transformers would load its own class, trusted or not)."""
    save_tiny(folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "loramoe_custom"
    config["auto_map"] = {"AutoConfig": "custom_model.CustomConfig",
                          "AutoModelForCausalLM": "custom_model.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom_model.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('custom code ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'loramoe_custom'\n\n\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    return folder


class _WritesMarker:
    """Unpickled, it would write its marker: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "pickle ran")


def pickle_folder(folder: Path, marker: Path) -> Path:
    """A tiny model folder whose only weights are a pytorch_model.bin holding, beside the tensors,
    an object whose unpickling writes ``marker``."""
    state = dict(save_tiny(folder).state_dict())
    (folder / "model.safetensors").unlink()
    state["payload"] = _WritesMarker(marker)
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_custom_code_without_trust_is_refused_in_one_line(tmp_path, one_thread):
    folder = custom_code_folder(tmp_path / "custom", tmp_path / "marker")
    with pytest.raises(LoramoeError) as error:
        load(str(folder))
    message = _one_line(error)
    assert message.startswith(f"--model {folder}: ")
    assert "auto_map" in message and "--trust-remote-code" in message
    assert not (tmp_path / "marker").exists()


def test_custom_tokenizer_without_trust_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "model"
    save_tiny(folder)
    (folder / "custom_tokenizer.py").write_text(f"open({str(tmp_path / 'marker')!r}, 'w').close()\n")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "custom_tokenizer.CustomTokenizer"]}
    config["tokenizer_class"] = "CustomTokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(LoramoeError) as error:
        load_tokenizer(str(folder))
    assert "--trust-remote-code" in _one_line(error)
    assert not (tmp_path / "marker").exists()


def test_pickle_that_runs_code_is_refused_in_one_line(tmp_path, one_thread):
    folder = pickle_folder(tmp_path / "pickled", tmp_path / "marker")
    with pytest.raises(LoramoeError) as error:
        load(str(folder))
    message = _one_line(error)
    assert message.startswith(f"--model {folder}: pytorch_model.bin holds pickled Python objects")
    assert "safetensors" in message
    assert not (tmp_path / "marker").exists()
