"""The models a server answers for: the base model once, and each adapter on a twin of it.

A twin is a second module tree whose parameters and buffers *are* the base model's tensors (a deep
copy that reuses every tensor instead of copying it), with one adapter attached. Attaching
replaces modules of the twin only, so the base model stays plain and every adapter has its own
modules, while the large weights exist once in memory: serving five adapters costs five adapters,
not five models. Requests for different adapters can then run one after the other without
swapping anything in or out of a shared model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from loramoe import models
from loramoe.adapters import LoraMoEConfig
from loramoe.attach import adapter_config
from loramoe.errors import UsageError
from loramoe.generate.main import check_adapter_folder
from loramoe.generate.routing_strip import group_names
from loramoe.serialization import load_adapter

DEFAULT_CONTEXT = 2048
"""The context assumed for a model whose config names none."""


@dataclass
class ServedModel:
    """One name a request may ask for: the base model, or the base model with one adapter."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    kind: str
    """``"base"``, or the adapter's method (``"lora"``, ``"loramoe"``, ``"tied_lora"``)."""
    groups: list[str]
    """A LoRAMoE adapter's expert groups (each expert, for one pool without groups); else empty."""
    context: int
    """The most tokens a prompt and its completion may hold together."""


def context_length(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """The model's context: its config's position limit, else the tokenizer's, else a default."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**9 else DEFAULT_CONTEXT


def twin(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules that shares every parameter and buffer with it."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo=shared)


class Registry:
    """The served models by name, the base model first."""

    def __init__(self, base: ServedModel) -> None:
        self.base_name = base.name
        self._models = {base.name: base}

    def names(self) -> list[str]:
        return list(self._models)

    def get(self, name: str) -> ServedModel:
        """The model served under ``name``; KeyError for a name not served."""
        return self._models[name]

    def add_adapter(self, name: str, folder: Path) -> ServedModel:
        """Serve ``folder``'s adapter under ``name``, on a twin of the base model."""
        if name in self._models:
            raise UsageError(f"--adapter {name}={folder}: the name '{name}' is served already; give each a new name")
        base = self._models[self.base_name]
        model = load_adapter(twin(base.model), folder).eval()
        config = adapter_config(model)
        groups = group_names(config) if isinstance(config, LoraMoEConfig) else []
        served = ServedModel(name, model, base.tokenizer, config.method, groups, base.context)
        self._models[name] = served
        return served

    @classmethod
    def from_model(cls, name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   adapters: dict[str, Path] | None = None) -> Registry:
        """A registry over a loaded model and the adapter folders by name."""
        registry = cls(ServedModel(name, model.eval(), tokenizer, "base", [], context_length(model, tokenizer)))
        for adapter_name, folder in (adapters or {}).items():
            registry.add_adapter(adapter_name, Path(folder))
        return registry


def adapter_names(specs: list[str]) -> dict[str, Path]:
    """``--adapter`` values by name: ``NAME=DIR``, or ``DIR`` served under the path as given."""
    named: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep:
            name, folder = spec.rstrip("/"), spec
        if not name or not folder:
            raise UsageError(f"--adapter {spec}: give NAME=DIR or DIR")
        if name in named:
            raise UsageError(f"--adapter {spec}: the name '{name}' is given twice")
        check_adapter_folder(Path(folder), spec)
        named[name] = Path(folder)
    return named


def load_registry(model: str, adapters: list[str], *, dtype: str | None = None, quantize: str | None = None,
                  trust_remote_code: bool = False) -> Registry:
    """The base model ``model`` (embedded name, folder or hub id) and the ``--adapter`` folders."""
    named = adapter_names(adapters)
    if model in named:
        raise UsageError(f"--adapter {model}=...: '{model}' is the base model's name; name the adapter otherwise")
    loaded, tokenizer = models.load(model, dtype=dtype, quantize=quantize, trust_remote_code=trust_remote_code)
    return Registry.from_model(model, loaded, tokenizer, named)
