"""Importing adapters saved by the LoRAMoE paper's code (github.com/Ablustrund/LoRAMoE).

That code is a patched PEFT 0.3: ``save_pretrained`` writes ``adapter_config.json``, PEFT's
``LoraConfig`` (``peft_type: "LORA"``) plus ``lora_nums``, ``blc_alpha`` and ``blc_weight``, and
``adapter_model.bin``, a ``torch.save`` of every parameter whose name holds ``lora_``. Each wrapped
projection at module path ``P`` of the base model has the keys ``base_model.model.P.lora_route.weight``
(E, d_in) and, for each expert i, ``base_model.model.P.lora_A{i}.weight`` (r, d_in) and
``base_model.model.P.lora_B{i}.weight`` (d_out, r). :func:`convert_paper_adapter` writes the same
adapter in loramoe's folder format (docs/format.md, "Importing the paper's adapters").
"""

from __future__ import annotations

import os
import pickle
import re
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from loramoe.adapters import LoraMoEConfig
from loramoe.adapters.base import ConfigFieldError
from loramoe.adapters.loramoe import LoraMoELinear
from loramoe.errors import OutputFolderError, UsageError
from loramoe.fileio import ensure_writable_folder
from loramoe.serialization import (
    CONFIG_NAME,
    AdapterLoadError,
    _read_document,
    check_finite,
    read_adapter_config,
    write_adapter_files,
)

PAPER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
"""The weight files the paper's folder may hold, in the order they are looked for."""
PEFT_PREFIX = "base_model.model."
FIELDS = {"num_experts": "lora_nums", "r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout",
          "balance_delta": "blc_alpha", "balance_weight": "blc_weight", "target_modules": "target_modules"}
"""Our LoraMoEConfig field -> the paper's LoraConfig field it is read from."""
_KEY = re.compile(r"(?P<path>.+)\.lora_(?:route|(?P<kind>[AB])(?P<index>0|[1-9][0-9]*))\.weight")


def paper_groups(num_experts: int) -> dict[str, int] | None:
    """The paper's expert groups: its balancing constraint weights the first ``lora_nums // 2``
    experts 1 + blc_alpha for samples of ``task_type`` 1 (world knowledge, our ``knowledge``) and
    the rest for ``task_type`` 0 (our ``task``). An odd count has no such split (the paper's code
    only runs it with blc_weight 0): one pool without groups."""
    half = num_experts // 2
    return {"knowledge": half, "task": half} if half > 0 and num_experts % 2 == 0 else None


def convert_paper_adapter(src: str | os.PathLike, dst: str | os.PathLike, *,
                          groups: dict[str, int] | None = None) -> Path:
    """Convert the paper's adapter folder ``src`` into a loramoe adapter folder ``dst`` (new or
    empty), which :func:`loramoe.load_adapter` loads onto the same base model with the same outputs.

    The paper's fields map to :class:`~loramoe.adapters.LoraMoEConfig` as follows, each because the
    paper's ``peft/tuners/lora.py`` uses it so: ``lora_nums`` -> ``num_experts`` (one ``lora_A{i}``/
    ``lora_B{i}`` pair per expert); ``r`` -> ``r`` and ``lora_alpha`` -> ``alpha`` (its update is
    ``B_i A_i x * lora_alpha / r``); ``lora_dropout`` -> ``dropout`` (on the experts' input, the
    router reads x as it is; the paper draws a mask per expert, we one shared, which only changes
    training); ``blc_alpha`` -> ``balance_delta`` (its weights 1 +- blc_alpha); ``blc_weight`` ->
    ``balance_weight`` (the constraint's weight in the loss, summed over layers); a missing
    ``blc_*`` is 0, the default of the paper's ``run_loramoe.py``. ``groups`` defaults to
    :func:`paper_groups`. The router is stored in float32 (the paper's softmax runs in float32
    anyway); the experts keep their saved dtype.

    Target paths are the key prefixes without PEFT's ``base_model.model.``. ``adapter_model.bin`` is
    read with ``torch.load(weights_only=True)``, which unpickles tensors and plain containers only.

    Raises:
        AdapterLoadError: a missing or unreadable file, a config that is not the paper's LoRAMoE (a
            plain PEFT LoRA is loaded by ``load_adapter`` as it is), a missing, extra, unknown or
            non-string key, shapes or dtypes that disagree, or NaN or Inf values (which ``load_adapter``
            would refuse); the message names the file and the key or field. Nothing is written then.
        OutputFolderError: ``dst`` is a file, not writable or not empty.
        UsageError: ``groups`` does not hold ``lora_nums`` experts.
    """
    src, dst = Path(src), Path(dst)
    if dst.is_dir() and any(dst.iterdir()):
        raise OutputFolderError(f"{dst}: not empty; convert writes a new adapter folder, give a new or empty one")
    config_file = src / CONFIG_NAME
    if not config_file.is_file():
        raise AdapterLoadError(f"{config_file}: not found (the paper's adapter folder holds {CONFIG_NAME} "
                               "and adapter_model.bin)")
    document = _read_document(config_file)
    config = _paper_config(document, config_file, groups)
    weights_file, state = _read_weights(src)
    tensors, paths = _experts(state, config, weights_file)
    ensure_writable_folder(dst, "dst")
    name = document.get("base_model_name_or_path")
    return write_adapter_files(dst, config, paths, tensors, {"name_or_path": name if isinstance(name, str) else None})


