"""loramoe: fine-tune causal LMs with LoRA, Tied LoRA and LoRAMoE without destroying their world knowledge."""

from loramoe import models
from loramoe.adapters import LoraConfig, LoraMoEConfig, MergeError, TiedLoraConfig
from loramoe.attach import (
    adapter_config,
    adapter_layers,
    attach,
    detach,
    disabled_adapters,
    merge,
    trainable_parameters,
    unmerge,
)
from loramoe.export import export_lora
from loramoe.routing import capture_routing
from loramoe.serialization import AdapterLoadError, load_adapter, save_adapter
from loramoe.targets import TargetError

__all__ = [
    "AdapterLoadError",
    "LoraConfig",
    "LoraMoEConfig",
    "MergeError",
    "TargetError",
    "TiedLoraConfig",
    "adapter_config",
    "adapter_layers",
    "attach",
    "capture_routing",
    "detach",
    "disabled_adapters",
    "export_lora",
    "load_adapter",
    "merge",
    "models",
    "save_adapter",
    "trainable_parameters",
    "unmerge",
]
