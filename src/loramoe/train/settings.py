"""``loramoe train``'s settings: the checks made before any work, the adapter config they give,
and the ``train_config.yaml`` that reruns them.

Every value that would make the run do nothing, or something other than it says (zero steps,
a flag that a loaded adapter would silently override), is refused here with a message naming the
flag, before a model is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loramoe.adapters import LAYER_CLASSES, AdapterConfig, LoraMoEConfig, TiedLoraConfig
from loramoe.data_sources import split_folder_spec
from loramoe.errors import UsageError

ADAPTER_FLAGS = {"rank": "r", "alpha": "alpha", "dropout": "dropout", "target_modules": "target_modules",
                 "preset": "preset", "num_experts": "num_experts", "groups": "groups",
                 "balance_delta": "balance_delta", "balance_weight": "balance_weight",
                 "balance_importance": "balance_importance", "route_weight": "route_weight",
                 "route_target": "route_target"}
"""The flags that set the adapter's config, by the config field each sets."""

LORAMOE_ONLY = ("num_experts", "groups", "balance_delta", "balance_weight", "balance_importance",
                "route_weight", "route_target")

NOT_SAVED = ("output", "resume", "overwrite", "callbacks")
"""Settings ``train_config.yaml`` leaves out: they say where a run goes, not what it is, so the
file reruns the run into a new folder instead of clobbering or continuing this one."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_settings(s: Mapping[str, Any]) -> None:
    """Refuse values that would train nothing or contradict each other, naming the flag."""
    if not s["data"]:
        raise UsageError("--data: give at least one training file")
    if s["max_steps"] is not None and s["max_steps"] < 1:
        raise UsageError(f"--max-steps must be at least 1, got {s['max_steps']} (leave it out to train "
                         "--epochs epochs)")
    if s["max_steps"] is None and not (math.isfinite(s["epochs"]) and s["epochs"] > 0):
        raise UsageError(f"--epochs must be above 0, got {s['epochs']}")
    for name in ("batch_size", "grad_accum", "max_length", "save_steps", "logging_steps"):
        if s[name] < 1:
            raise UsageError(f"{_flag(name)} must be at least 1, got {s[name]}")
    if s["save_total_limit"] is not None and s["save_total_limit"] < 1:
        raise UsageError(f"--save-total-limit must be at least 1 (leave it out to keep every checkpoint), "
                         f"got {s['save_total_limit']}")
    if not (math.isfinite(s["lr"]) and s["lr"] >= 0):
        raise UsageError(f"--lr must be a finite number >= 0, got {s['lr']}")
    if not 0.0 <= s["warmup_ratio"] < 1.0:
        raise UsageError(f"--warmup-ratio must be in [0, 1), got {s['warmup_ratio']}")
    method = s["method"]
    foreign = [name for name in LORAMOE_ONLY if s[name] is not None] if method != LoraMoEConfig.method else []
    foreign += ["preset"] if method != TiedLoraConfig.method and s["preset"] is not None else []
    if method == "full":
        foreign += [name for name in ("rank", "alpha", "dropout", "target_modules") if s[name] is not None]
    if foreign:
        raise UsageError(f"{', '.join(_flag(n) for n in foreign)}: not a setting of --method {method}")
    if method == "full" and s["init_adapter"] is not None:
        raise UsageError("--init-adapter: --method full trains the whole model, not an adapter")
    if method == "full" and s["quantize"] is not None:
        raise UsageError(f"--quantize {s['quantize']}: --method full trains the base model's weights, which a "
                         "quantized base keeps frozen; train an adapter (--method loramoe, lora or tied-lora)")
    if (method == LoraMoEConfig.method and s["num_experts"] is not None and s["groups"] is None
            and s["init_adapter"] is None):
        warnings.warn(f"--num-experts {s['num_experts']} without --groups makes one pool of experts: the default "
                      "groups (knowledge: 3, task: 3) are dropped, record types are not used, and the constraint "
                      "only balances the experts. Give --groups (e.g. knowledge=4 task=4) to keep groups.",
                      stacklevel=3)


def adapter_config(s: Mapping[str, Any]) -> AdapterConfig | None:
    """The adapter config the flags ask for (the method's defaults where a flag is left out)."""
    given = {field: s[flag] for flag, field in ADAPTER_FLAGS.items() if s[flag] is not None}
    layer_class = LAYER_CLASSES.get(s["method"])  # None for full fine-tuning
    return layer_class.config_class(**given) if layer_class is not None else None


def check_init_adapter(saved: AdapterConfig, s: Mapping[str, Any], folder: Path) -> None:
    """``--init-adapter`` continues a saved adapter with its own config: a flag given with another
    value would be silently ignored, so it is refused."""
    if saved.method != s["method"]:
        raise UsageError(f"--init-adapter {folder} holds a {saved.method} adapter, not --method {s['method']}")
    differ = []
    for flag, field in ADAPTER_FLAGS.items():
        given = s[flag]
        if given is None or field == "dropout":  # dropout is no part of the weights: it may change
            continue
        have = getattr(saved, field, None)
        if field == "preset" and isinstance(saved, TiedLoraConfig):
            given, have = TiedLoraConfig(preset=given).trains, saved.trains
        if given != have and not (isinstance(have, float) and isinstance(given, (int, float)) and given == have):
            differ.append(f"{_flag(flag)} {given!r} (the adapter has {have!r})")
    if differ:
        raise UsageError(f"--init-adapter {folder}: its config is used as saved, so {'; '.join(differ)} would be "
                         "ignored; leave the flag out or give the adapter's value")


def absolute(path: str | None) -> str | None:
    """A local path made absolute, so a saved config runs from any folder; anything else (a hub id,
    an embedded model's name) as it is."""
    if path is None or not Path(path).exists():
        return path
    return str(Path(path).resolve())


def absolute_source(source: str) -> str:
    """A data source with its local path made absolute (``folder:split`` included; hub ids as they are)."""
    folder = split_folder_spec(source)
    if folder is not None and folder[1] is not None:
        return f"{folder[0].resolve()}:{folder[1]}"
    return absolute(source)


def saved_config(s: Mapping[str, Any]) -> dict[str, Any]:
    """``train_config.yaml``'s content: the flags (dashed, as typed) with absolute paths, no output."""
    kept = {key: value for key, value in s.items() if key not in NOT_SAVED}
    kept["data"] = [absolute_source(str(source)) for source in s["data"]]
    if s.get("val_data"):
        kept["val_data"] = [absolute_source(str(source)) for source in s["val_data"]]
    kept["model"] = absolute(s["model"])
    kept["init_adapter"] = absolute(None if s["init_adapter"] is None else str(s["init_adapter"]))
    return {key.replace("_", "-"): value for key, value in kept.items()}


def adapter_summary(config: AdapterConfig | None) -> dict[str, Any] | None:
    return dataclasses.asdict(config) if config is not None else None
