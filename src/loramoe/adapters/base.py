"""What every adapter kind shares: wrapping a frozen base layer, exact merge/unmerge, on/off.

An adapter layer replaces a frozen ``nn.Linear`` (weight (d_out, d_in)) or a GPT-2 style
``Conv1D`` (weight (d_in, d_out), transposed) in place, or a bitsandbytes 4-bit or 8-bit
``nn.Linear`` (see :mod:`loramoe.quantized`). It keeps the base layer as its ``base_layer`` child
and adds ``adapter_delta(x)`` to the base output. Kinds subclass
``AdapterLayer`` once and implement ``adapter_delta`` and, where the update is a fixed matrix,
``delta_weight``; a kind whose files follow another layout overrides ``disk_key`` and
``config_document``. A kind is its module plus its entry in ``loramoe.adapters.LAYER_CLASSES``.
"""

from __future__ import annotations

import math
import numbers
import sys
import types
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Union, get_args, get_origin, get_type_hints

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from loramoe.errors import LoramoeError, UsageError
from loramoe.quantized import compute_dtype, is_quantized

SUPPORTED_BASE_LAYERS = (nn.Linear, Conv1D)
ADAPTER_DTYPES = ("float32", "bfloat16", "float16", "float64")
"""The dtypes an adapter's parameters may have (or an alias, ``"half"``): they are trained, so
floating, and each layer initialises them with kernels that integer and float8 dtypes lack."""


class MergeError(LoramoeError, ValueError):
    """Raised when an adapter cannot be folded into the base weight."""


class ConfigFieldError(UsageError):
    """A config field holds a value of the wrong type, or a float that is not finite."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the annotated type ``hint`` (and finite, for a float)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_fits(value, arm) for arm in args)
    if origin is list:  # a tuple works wherever the list is read, and Python callers pass them
        return isinstance(value, (list, tuple)) and all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    if hint in (int, float) and isinstance(value, bool):  # True is an int to Python, never a count or a scale
        return False
    if hint is int:
        return isinstance(value, numbers.Integral)
    if hint is float:  # an int scale (PEFT writes lora_alpha as one) is fine; NaN or Inf would reach the outputs
        return isinstance(value, numbers.Real) and abs(value) <= sys.float_info.max  # False for NaN too
    return value is None if hint is type(None) else isinstance(value, hint)


@dataclass
class AdapterConfig:
    """Fields every adapter kind has. Subclasses set ``method`` and add their own fields."""

    method: ClassVar[str] = ""

    target_modules: list[str] | str | None = None
    """Module names (a path or its last components, e.g. ``"mlp.down_proj"``) or one regex matched
    against the full module path. None: the MLP projections of the model's architecture."""

    dropout: float = 0.0
    """Dropout on the adapter's input; the base layer and the router see the input unchanged."""

    dtype: str | None = None
    """Adapter parameter dtype (``"float32"``, ``"bfloat16"``, ...). None: the base weight's dtype (for a
    quantized base, the dtype it computes in: see :func:`loramoe.quantized.compute_dtype`)."""

    def __post_init__(self) -> None:
        # before any range check, which would compare "4" with 1 and fail with a TypeError
        hints = get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            if not _fits(value, hints[f.name]):
                problem = (f"must be finite, got {value}" if isinstance(value, float) and not math.isfinite(value)
                           else f"must be of type {f.type}, got {value!r}")
                raise ConfigFieldError(f.name, problem)
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.dtype is not None and getattr(torch, self.dtype, None) not in map(torch.__dict__.get, ADAPTER_DTYPES):
            raise ConfigFieldError("dtype", f"must be one of {', '.join(ADAPTER_DTYPES)}, got {self.dtype!r}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise UsageError("target_modules must not be an empty list")


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a supported base layer."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, Conv1D):
        d_in, d_out = layer.weight.shape
        return d_in, d_out
    raise TypeError(f"unsupported base layer {type(layer).__name__}; expected nn.Linear or Conv1D")


class AdapterLayer(nn.Module):
    """A frozen base layer plus a trainable update. ``merge``/``unmerge`` are idempotent and exact:
    merging keeps a copy of W0, so unmerging restores it bit for bit (at the cost of one copy of
    the adapted weights while merged)."""

    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig
    display_name: ClassVar[str] = "adapter"
    """The kind's name in reports and plots."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = layer_shape(base_layer)
        self.merged = False
        self.disabled = False
        self._unmerged_weight: Tensor | None = None

    @classmethod
    def build_layers(cls, bases: dict[str, nn.Module], config: AdapterConfig) -> dict[str, AdapterLayer]:
        """One adapter layer per base layer, by module path. Kinds whose layers share tensors
        (Tied LoRA) override this to create the shared tensors once for a group of paths."""
        return {path: cls(base, config) for path, base in bases.items()}

    @staticmethod
    def parameter_dtype(base_layer: nn.Module, config: AdapterConfig) -> torch.dtype:
        if config.dtype:
            return getattr(torch, config.dtype)
        return compute_dtype(base_layer) if is_quantized(base_layer) else base_layer.weight.dtype

    def adapter_delta(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def delta_weight(self) -> Tensor:
        """The update as a (d_out, d_in) matrix to add to W0."""
        raise MergeError(f"{type(self).__name__} has no fixed weight update to merge")

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        if self.merged or self.disabled:
            return out
        return out + self.adapter_delta(x).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if is_quantized(self.base_layer):
            raise MergeError(f"cannot merge into the quantized base layer {type(self.base_layer).__name__}: its "
                             "weight is stored as packed integers, which a float update cannot be folded into. The "
                             "adapter is the same file whatever the base's precision: load the base unquantized, "
                             "load the adapter onto it, and merge there")
        delta = self.delta_weight()
        weight = self.base_layer.weight
        self._unmerged_weight = weight.detach().clone()
        weight += (delta.T if isinstance(self.base_layer, Conv1D) else delta).to(weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base_layer.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged = False

    def adapter_state(self) -> dict[str, Tensor]:
        """This layer's adapter tensors by their local key (e.g. ``lora_A``, ``router.weight``)."""
        return {k: v for k, v in self.state_dict(keep_vars=True).items()
                if not k.startswith("base_layer.")}

    @classmethod
    def parameter_shapes(cls, d_in: int, d_out: int, config: AdapterConfig) -> dict[str, tuple[int, ...]]:
        """The shapes ``adapter_state`` will have, known before the layer exists (used to
        validate a saved adapter before the model is touched)."""
        raise NotImplementedError

    @classmethod
    def disk_key(cls, path: str, local_key: str) -> str:
        """The safetensors key of the tensor ``local_key`` (an ``adapter_state`` key) of the layer at
        module path ``path``. Tensors that several layers share have one key, so they are written once."""
        return f"{path}.{local_key}"

    @classmethod
    def config_document(cls, config: AdapterConfig, block: dict[str, Any],
                        layers: list[tuple[str, AdapterLayer]]) -> dict[str, Any]:
        """What ``adapter_config.json`` holds for an adapter of ``config`` on ``layers`` (path, layer),
        given loramoe's own ``block`` (method, config, target paths, base model)."""
        return block
