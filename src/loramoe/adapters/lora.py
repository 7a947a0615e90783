"""LoRA (arXiv 2106.09685): ``y = W0 x + (alpha / r) B A dropout(x)``.

Initialisation as in PEFT and the LoRA paper: ``A`` kaiming-uniform (a = sqrt(5)), ``B`` zeros, so
the adapted model starts equal to the base. Saved in PEFT's own format (see docs/format.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from loramoe.adapters.base import AdapterConfig, AdapterLayer
from loramoe.errors import UsageError
from loramoe.functional import lora_delta, lora_delta_weight

PEFT_PREFIX = "base_model.model."
PEFT_FIELDS = {"r": ("r", 8), "alpha": ("lora_alpha", 8), "dropout": ("lora_dropout", 0.0)}
"""PEFT's key and default for each LoraConfig field a plain PEFT file sets."""


@dataclass
class LoraConfig(AdapterConfig):
    """Low-rank adaptation of each target projection."""

    method: ClassVar[str] = "lora"

    r: int = 8
    """Rank of the update."""

    alpha: float = 16.0
    """Scale numerator: the update is multiplied by alpha / r."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r < 1:
            raise UsageError(f"r must be >= 1, got {self.r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


class LoraLinear(AdapterLayer):
    """A frozen linear (or Conv1D) layer with a LoRA update."""

    config_class = LoraConfig
    display_name = "LoRA"

    def __init__(self, base_layer: nn.Module, config: LoraConfig) -> None:
        super().__init__(base_layer)
        self.scale = config.scale
        self.dropout = config.dropout
        dtype = self.parameter_dtype(base_layer, config)
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(config.r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.r, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def adapter_delta(self, x: Tensor) -> Tensor:
        return lora_delta(x.to(self.lora_A.dtype), self.lora_A, self.lora_B, self.scale,
                          self.dropout, self.training)

    def delta_weight(self) -> Tensor:
        return lora_delta_weight(self.lora_A, self.lora_B, self.scale)

    @classmethod
    def parameter_shapes(cls, d_in: int, d_out: int, config: LoraConfig) -> dict[str, tuple[int, ...]]:
        return {"lora_A": (config.r, d_in), "lora_B": (d_out, config.r)}

    @classmethod
    def disk_key(cls, path: str, local_key: str) -> str:
        return f"{PEFT_PREFIX}{path}.{local_key}.weight"  # PEFT's layout: lora_A/lora_B are nn.Linear submodules there

    @classmethod
    def config_document(cls, config: LoraConfig, block: dict[str, Any],
                        layers: list[tuple[str, AdapterLayer]]) -> dict[str, Any]:
        """PEFT's config, so ``peft.PeftModel.from_pretrained`` loads the folder, with loramoe's block in it."""
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM",
                **{key: getattr(config, name) for name, (key, _) in PEFT_FIELDS.items()},
                "target_modules": block["target_paths"], "base_model_name_or_path": block["base_model"]["name_or_path"],
                "bias": "none", "fan_in_fan_out": any(isinstance(layer.base_layer, Conv1D) for _, layer in layers),
                "use_rslora": False, "inference_mode": True, "loramoe": block}
