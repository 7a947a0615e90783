"""Adapter kinds, one module each, and the table that maps a method name to its classes."""

from loramoe.adapters.base import AdapterConfig, AdapterLayer, MergeError
from loramoe.adapters.lora import LoraConfig, LoraLinear
from loramoe.adapters.loramoe import LoraMoEConfig, LoraMoELinear
from loramoe.adapters.tied_lora import TiedLoraConfig, TiedLoraLinear

LAYER_CLASSES: dict[str, type[AdapterLayer]] = {
    LoraConfig.method: LoraLinear,
    LoraMoEConfig.method: LoraMoELinear,
    TiedLoraConfig.method: TiedLoraLinear,
}

__all__ = ["AdapterConfig", "AdapterLayer", "MergeError", "LoraConfig", "LoraLinear",
           "LoraMoEConfig", "LoraMoELinear", "TiedLoraConfig", "TiedLoraLinear", "LAYER_CLASSES"]