def _paper_config(document: dict[str, Any], file: Path, groups: dict[str, int] | None) -> LoraMoEConfig:
    if "method" in document or "loramoe" in document:
        raise AdapterLoadError(f"{file}: already a loramoe adapter folder; load it with load_adapter")
    if document.get("peft_type") != "LORA":
        raise AdapterLoadError(f"{file}: field 'peft_type': {document.get('peft_type')!r}, the paper's "
                               "LoRAMoE folders have 'LORA'")
    if document.get("lora_nums") is None:
        raise AdapterLoadError(f"{file}: field 'lora_nums': missing, so a plain PEFT LoRA, not the paper's "
                               "LoRAMoE: load_adapter reads it as it is")
    experts = document["lora_nums"]
    if groups is not None:
        LoraMoEConfig(groups=groups)  # the caller's groups are checked apart: a bad one is not the file's fault
    if groups is not None and isinstance(experts, int) and sum(groups.values()) != experts:
        raise UsageError(f"groups {groups} hold {sum(groups.values())} experts; {file} has lora_nums = {experts}")
    values = {ours: document.get(theirs) for ours, theirs in FIELDS.items()}
    for ours in ("balance_delta", "balance_weight"):
        values[ours] = 0.0 if values[ours] is None else values[ours]
    try:
        chosen = groups if groups is not None else paper_groups(experts) if isinstance(experts, int) else None
        return LoraMoEConfig(**values, groups=chosen)
    except ConfigFieldError as e:
        raise AdapterLoadError(f"{file}: field '{FIELDS[e.field]}': {e.problem}") from None
    except UsageError as e:
        mapping = ", ".join(f"{theirs} as {ours}" for ours, theirs in FIELDS.items() if ours != theirs)
        raise AdapterLoadError(f"{file}: {e} (the paper's fields are read as ours: {mapping})") from None


def _read_weights(src: Path) -> tuple[Path, dict[str, Any]]:
    file = next((src / name for name in PAPER_WEIGHTS if (src / name).is_file()), None)
    if file is None:
        raise AdapterLoadError(f"{src / PAPER_WEIGHTS[1]}: not found (nor {PAPER_WEIGHTS[0]})")
    if file.suffix == ".safetensors":
        try:
            return file, load_file(file)
        except (SafetensorError, OSError) as e:
            raise AdapterLoadError(f"{file}: not a readable safetensors file: {e}") from None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdapterLoadError(f"{file}: not a torch file of tensors only ({reason})") from None
    if not isinstance(state, dict):
        raise AdapterLoadError(f"{file}: holds a {type(state).__name__}, not a dict of tensors by key")
    return file, state


