"""Tied LoRA (arXiv 2311.09578): one low-rank pair shared by every layer, scaled per layer.

Targets are tied by name, the path after the layer index (``model.layers.3.mlp.up_proj`` is
``mlp.up_proj``): every layer's module of that name uses the same ``A`` (r, d_in) and ``B``
(d_out, r), the same ``nn.Parameter`` objects, and has its own ``u`` (r) and ``v`` (d_out)::

    y = W0 x + s * v * (B (u * (A dropout(x)))),    s = alpha / r   (alpha = r by default: s = 1)

    x --dropout--> A --(r)--* u --> B --(d_out)--* s v --> + W0 x
                   `- shared by all layers -'

Selective training: four switches say which of A, B, u, v train. A frozen u or v is 1 and is not
stored at all; frozen A and B are random (kaiming-uniform from torch's generator, as VeRA's) and
are saved with the adapter like trained ones, so no seed has to reproduce them. The model starts
equal to the base because exactly one trained factor starts at zero: B when it trains (A
kaiming-uniform, u = v = 1, as in the paper), otherwise v (B random, as in VeRA), otherwise u,
otherwise A. Every layer's update is a fixed matrix, so it merges exactly, and it is a plain LoRA
pair ``(diag(u) A, s diag(v) B)`` of the same rank, which is how it is exported (``export_lora``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import ClassVar

import torch
from torch import Tensor, nn

from loramoe.adapters.base import AdapterConfig, AdapterLayer, layer_shape
from loramoe.errors import UsageError
from loramoe.functional import tied_lora_delta, tied_lora_delta_weight, untied_factors

FACTORS = "ABuv"

ALIASES = {"TL5": "AB", "TL6": "ABuv", "vera": "uv"}
"""Preset aliases: the paper's TL5 (tied A, B; u = v = 1) and TL6 (tied A, B and per-layer u, v),
and the VeRA-like configuration (arXiv 2310.11454: frozen random A, B; per-layer u, v)."""

PRESETS = ["".join(c) for k in range(1, len(FACTORS) + 1) for c in combinations(FACTORS, k)]
"""Presets named by what they train: the trained tensors' letters in the order A, B, u, v."""

TIED_PREFIX = "tied."


@dataclass
class TiedLoraConfig(AdapterConfig):
    """Tied LoRA: one (A, B) pair per target name shared by every layer, per-layer vectors u, v."""

    method: ClassVar[str] = "tied-lora"

    r: int = 8
    """Rank of the shared pair."""

    alpha: float | None = None
    """Scale numerator: the update is multiplied by alpha / r. None: r (scale 1, as in the paper)."""

    preset: str | None = None
    """What trains: the trained tensors' letters in the order A, B, u, v (``"ABuv"``, ``"uv"``,
    ``"Bv"``...) or an alias, ``TL6`` (ABuv), ``TL5`` (AB), ``vera`` (uv). None: the switches say;
    TL6 when no switch is set either."""

    train_A: bool | None = None
    """Train the shared A (r, d_in); frozen, it stays random. None: as the preset says, else False."""

    train_B: bool | None = None
    """Train the shared B (d_out, r); frozen, it stays random. None: as the preset says, else False."""

    train_u: bool | None = None
    """Train the per-layer u (r); frozen, u is 1 and not stored. None: as the preset says, else False."""

    train_v: bool | None = None
    """Train the per-layer v (d_out); frozen, v is 1 and not stored. None: as the preset says, else False."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r < 1:
            raise UsageError(f"r must be >= 1, got {self.r}")
        if self.alpha is None:
            self.alpha = float(self.r)
        switches = dict(zip(FACTORS, (self.train_A, self.train_B, self.train_u, self.train_v)))
        if self.preset is not None:
            trains = ALIASES.get(self.preset, self.preset)
            if trains not in PRESETS:
                raise UsageError(f"preset must be {', '.join(ALIASES)} or the trained tensors' letters in the "
                                 f"order A, B, u, v ('ABuv', 'AB', 'uv', 'Bv', ...), got {self.preset!r}")
            for factor, given in switches.items():
                if given is not None and given != (factor in trains):
                    raise UsageError(f"train_{factor}={given} contradicts preset {self.preset!r}, which trains "
                                     f"{', '.join(trains)}")
        elif all(given is None for given in switches.values()):
            trains = ALIASES["TL6"]
        else:
            trains = "".join(factor for factor, given in switches.items() if given)
        if not trains:
            raise UsageError("TiedLoraConfig trains nothing: set train_A, train_B, train_u or train_v to True, "
                             f"or a preset ({', '.join(ALIASES)}, or letters such as 'ABuv')")
        self.train_A, self.train_B, self.train_u, self.train_v = (factor in trains for factor in FACTORS)

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    @property
    def trains(self) -> str:
        """The trained tensors' letters in the order A, B, u, v, e.g. ``"ABuv"`` for TL6."""
        flags = (self.train_A, self.train_B, self.train_u, self.train_v)
        return "".join(factor for factor, on in zip(FACTORS, flags) if on)

    @property
    def zero_factor(self) -> str:
        """The factor that starts at zero so the model starts equal to the base: the first trained of
        B (as in LoRA and the paper), v (as in VeRA), u, A. The others all start non-zero, so the
        zero factor's gradient is not zero and training moves away from the base."""
        return next(factor for factor in "BvuA" if factor in self.trains)


