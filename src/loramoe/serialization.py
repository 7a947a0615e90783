"""Saving and loading adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

The format is a public contract, described in docs/format.md. LoRA is written in PEFT's own
format so ``peft.PeftModel.from_pretrained`` loads it; Tied LoRA writes each shared tensor once.
Loading validates everything (method,
config, target modules, every key and shape) before it touches the model, and reads only
safetensors, never pickle.
"""

from __future__ import annotations

import dataclasses
import json
import os
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from loramoe.adapters import LAYER_CLASSES, AdapterConfig, LoraConfig, TiedLoraConfig
from loramoe.adapters.base import SUPPORTED_BASE_LAYERS, layer_shape
from loramoe.adapters.tied_lora import tie_name
from loramoe.attach import adapter_config, adapter_layers, attach_paths
from loramoe.fileio import atomic_write, atomic_write_text

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_TIED_PREFIX = "tied."
_BASE_MODEL_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "vocab_size", "n_embd", "n_inner", "n_layer")

M = TypeVar("M", bound=nn.Module)


class AdapterLoadError(ValueError):
    """A saved adapter does not fit the model, or its files are malformed."""


def disk_key(method: str, path: str, local_key: str) -> str:
    """The safetensors key of one adapter tensor of the module at ``path``. Tensors that several
    modules share have one key, so they are written once."""
    if method == LoraConfig.method:  # PEFT's layout: lora_A/lora_B are nn.Linear submodules there
        return f"{_PEFT_PREFIX}{path}.{local_key}.weight"
    if method == TiedLoraConfig.method and local_key in ("lora_A", "lora_B"):
        return f"{_TIED_PREFIX}{tie_name(path)}.{local_key}"
    return f"{path}.{local_key}"


