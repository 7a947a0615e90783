"""Saving and loading adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

The format is a public contract, described in docs/format.md. Each adapter kind's layer class
says its keys and config document (``disk_key``, ``config_document``): LoRA is written in PEFT's
own format so ``peft.PeftModel.from_pretrained`` loads it; Tied LoRA writes each shared tensor once.
Loading validates everything (method, config and the type of each of its values, the sizes of the
model it was trained on, target modules, every key, shape and value) before it touches the model,
and reads only safetensors, never pickle.
"""

from __future__ import annotations

import dataclasses
import json
import os
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

from loramoe.adapters import LAYER_CLASSES, AdapterConfig, LoraConfig
from loramoe.adapters.base import SUPPORTED_BASE_LAYERS, AdapterLayer, ConfigFieldError, layer_shape
from loramoe.adapters.lora import PEFT_FIELDS
from loramoe.attach import adapter_config, adapter_layers, attach_paths
from loramoe.errors import LoramoeError
from loramoe.fileio import atomic_write, atomic_write_text

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_BASE_MODEL_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "n_embd", "n_inner",
                     "n_layer")
_BASE_MODEL_FIELDS = ("model_type", *_BASE_MODEL_SIZES)
_JSON_KINDS = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}

M = TypeVar("M", bound=nn.Module)


class AdapterLoadError(LoramoeError, ValueError):
    """A saved adapter does not fit the model, or its files are malformed."""


