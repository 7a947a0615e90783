"""loramoe: fine-tune causal LMs with LoRA and LoRAMoE without destroying their world knowledge."""

from loramoe import models
from loramoe.adapters import LoraConfig, LoraMoEConfig, MergeError
from loramoe.attach import (adapter_config, adapter_layers, attach, detach, disabled_adapters, merge,
                            trainable_parameters, unmerge)
from loramoe.routing import capture_routing
from loramoe.serialization import AdapterLoadError, load_adapter, save_adapter
from loramoe.targets import TargetError

__all__ = [
    "models",
    "LoraConfig", "LoraMoEConfig", "attach", "detach", "merge", "unmerge", "save_adapter",
    "load_adapter", "trainable_parameters", "adapter_config", "adapter_layers", "disabled_adapters",
    "capture_routing", "AdapterLoadError", "MergeError", "TargetError",
]
