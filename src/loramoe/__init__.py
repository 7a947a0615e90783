"""loramoe: fine-tune causal LMs with LoRA, Tied LoRA and LoRAMoE without destroying their world knowledge."""

import logging

# bitsandbytes, once installed (loramoe[quant]), is imported by peft and transformers whenever they
# are, and on CPUs with AVX512-BF16 warns at import that it cannot fetch a hub kernel: a kernel
# loramoe never uses (quantized.keep_gradients_on_cpu switches that path off), on every command
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

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