def _base_model_info(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    info: dict[str, Any] = {"name_or_path": getattr(config, "_name_or_path", None) or None}
    for name in _BASE_MODEL_FIELDS:
        if getattr(config, name, None) is not None:
            info[name] = getattr(config, name)
    return info


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The attached adapter's tensors by disk key, whole and on the CPU. A parameter sharded by
    FSDP (a DTensor) is gathered, so every process of a sharded model must call this."""
    return {layer.disk_key(path, key): (value.full_tensor() if isinstance(value, DTensor) else value)
            .detach().contiguous().cpu()
            for path, layer in adapter_layers(model) for key, value in layer.adapter_state().items()}


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the attached adapter to ``directory`` (created if needed). Each file is replaced
    atomically, so an interrupted save never leaves a half-written file behind."""
    config = adapter_config(model)
    if config is None:
        raise ValueError("model has no loramoe adapter to save")
    return write_adapter_folder(model, directory, config, adapter_tensors(model))


def write_adapter_folder(model: nn.Module, directory: str | os.PathLike, config: AdapterConfig,
                         tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``tensors`` (by disk key) as an adapter of ``config`` on the modules of ``model``'s
    attached adapter, each file replaced atomically."""
    layers = list(adapter_layers(model))
    return _write_folder(directory, config, [path for path, _ in layers], tensors, _base_model_info(model), layers)


def write_adapter_files(directory: str | os.PathLike, config: AdapterConfig, target_paths: list[str],
                        tensors: dict[str, torch.Tensor], base_model: dict[str, Any] | None = None) -> Path:
    """Write ``tensors`` (by disk key) as an adapter of ``config`` on the modules ``target_paths``
    without a model at hand (converters), each file replaced atomically. ``base_model`` is what is
    known of the model (``name_or_path`` and any sizes of docs/format.md); sizes left out are not
    checked on loading. Kinds whose config document depends on the base layers (LoRA records
    whether they are Conv1D) are written from a model, with :func:`write_adapter_folder`."""
    if LAYER_CLASSES[config.method].config_document.__func__ is not AdapterLayer.config_document.__func__:
        raise ValueError(f"a {config.method} adapter's config depends on its base layers: "
                         "write it from a model with write_adapter_folder")
    return _write_folder(directory, config, list(target_paths), tensors,
                         {"name_or_path": None, **(base_model or {})}, [])


def _write_folder(directory: str | os.PathLike, config: AdapterConfig, paths: list[str],
                  tensors: dict[str, torch.Tensor], base_model: dict[str, Any],
                  layers: list[tuple[str, AdapterLayer]]) -> Path:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    block = {"method": config.method, "loramoe_version": version("loramoe"),
             "config": dataclasses.asdict(config), "target_paths": paths, "base_model": base_model}
    document = LAYER_CLASSES[config.method].config_document(config, block, layers)
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_text(out / CONFIG_NAME, json.dumps(document, indent=2) + "\n")
    return out


def read_adapter_config(directory: str | os.PathLike) -> tuple[AdapterConfig, list[str]]:
    """The config and the module paths of a saved adapter (loramoe's, or a plain PEFT LoRA)."""
    file = Path(directory) / CONFIG_NAME
    return _parse_config(_read_document(file), file)


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise AdapterLoadError(f"{where}: expected a JSON object, found {_JSON_KINDS[type(value)]}")
    return value


def _read_document(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise AdapterLoadError(f"{file}: not found (an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise AdapterLoadError(f"{file}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except json.JSONDecodeError as e:
        raise AdapterLoadError(f"{file}, line {e.lineno}: invalid JSON: {e.msg}") from None
    except RecursionError:
        raise AdapterLoadError(f"{file}: invalid JSON: nested too deeply (a config is a few levels deep)") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise AdapterLoadError(f"{file}: invalid JSON: {str(e).split(':')[0]}") from None
    return _object(document, str(file))


def _parse_config(document: dict[str, Any], file: Path) -> tuple[AdapterConfig, list[str]]:
    block = _object(document.get("loramoe", document), f"{file}: field 'loramoe'")
    if "method" in block:
        config_class = next((c.config_class for c in LAYER_CLASSES.values()
                             if c.config_class.method == block["method"]), None)
        if config_class is None:
            raise AdapterLoadError(f"{file}: field 'method': unknown adapter method {block['method']!r}")
        fields = _object(block.get("config", {}), f"{file}: field 'config'")
        known = {f.name for f in dataclasses.fields(config_class)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise AdapterLoadError(f"{file}: field 'config': unknown {config_class.__name__} fields {unknown}")
        names = {name: f"config.{name}" for name in known}
        paths_key = "target_paths"
    elif document.get("peft_type") == "LORA":
        _refuse_peft_variants(document, file)
        fields = {name: document.get(key, default) for name, (key, default) in PEFT_FIELDS.items()}
        names = {name: key for name, (key, _) in PEFT_FIELDS.items()}
        config_class, paths_key = LoraConfig, "target_modules"
    else:
        raise AdapterLoadError(f"{file}: field 'method': missing (and not a PEFT LoRA config)")
    try:
        config = config_class(**fields)
    except ConfigFieldError as e:
        raise AdapterLoadError(f"{file}: field '{names[e.field]}': {e.problem}") from None
    except ValueError as e:
        raise AdapterLoadError(f"{file}: field 'config': {e}") from None
    paths = block.get(paths_key)
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths) or not paths:
        raise AdapterLoadError(f"{file}: field '{paths_key}': expected a non-empty list of module paths")
    return config, paths


_PEFT_VARIANTS = {"use_rslora": "rank-stabilised scaling", "use_dora": "DoRA", "rank_pattern": "per-module ranks",
                  "alpha_pattern": "per-module alphas", "layers_to_transform": "a subset of layers",
                  "modules_to_save": "fully trained extra modules"}
"""PEFT LoRA options that change what the weights compute; loaded as plain LoRA they would give
other outputs without a word, so a file that uses one is refused."""


def _refuse_peft_variants(document: dict[str, Any], file: Path) -> None:
    used = [key for key in _PEFT_VARIANTS if document.get(key) not in (None, False, {}, [])]
    if used:
        raise AdapterLoadError(f"{file}: field '{used[0]}': {_PEFT_VARIANTS[used[0]]} is a PEFT LoRA variant "
                               "loramoe does not load (only plain LoRA)")


def _check_base_model(model: nn.Module, block: dict[str, Any], file: Path) -> None:
    """Refuse an adapter recorded as trained on a model of other sizes. Only sizes are compared: a
    local copy of the model has another name_or_path, and a model type of the same layout (Mistral,
    Llama) runs the adapter as well. A size missing on either side (PEFT records none) passes."""
    if "base_model" not in block:
        return
    recorded = _object(block["base_model"], f"{file}: field 'base_model'")
    config = getattr(model, "config", None)
    for name in _BASE_MODEL_SIZES:
        saved, current = recorded.get(name), getattr(config, name, None)
        if saved is None:
            continue
        if not isinstance(saved, int) or isinstance(saved, bool):
            raise AdapterLoadError(f"{file}: field 'base_model.{name}': must be an integer, got {saved!r}")
        if current is not None and saved != current:
            raise AdapterLoadError(f"{file}: field 'base_model.{name}': the adapter was trained on a model with "
                                   f"{name}={saved}, this model has {current}")


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
    unless every check passes (docs/format.md lists them)."""
    directory = Path(directory)
    config_file, weights_file = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    document = _read_document(config_file)
    config, saved_paths = _parse_config(document, config_file)
    _check_base_model(model, document.get("loramoe", document), config_file)
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
            key = layer_class.disk_key(p, local_key)
            if expected.setdefault(key, shape) != shape:  # one tensor shared by modules of different shapes
                raise AdapterLoadError(f"{config_file}: key '{key}' is shared by modules that need shapes "
                                       f"{list(expected[key])} and {list(shape)} ('{p}' needs the second)")
    tensors = _read_checked(weights_file, expected)
    if current is None:
        attach_paths(model, config, paths)
    for path, layer in adapter_layers(model):
        with torch.no_grad():
            for key, param in layer.adapter_state().items():
                param.copy_(tensors[layer_class.disk_key(path, key)])
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
            tensors = {key: f.get_tensor(key) for key in expected}
    except (SafetensorError, OSError) as e:
        raise AdapterLoadError(f"{file}: not a readable safetensors file: {e}") from None
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise AdapterLoadError(f"{file}: key '{key}' holds {tensor.dtype} values, not floating point")
        check_finite(tensor, file, key)
    return tensors


def check_finite(tensor: torch.Tensor, file: Path, key: str) -> None:
    """Refuse NaN or Inf in a floating tensor: a diverged run saves them; they would reach every output."""
    finite = torch.isfinite(tensor.float() if tensor.dtype.itemsize == 1 else tensor)  # no float8 kernel
    if not finite.all():
        raise AdapterLoadError(f"{file}: key '{key}' holds {tensor.numel() - int(finite.sum())} NaN or Inf "
                               f"values (of {tensor.numel()})")
