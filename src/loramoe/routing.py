"""Capturing what the LoRAMoE routers did, without changing the model's forward signature.

Usage::

    with capture_routing(model) as routing:          # per-sample sums over non-padding tokens
        model(input_ids=ids, attention_mask=mask)
    routing.layers["model.layers.0.mlp.gate_proj"]   # list of (batch, E) float32 tensors, one per forward
    routing.token_counts                             # list of (batch,) non-padding token counts

    with capture_routing(model, per_token=True) as routing:
        ...                                          # (batch, seq, E) gates per forward; .masks holds the masks

While no capture is active each LoRAMoE layer only tests one attribute for None, so the forward is
not slowed. The attention mask is read by a forward pre-hook on the model; with a KV cache the
mask covers past tokens too and its last ``seq`` columns are used. Forwards recomputed during
backward (gradient checkpointing) are not recorded again. ``keep_graph=True`` keeps the gates
attached to the autograd graph, for losses over them (the balancing constraint).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from loramoe.adapters import LoraMoELinear


@dataclass
class RoutingRecord:
    per_token: bool
    layers: dict[str, list[Tensor]] = field(default_factory=dict)
    """Per LoRAMoE layer path, one tensor per forward: (batch, E) sums, or (batch, seq, E) gates."""
    token_counts: list[Tensor] = field(default_factory=list)
    """Per forward, the (batch,) count of non-padding tokens the sums cover."""
    masks: list[Tensor | None] = field(default_factory=list)
    """Per forward, the (batch, seq) attention mask of the new tokens, or None when none was given."""

    def sample_gates(self) -> dict[str, Tensor]:
        """Per layer, all forwards' per-sample gate sums concatenated: (samples, E)."""
        if self.per_token:
            raise ValueError("sample_gates() needs capture_routing(per_token=False)")
        return {path: torch.cat(values) for path, values in self.layers.items()}

    def clear(self) -> None:
        self.layers.clear()
        self.token_counts.clear()
        self.masks.clear()


def _in_backward() -> bool:
    """True while autograd runs a backward pass, i.e. during a checkpointed recomputation."""
    return torch._C._current_graph_task_id() != -1


@contextmanager
def capture_routing(model: nn.Module, *, per_token: bool = False,
                    keep_graph: bool = False) -> Iterator[RoutingRecord]:
    """Record the gates of every LoRAMoE layer of ``model`` during the ``with`` block."""
    layers = {path: m for path, m in model.named_modules() if isinstance(m, LoraMoELinear)}
    if not layers:
        raise ValueError("capture_routing: the model has no LoRAMoE layer")
    busy = [path for path, m in layers.items() if m.routing_hook is not None]
    if busy:
        raise RuntimeError(f"capture_routing: layer '{busy[0]}' is already being captured")
    record = RoutingRecord(per_token=per_token)
    state: dict = {"mask": None, "new_forward": False}  # set by the model's pre-hook, read by the layers

    def read_mask(_module, args, kwargs):
        if _in_backward():
            return
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], Tensor):
            mask = args[1]
        state["mask"] = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
        state["new_forward"] = True

    def make_hook(path: str):
        def hook(_layer: LoraMoELinear, gates: Tensor) -> None:
            if _in_backward():
                return
            if not keep_graph:
                gates = gates.detach()
            if gates.dim() == 2:  # (tokens, E) without a batch dimension: one sample
                gates = gates.unsqueeze(0)
            mask = state["mask"]
            seq = gates.shape[-2]
            mask = None if mask is None else mask[:, -seq:].to(gates.dtype)  # (batch, seq)
            if state["new_forward"] or not record.token_counts:
                state["new_forward"] = False
                record.masks.append(mask)
                record.token_counts.append(
                    mask.sum(-1) if mask is not None else gates.new_full(gates.shape[:1], seq))
            if per_token:
                record.layers.setdefault(path, []).append(gates)
            else:
                weighted = gates if mask is None else gates * mask.unsqueeze(-1)  # (batch, seq, E)
                record.layers.setdefault(path, []).append(weighted.sum(-2))
        return hook

    handle = model.register_forward_pre_hook(read_mask, with_kwargs=True)
    for path, layer in layers.items():
        layer.routing_hook = make_hook(path)
    try:
        yield record
    finally:
        handle.remove()
        for layer in layers.values():
            layer.routing_hook = None
