"""Adapter kinds, one module each, and the table that maps a method name to its layer class.

The table is the one list of kinds: attaching, saving and loading, and ``loramoe train``'s
``--method`` read it, so a new kind is its module plus one entry here.
"""

from loramoe.adapters.base import AdapterConfig, AdapterLayer, MergeError
from loramoe.adapters.lora import LoraConfig, LoraLinear
from loramoe.adapters.loramoe import LoraMoEConfig, LoraMoELinear
from loramoe.adapters.tied_lora import TiedLoraConfig, TiedLoraLinear

LAYER_CLASSES: dict[str, type[AdapterLayer]] = {  # in the order ``loramoe train --help`` lists them
    LoraMoEConfig.method: LoraMoELinear,
    LoraConfig.method: LoraLinear,
    TiedLoraConfig.method: TiedLoraLinear,
}

__all__ = ["LAYER_CLASSES", "AdapterConfig", "AdapterLayer", "LoraConfig", "LoraLinear", "LoraMoEConfig",
           "LoraMoELinear", "MergeError", "TiedLoraConfig", "TiedLoraLinear"]
