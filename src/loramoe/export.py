"""Exporting an adapter as a plain LoRA in PEFT's format, so it runs wherever a PEFT LoRA runs
(PEFT, vLLM, ...), without loramoe.

Tied LoRA's update of each layer is the LoRA pair ``A_l = diag(u_l) A``, ``B_l = s diag(v_l) B``
of the same rank, written per layer with ``lora_alpha = r`` (PEFT's scale 1: ``s`` is in ``B_l``).
The sharing is lost on the way: the folder holds L pairs where the Tied LoRA folder holds one.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from loramoe.adapters import LoraConfig, LoraLinear, MergeError, TiedLoraConfig
from loramoe.attach import adapter_config, adapter_layers
from loramoe.errors import UsageError
from loramoe.serialization import save_adapter, write_adapter_folder


def export_lora(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the attached adapter to ``directory`` as a PEFT LoRA folder (``load_adapter`` reads it
    back as a ``lora`` adapter). LoRA is saved as it is; LoRAMoE raises MergeError."""
    config = adapter_config(model)
    if config is None:
        raise UsageError("model has no loramoe adapter to export")
    if isinstance(config, LoraConfig):
        return save_adapter(model, directory)
    if not isinstance(config, TiedLoraConfig):
        raise MergeError(f"a {config.method} adapter has no plain LoRA form: its router mixes the experts "
                         "differently for every input token")
    lora = LoraConfig(r=config.r, alpha=float(config.r), dropout=config.dropout,
                      target_modules=config.target_modules, dtype=config.dtype)
    tensors = {}
    for path, layer in adapter_layers(model):
        for key, factor in zip(("lora_A", "lora_B"), layer.lora_factors()):
            # copied: with u frozen, diag(u) A is the shared A itself, and a LoRA file owns each layer's pair
            tensors[LoraLinear.disk_key(path, key)] = factor.detach().clone().contiguous().cpu()
    return write_adapter_folder(model, directory, lora, tensors)
