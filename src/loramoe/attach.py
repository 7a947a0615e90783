"""Putting adapters into a model and taking them out again: one place for every adapter kind.

``attach`` replaces each target module in place with the adapter layer of the config's method,
freezes everything else and remembers the config on the model as ``model.loramoe_config``.
One adapter per model: attach twice is an error; ``detach`` first.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from torch import nn

from loramoe.adapters import LAYER_CLASSES, AdapterConfig, AdapterLayer
from loramoe.errors import UsageError
from loramoe.targets import find_targets

M = TypeVar("M", bound=nn.Module)

_CONFIG_ATTR = "loramoe_config"
_REQUIRES_GRAD_ATTR = "_loramoe_requires_grad"
_HF_ADAPTERS_ATTR = "_hf_peft_config_loaded"
"""transformers' mark of a model with trainable adapters, set by its PEFT integration: its Trainer
refuses to train a quantized model without it."""


def adapter_config(model: nn.Module) -> AdapterConfig | None:
    """The config of the adapter attached to ``model``, or None."""
    return getattr(model, _CONFIG_ATTR, None)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """(path, layer) of every adapter layer, in model order."""
    for path, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield path, module


def attach(model: M, config: AdapterConfig) -> M:
    """Wrap the target modules of ``model`` with ``config``'s adapter, in place, and freeze
    everything but the adapter's trainable tensors. Returns the same model."""
    _require_no_adapter(model)
    return attach_paths(model, config, find_targets(model, config.target_modules))


def attach_paths(model: M, config: AdapterConfig, paths: list[str]) -> M:
    """``attach`` at the given module paths (already resolved and checked)."""
    _require_no_adapter(model)
    layer_class = LAYER_CLASSES.get(config.method)
    if layer_class is None:
        raise UsageError(f"unknown adapter method {config.method!r}; known: {sorted(LAYER_CLASSES)}")
    bases = {path: model.get_submodule(path) for path in paths}
    layers = layer_class.build_layers(bases, config)  # may refuse the targets: before the model changes
    setattr(model, _REQUIRES_GRAD_ATTR, {n: p.requires_grad for n, p in model.named_parameters()})
    model.requires_grad_(False)  # the new layers are not in the model yet: their tensors keep requires_grad
    for path, layer in layers.items():
        parent, name = _parent(model, path)
        setattr(parent, name, layer.train(bases[path].training))  # keep eval mode (dropout off)
    setattr(model, _CONFIG_ATTR, config)
    if getattr(model, "is_quantized", False):
        setattr(model, _HF_ADAPTERS_ATTR, True)
    return model


def detach(model: M, *, merged: bool = False) -> M:
    """Put the plain base modules back and restore their ``requires_grad``. With ``merged=True``
    the adapter is first folded into the base weights (LoRA-like kinds only), so the returned
    plain model computes what the adapted one did."""
    if adapter_config(model) is None:
        raise UsageError("model has no loramoe adapter to detach")
    layers = list(adapter_layers(model))
    if merged:
        for _, layer in layers:
            layer.merge()
    for path, layer in layers:
        if not merged:
            layer.unmerge()
        layer._unmerged_weight = None
        parent, name = _parent(model, path)
        setattr(parent, name, layer.base_layer)
    for name, param in model.named_parameters():
        param.requires_grad_(getattr(model, _REQUIRES_GRAD_ATTR).get(name, param.requires_grad))
    delattr(model, _CONFIG_ATTR)
    delattr(model, _REQUIRES_GRAD_ATTR)
    vars(model).pop(_HF_ADAPTERS_ATTR, None)
    return model


def merge(model: M) -> M:
    """Fold every adapter layer's update into its base weight (idempotent; ``unmerge`` undoes it
    exactly). Raises MergeError for LoRAMoE, whose router depends on the input, and for a quantized
    base, whose packed weight cannot take a float update."""
    layers = [layer for _, layer in adapter_layers(model)]
    if not layers:
        raise UsageError("model has no loramoe adapter to merge")
    for layer in layers:  # one kind per model: a kind that can't merge fails on the first layer, unchanged
        layer.merge()
    return model


def unmerge(model: M) -> M:
    """Restore every base weight exactly as it was before ``merge``."""
    for _, layer in adapter_layers(model):
        layer.unmerge()
    return model


@contextmanager
def disabled_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model without its adapter inside the block (no second copy of the model)."""
    layers = [layer for _, layer in adapter_layers(model)]
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous):
            layer.disabled = was


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,d} || all params: {self.total:,d} "
                f"|| trainable%: {100 * self.share:.4f}")


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """Trainable and total parameter counts; a tensor shared by several modules counts once."""
    params = list(model.parameters())  # parameters() yields each shared tensor once
    return ParameterCount(sum(p.numel() for p in params if p.requires_grad),
                          sum(p.numel() for p in params))


def _require_no_adapter(model: nn.Module) -> None:
    if adapter_config(model) is not None:
        raise UsageError(f"model already has a {adapter_config(model).method} adapter; detach() it first")


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), name
