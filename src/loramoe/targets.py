"""Which modules of a model an adapter wraps: defaults per architecture family, user overrides."""

from __future__ import annotations

import re

from torch import nn

from loramoe.adapters.base import SUPPORTED_BASE_LAYERS, AdapterLayer
from loramoe.errors import LoramoeError

_LLAMA_MLP = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]

DEFAULT_TARGETS: dict[str, list[str]] = {
    **{t: _LLAMA_MLP for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                               "olmo", "olmo2", "granite", "smollm3", "cohere", "starcoder2")},
    "phi3": ["mlp.gate_up_proj", "mlp.down_proj"],
    "gpt2": ["mlp.c_fc", "mlp.c_proj"],  # Conv1D; the attention block has a c_proj too
    "gpt_neox": ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
    "phi": ["mlp.fc1", "mlp.fc2"],
    "gptj": ["mlp.fc_in", "mlp.fc_out"],
    "falcon": ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
    "bloom": ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
    "opt": ["fc1", "fc2"],
    # the routed experts are 3D tensors, not linear layers: the shared expert, which every token
    # passes through, and the dense MLP of the layers in mlp_only_layers
    "qwen2_moe": [*_LLAMA_MLP, "shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj"],
}
"""The feed-forward projections of each family, as LoRAMoE places its experts (docs/method.md,
section 1.1 "The layer")."""


class TargetError(LoramoeError, ValueError):
    """No module, or an unsupported module, matched the requested targets."""


def linear_layer_names(model: nn.Module) -> list[str]:
    """Distinct last-two-component names of the model's linear layers, for error messages."""
    names = {".".join(n.split(".")[-2:]) for n, m in model.named_modules()
             if isinstance(m, SUPPORTED_BASE_LAYERS)}
    return sorted(names)


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    known = sorted({name for names in DEFAULT_TARGETS.values() for name in names})
    return [n for n in known if any(_name_matches(path, n) for path, _ in model.named_modules())]


def _expert_tensors(model: nn.Module) -> str | None:
    """The path of the first mixture-of-experts block whose experts are stored as 3D tensors (one
    slice per expert, as transformers 5 stores Mixtral's, OLMoE's, Qwen3-MoE's), which no adapter
    layer can wrap; None if the model has none."""
    return next((path for path, module in model.named_modules()
                 if path.endswith("experts") and any(p.dim() == 3 for p in module.parameters(recurse=False))), None)


def _name_matches(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)


def find_targets(model: nn.Module, target_modules: list[str] | str | None) -> list[str]:
    """Paths of the modules to wrap, in model order. A list matches a path or its trailing
    components; a string is a regex matched against the whole path. Raises TargetError when
    nothing matches, or when a match is not a linear layer."""
    targets = default_targets(model) if target_modules is None else target_modules
    if isinstance(targets, str):
        pattern = re.compile(targets)
        matches = lambda path: pattern.fullmatch(path) is not None
    else:
        matches = lambda path: any(_name_matches(path, t) for t in targets)
    found = []
    for path, module in model.named_modules():
        if not path or not matches(path) or ".base_layer" in path:
            continue
        if isinstance(module, AdapterLayer):
            raise TargetError(f"module '{path}' already has an adapter; detach() it first")
        if not isinstance(module, SUPPORTED_BASE_LAYERS):
            raise TargetError(f"target '{path}' is a {type(module).__name__}; adapters wrap "
                              "nn.Linear or Conv1D layers only")
        found.append(path)
    if not found:
        model_type = getattr(getattr(model, "config", None), "model_type", "unknown")
        what = (f"target_modules={target_modules!r} matches no module of this {model_type} model"
                if target_modules is not None else
                f"no default feed-forward targets are known for model type '{model_type}'")
        experts = _expert_tensors(model)
        if experts is not None:
            what += f" (its feed-forward experts, {experts} and the like, are 3D tensors, not linear layers)"
        raise TargetError(
            f"{what}. "
            f"Its linear layers are: {', '.join(linear_layer_names(model)) or 'none'}. "
            "Pass target_modules with some of these names, or a regex over module paths.")
    return found