def _base_model_info(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    info: dict[str, Any] = {"name_or_path": getattr(config, "_name_or_path", None) or None}
    for name in _BASE_MODEL_FIELDS:
        if getattr(config, name, None) is not None:
            info[name] = getattr(config, name)
    return info


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the attached adapter to ``directory`` (created if needed). Each file is replaced
    atomically, so an interrupted save never leaves a half-written file behind."""
    config = adapter_config(model)
    if config is None:
        raise ValueError("model has no loramoe adapter to save")
    tensors = {disk_key(config.method, path, key): value.detach().contiguous().cpu()
               for path, layer in adapter_layers(model) for key, value in layer.adapter_state().items()}
    return write_adapter_folder(model, directory, config, tensors)


def write_adapter_folder(model: nn.Module, directory: str | os.PathLike, config: AdapterConfig,
                         tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``tensors`` (by disk key) as an adapter of ``config`` on the modules of ``model``'s
    attached adapter, each file replaced atomically."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    layers = list(adapter_layers(model))
    paths = [path for path, _ in layers]
    block = {"method": config.method, "loramoe_version": version("loramoe"),
             "config": dataclasses.asdict(config), "target_paths": paths,
             "base_model": _base_model_info(model)}
    if config.method == LoraConfig.method:
        document = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.r,
                    "lora_alpha": config.alpha, "lora_dropout": config.dropout, "target_modules": paths,
                    "base_model_name_or_path": block["base_model"]["name_or_path"], "bias": "none",
                    "fan_in_fan_out": any(isinstance(l.base_layer, Conv1D) for _, l in layers),
                    "use_rslora": False, "inference_mode": True, "loramoe": block}
    else:
        document = block
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_text(out / CONFIG_NAME, json.dumps(document, indent=2) + "\n")
    return out


def read_adapter_config(directory: str | os.PathLike) -> tuple[AdapterConfig, list[str]]:
    """The config and the module paths of a saved adapter (loramoe's, or a plain PEFT LoRA)."""
    file = Path(directory) / CONFIG_NAME
    if not file.is_file():
        raise AdapterLoadError(f"{file}: not found (an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        document = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterLoadError(f"{file}, line {e.lineno}: invalid JSON: {e.msg}") from None
    block = document.get("loramoe", document)
    if "method" in block:
        config_class = next((c.config_class for c in LAYER_CLASSES.values()
                             if c.config_class.method == block["method"]), None)
        if config_class is None:
            raise AdapterLoadError(f"{file}: field 'method': unknown adapter method {block['method']!r}")
        fields = block.get("config", {})
        known = {f.name for f in dataclasses.fields(config_class)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise AdapterLoadError(f"{file}: field 'config': unknown {config_class.__name__} fields {unknown}")
        paths = block.get("target_paths")
    elif document.get("peft_type") == "LORA":
        fields = {"r": document.get("r", 8), "alpha": document.get("lora_alpha", 8),
                  "dropout": document.get("lora_dropout", 0.0)}
        config_class, paths = LoraConfig, document.get("target_modules")
    else:
        raise AdapterLoadError(f"{file}: field 'method': missing (and not a PEFT LoRA config)")
    try:
        config = config_class(**fields)
    except (TypeError, ValueError) as e:
        raise AdapterLoadError(f"{file}: field 'config': {e}") from None
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths) or not paths:
        raise AdapterLoadError(f"{file}: field 'target_paths': expected a non-empty list of module paths")
    return config, paths


def _resolve_paths(model: nn.Module, paths: list[str], file: Path) -> list[str]:
    """Saved paths as module paths of ``model`` (PEFT may list name suffixes instead of paths)."""
    modules = dict(model.named_modules())
    resolved = []
    for name in paths:
        hits = [p for p in modules if (p == name or p.endswith("." + name)) and ".base_layer" not in p]
        if not hits:
            raise AdapterLoadError(f"{file}: target module '{name}' is not in this model")
        resolved.extend(hits)
    return list(dict.fromkeys(resolved))


def load_adapter(model: M, directory: str | os.PathLike) -> M:
    """Load a saved adapter into ``model``. A model without an adapter gets one attached from the
    saved config; a model with one must have the same method and config. Nothing is changed
    unless every key and shape matches."""
    directory = Path(directory)
    config, saved_paths = read_adapter_config(directory)
    config_file, weights_file = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not weights_file.is_file():
        pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
        hint = f" ({', '.join(pickled)} found: pickle files are never read)" if pickled else ""
        raise AdapterLoadError(f"{weights_file}: not found{hint}")
    current = adapter_config(model)
    if current is not None:
        _check_same_config(current, config, config_file)
        layers = dict(adapter_layers(model))
        paths = list(layers)
        if set(paths) != set(_resolve_paths(model, saved_paths, config_file)):
            raise AdapterLoadError(f"{config_file}: the saved target modules differ from the attached adapter's")
        shapes = {p: (layers[p].in_features, layers[p].out_features) for p in paths}
    else:
        paths = _resolve_paths(model, saved_paths, config_file)
        modules = dict(model.named_modules())
        for p in paths:
            if not isinstance(modules[p], SUPPORTED_BASE_LAYERS):
                raise AdapterLoadError(f"{config_file}: target module '{p}' is a {type(modules[p]).__name__}, "
                                       "not a linear layer")
        shapes = {p: layer_shape(modules[p]) for p in paths}
    layer_class = LAYER_CLASSES[config.method]
    expected: dict[str, tuple[int, ...]] = {}
    for p in paths:
        for local_key, shape in layer_class.parameter_shapes(*shapes[p], config).items():
            key = disk_key(config.method, p, local_key)
            if expected.setdefault(key, shape) != shape:  # one tensor shared by modules of different shapes
                raise AdapterLoadError(f"{config_file}: key '{key}' is shared by modules that need shapes "
                                       f"{list(expected[key])} and {list(shape)} ('{p}' needs the second)")
    tensors = _read_checked(weights_file, expected)
    if current is None:
        attach_paths(model, config, paths)
    for path, layer in adapter_layers(model):
        with torch.no_grad():
            for key, param in layer.adapter_state().items():
                param.copy_(tensors[disk_key(config.method, path, key)])
    return model


def _check_same_config(current: AdapterConfig, saved: AdapterConfig, file: Path) -> None:
    if current.method != saved.method:
        raise AdapterLoadError(f"{file}: field 'method': the file holds a {saved.method} adapter, "
                               f"the model has a {current.method} adapter attached")
    for f in dataclasses.fields(current):
        # dropout doesn't affect weights; targets are checked by path; a preset by the switches it sets
        if f.name in ("dropout", "target_modules", "preset"):
            continue
        a, b = getattr(current, f.name), getattr(saved, f.name)
        if a != b:
            raise AdapterLoadError(f"{file}: field 'config.{f.name}': saved {b!r}, attached adapter has {a!r}")


def _read_checked(file: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    try:
        with safe_open(file, framework="pt") as f:
            keys = set(f.keys())
            missing = sorted(set(expected) - keys)
            unexpected = sorted(keys - set(expected))
            if missing:
                raise AdapterLoadError(f"{file}: missing key '{missing[0]}' ({len(missing)} missing in all)")
            if unexpected:
                raise AdapterLoadError(f"{file}: unexpected key '{unexpected[0]}' "
                                       f"({len(unexpected)} unexpected in all)")
            for key, shape in expected.items():
                found = tuple(f.get_slice(key).get_shape())
                if found != tuple(shape):
                    raise AdapterLoadError(f"{file}: key '{key}' has shape {list(found)}, "
                                           f"the model expects {list(shape)}")
            return {key: f.get_tensor(key) for key in expected}
    except AdapterLoadError:
        raise
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise AdapterLoadError(f"{file}: not a readable safetensors file: {e}") from None