def _natural(path: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key putting ``layers.2`` before ``layers.10``."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in path.split("."))


def _paper_key(path: str, part: tuple[str, int]) -> str:
    kind, index = part
    return f"{PEFT_PREFIX}{path}.lora_{kind}{'' if kind == 'route' else index}.weight"


def _experts(state: dict[str, Any], config: LoraMoEConfig, file: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our tensors by disk key, and the target paths, from the paper's state dict."""
    found: dict[str, dict[tuple[str, int], torch.Tensor]] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise AdapterLoadError(f"{file}: key {key!r} ({type(key).__name__}) is not a string: the paper's "
                                   "files map parameter names to tensors")
        match = _KEY.fullmatch(key[len(PEFT_PREFIX):]) if key.startswith(PEFT_PREFIX) else None
        if match is None:
            raise AdapterLoadError(f"{file}: unknown key '{key}': the paper's LoRAMoE keys are "
                                   f"{PEFT_PREFIX}<module>.lora_route.weight, .lora_A<i>.weight and .lora_B<i>.weight "
                                   "(biases and modules_to_save are not imported)")
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise AdapterLoadError(f"{file}: key '{key}' holds {kind} values, not floating point")
        if value.layout != torch.strided:
            raise AdapterLoadError(f"{file}: key '{key}' holds a {value.layout} tensor, not a dense one")
        if value.dim() != 2:
            raise AdapterLoadError(f"{file}: key '{key}' has shape {list(value.shape)}, not a weight matrix's two "
                                   "dimensions")
        check_finite(value, file, key)  # refused here as load_adapter would, before dst is written
        part = (match["kind"], int(match["index"])) if match["kind"] else ("route", 0)
        found.setdefault(match["path"], {})[part] = value
    if not found:
        raise AdapterLoadError(f"{file}: holds no LoRAMoE tensors")
    experts, r = config.num_experts, config.r
    tensors: dict[str, torch.Tensor] = {}
    paths = sorted(found, key=_natural)
    for path in paths:
        parts = found[path]
        extra = min((part for part in parts if part[0] != "route" and part[1] >= experts), key=lambda p: p[1],
                    default=None)
        if extra is not None:
            raise AdapterLoadError(f"{file}: key '{_paper_key(path, extra)}': expert {extra[1]}, but lora_nums "
                                   f"is {experts} (experts 0 to {experts - 1})")
        # lazily: a malformed lora_nums of 10**9 would otherwise build a list of 2 * 10**9 parts
        expected_parts = chain([("route", 0)], ((kind, i) for i in range(experts) for kind in "AB"))
        missing = next((part for part in expected_parts if part not in parts), None)
        if missing is not None:
            what = "the router" if missing[0] == "route" else f"expert {missing[1]} of lora_nums = {experts}"
            raise AdapterLoadError(f"{file}: key '{_paper_key(path, missing)}' missing ({what} of '{path}')")
        d_in, d_out = parts[("route", 0)].shape[-1], parts[("B", 0)].shape[0]
        shapes = {("route", 0): (experts, d_in), **{("A", i): (r, d_in) for i in range(experts)},
                  **{("B", i): (d_out, r) for i in range(experts)}}
        for part, shape in shapes.items():
            if tuple(parts[part].shape) != shape:
                raise AdapterLoadError(f"{file}: key '{_paper_key(path, part)}' has shape {list(parts[part].shape)}, "
                                       f"expected {list(shape)} (r = {r}, lora_nums = {experts}, d_in = {d_in} "
                                       f"from lora_route, d_out = {d_out} from lora_B0)")
            first = (part[0], 0)
            if part[0] != "route" and parts[part].dtype != parts[first].dtype:  # stacked into one tensor
                raise AdapterLoadError(f"{file}: keys '{_paper_key(path, first)}' and '{_paper_key(path, part)}' hold "
                                       f"{parts[first].dtype} and {parts[part].dtype} values: one module's experts "
                                       "must share a dtype")
        tensors[LoraMoELinear.disk_key(path, "router.weight")] = parts[("route", 0)].to(torch.float32, copy=True)
        tensors[LoraMoELinear.disk_key(path, "lora_A")] = torch.stack([parts[("A", i)] for i in range(experts)])
        tensors[LoraMoELinear.disk_key(path, "lora_B")] = torch.stack([parts[("B", i)] for i in range(experts)])
    return tensors, paths


def convert(src: Path, dst: Path, groups: dict[str, int] | None = None) -> dict[str, Any]:
    """Convert an adapter folder of the LoRAMoE paper's code into a loramoe adapter folder.

    The paper's folder holds adapter_config.json (with lora_nums) and adapter_model.bin or
    .safetensors; the result loads with load_adapter and --adapter.

    Args:
        src: the paper's adapter folder (its sft_lora_model).
        dst: a new or empty folder for the loramoe adapter.
        groups: expert groups by sample type, e.g. {"knowledge": 4, "task": 4}; default: the paper's
            split, the first half of the experts for task_type 1 (knowledge), the rest for 0 (task).
    """
    out = convert_paper_adapter(src, dst, groups=groups)
    config, paths = read_adapter_config(out)
    print(f"converted {src} -> {out}: {config.num_experts} experts of rank {config.r} on {len(paths)} "
          f"projections, groups {config.groups}")
    return {"output": str(out), "num_experts": config.num_experts, "groups": config.groups, "target_paths": paths}
