"""Which experts serve which kind of input: gate mass per expert, per layer, per benchmark.

For each named set of prompts, the gates of every LoRAMoE layer are summed over the prompts'
non-padding tokens and divided by the token count, giving each expert's share of the gate mass
(a row sums to 1). Saved as JSON and drawn as a heatmap PNG, with the expert groups marked, so a
reader sees whether the knowledge group serves knowledge questions and the task group tasks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from loramoe.adapters import LoraMoEConfig
from loramoe.attach import adapter_config
from loramoe.errors import UsageError
from loramoe.fileio import atomic_write_text
from loramoe.inference import eval_mode
from loramoe.plots import pyplot, save_figure
from loramoe.routing import capture_routing


@torch.no_grad()
def gate_shares(model: nn.Module, tokenizer, prompts: Mapping[str, Sequence[str]], *, batch_size: int = 8,
                max_length: int = 256) -> dict:
    """``{"experts": E, "groups": {...}, "layers": [paths], "sets": {name: {"tokens": n,
    "per_layer": [[share per expert] per layer], "mean": [share per expert]}}}``."""
    config = adapter_config(model)
    if not isinstance(config, LoraMoEConfig):
        raise UsageError("gate_shares needs a model with a LoRAMoE adapter attached")
    device = next(model.parameters()).device
    result: dict = {"experts": config.num_experts, "groups": config.groups, "layers": [], "sets": {}}
    with eval_mode(model, tokenizer, padding_side="right"):
        for name, texts in prompts.items():
            if not texts:
                raise UsageError(f"gate_shares: the prompt set {name!r} is empty")
            sums, tokens = None, 0
            with capture_routing(model) as routing:
                for start in range(0, len(texts), batch_size):
                    batch = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True,
                                      truncation=True, max_length=max_length).to(device)
                    model(**batch)
                    result["layers"] = result["layers"] or list(routing.gates)
                    per_layer = torch.stack([v[-1].sum(0) for v in routing.layers.values()])  # (layers, E)
                    sums = per_layer if sums is None else sums + per_layer
                    tokens += int(batch["attention_mask"].sum())
                    routing.clear()
            shares = sums / tokens
            result["sets"][name] = {"tokens": tokens, "per_layer": shares.tolist(), "mean": shares.mean(0).tolist()}
    return result


def group_share(result: dict, set_name: str) -> dict[str, float]:
    """Share of a prompt set's gate mass per expert group (averaged over layers)."""
    mean = result["sets"][set_name]["mean"]
    groups = result["groups"] or {"all": result["experts"]}
    shares, start = {}, 0
    for group, size in groups.items():
        shares[group] = sum(mean[start:start + size])
        start += size
    return shares


def save_gate_shares(result: dict, directory: str | os.PathLike, stem: str = "router") -> tuple[Path, Path]:
    """``<stem>.json`` and ``<stem>.png`` (one heatmap of layers x experts per prompt set, and a
    summary of sets x experts), both written atomically."""
    plt = pyplot()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, png_path = directory / f"{stem}.json", directory / f"{stem}.png"
    atomic_write_text(json_path, json.dumps(result, indent=2) + "\n")

    names = list(result["sets"])
    experts = result["experts"]
    bounds = []
    if result["groups"]:
        edge = 0
        for size in list(result["groups"].values())[:-1]:
            edge += size
            bounds.append(edge - 0.5)
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(3.4 * (len(names) + 1), 4.5), squeeze=False,
                             layout="constrained")
    vmax = max(max(max(row) for row in result["sets"][n]["per_layer"]) for n in names)
    for ax, name in zip(axes[0], names):
        image = ax.imshow(result["sets"][name]["per_layer"], aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("LoRAMoE layer")
        ax.set_xticks(range(experts))
        for b in bounds:
            ax.axvline(b, color="white", linewidth=1.5)
    summary = axes[0][-1]
    summary.imshow([result["sets"][n]["mean"] for n in names], aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
    summary.set_title("mean over layers", fontsize=9)
    summary.set_yticks(range(len(names)), names, fontsize=8)
    summary.set_xticks(range(experts))
    summary.set_xlabel("expert")
    for b in bounds:
        summary.axvline(b, color="white", linewidth=1.5)
    if result["groups"]:
        fig.suptitle("gate share per expert; groups: " + ", ".join(f"{g} ({n})" for g, n in result["groups"].items()),
                     fontsize=10)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="share of gate mass")
    save_figure(fig, png_path)
    return json_path, png_path