def tie_name(path: str) -> str:
    """The name modules are tied by: the path after its first numeric component, the layer index
    (``model.layers.3.mlp.up_proj`` -> ``mlp.up_proj``). A path without one is its own name."""
    parts = path.split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    return path if index is None or index == len(parts) - 1 else ".".join(parts[index + 1:])


def tie_groups(shapes: dict[str, tuple[int, int]]) -> dict[str, list[str]]:
    """Module paths by tie name, in the given order, from each path's (d_in, d_out). Raises
    ValueError when the modules of one name differ in shape: one pair cannot serve them all."""
    groups: dict[str, list[str]] = {}
    for path in shapes:
        groups.setdefault(tie_name(path), []).append(path)
    for name, paths in groups.items():
        first_of_shape: dict[tuple[int, int], str] = {}
        for path in paths:
            first_of_shape.setdefault(shapes[path], path)
        if len(first_of_shape) > 1:
            found = "; ".join(f"{p} has (d_in, d_out) = {shape}" for shape, p in first_of_shape.items())
            raise UsageError(f"Tied LoRA shares one (A, B) pair by all modules named '{name}', but their shapes "
                             f"differ: {found}. Choose target_modules whose modules of one name have one shape.")
    return groups


def tied_pair(d_in: int, d_out: int, config: TiedLoraConfig, dtype: torch.dtype,
              device: torch.device) -> tuple[nn.Parameter, nn.Parameter]:
    """A new shared (A, B), trainable as the config says, initialised as the module docstring says."""
    lora_A = torch.empty(config.r, d_in, dtype=dtype, device=device)
    lora_B = torch.empty(d_out, config.r, dtype=dtype, device=device)
    for factor, tensor in (("A", lora_A), ("B", lora_B)):
        if factor == config.zero_factor:
            nn.init.zeros_(tensor)
        else:  # as nn.Linear and PEFT's LoRA and VeRA do
            nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
    return (nn.Parameter(lora_A, requires_grad=config.train_A),
            nn.Parameter(lora_B, requires_grad=config.train_B))


def _scaling_vector(size: int, factor: str, config: TiedLoraConfig, dtype: torch.dtype,
                    device: torch.device) -> nn.Parameter | None:
    if factor not in config.trains:
        return None
    value = 0.0 if factor == config.zero_factor else 1.0
    return nn.Parameter(torch.full((size,), value, dtype=dtype, device=device))


class TiedLoraLinear(AdapterLayer):
    """A frozen linear (or Conv1D) layer with a Tied LoRA update. ``lora_A`` and ``lora_B`` are the
    pair of its tie name, the same objects in every layer; ``lora_u``/``lora_v`` are None when frozen."""

    config_class = TiedLoraConfig
    display_name = "Tied LoRA"

    def __init__(self, base_layer: nn.Module, config: TiedLoraConfig, lora_A: nn.Parameter,
                 lora_B: nn.Parameter) -> None:
        super().__init__(base_layer)
        if (lora_A.shape[1], lora_B.shape[0]) != (self.in_features, self.out_features):
            raise UsageError(f"the tied pair is for (d_in, d_out) = ({lora_A.shape[1]}, {lora_B.shape[0]}), "
                             f"the layer has ({self.in_features}, {self.out_features})")
        self.scale = config.scale
        self.dropout = config.dropout
        self.lora_A = lora_A
        self.lora_B = lora_B
        self.register_parameter("lora_u", _scaling_vector(config.r, "u", config, lora_A.dtype, lora_A.device))
        self.register_parameter("lora_v", _scaling_vector(self.out_features, "v", config, lora_A.dtype,
                                                          lora_A.device))

    @classmethod
    def build_layers(cls, bases: dict[str, nn.Module], config: TiedLoraConfig) -> dict[str, TiedLoraLinear]:
        groups = tie_groups({path: layer_shape(base) for path, base in bases.items()})
        layers = {}
        for paths in groups.values():
            first = bases[paths[0]]
            pair = tied_pair(*layer_shape(first), config, cls.parameter_dtype(first, config), first.weight.device)
            layers.update({path: cls(bases[path], config, *pair) for path in paths})
        return {path: layers[path] for path in bases}

    def adapter_delta(self, x: Tensor) -> Tensor:
        return tied_lora_delta(x.to(self.lora_A.dtype), self.lora_A, self.lora_B, self.lora_u, self.lora_v,
                               self.scale, self.dropout, self.training)

    def delta_weight(self) -> Tensor:
        return tied_lora_delta_weight(self.lora_A, self.lora_B, self.lora_u, self.lora_v, self.scale)

    def lora_factors(self) -> tuple[Tensor, Tensor]:
        """This layer's update as a plain LoRA pair of scale 1, (r, d_in) and (d_out, r)."""
        return untied_factors(self.lora_A, self.lora_B, self.lora_u, self.lora_v, self.scale)

    @classmethod
    def disk_key(cls, path: str, local_key: str) -> str:
        """The shared pair is written once per tie name; u and v per layer."""
        if local_key in ("lora_A", "lora_B"):
            return f"{TIED_PREFIX}{tie_name(path)}.{local_key}"
        return super().disk_key(path, local_key)

    @classmethod
    def parameter_shapes(cls, d_in: int, d_out: int, config: TiedLoraConfig) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {"lora_A": (config.r, d_in), "lora_B": (d_out, config.r)}
        if config.train_u:
            shapes["lora_u"] = (config.r,)
        if config.train_v:
            shapes["lora_v"] = (d_out,)
        return shapes
