"""Capturing what the LoRAMoE routers did, without changing the model's forward signature.

Usage::

    with capture_routing(model) as routing:          # per-sample sums over non-padding tokens
        model(input_ids=ids, attention_mask=mask)
    routing.layers["model.layers.0.mlp.gate_proj"]   # list of (batch, E) float32 sums, one per forward
    routing.token_counts                             # list of (batch,) non-padding token counts
    routing.gates, routing.masks                     # the (batch, seq, E) gates and the masks themselves

While no capture is active each LoRAMoE layer only tests one attribute for None, so the forward is
not slowed. The attention mask is read by a forward pre-hook on the model; with a KV cache the
mask covers past tokens too and its last ``seq`` columns are used. Only layers run inside a forward
of ``model`` itself are recorded, so a region recomputed during backward (gradient checkpointing),
after that forward returned, is not recorded again; and the hook only keeps references during the
forward (sums are taken on access), so a checkpointed region saves the same tensors each time.
``keep_graph=True`` keeps the gates attached to the autograd graph, for losses over them (the
balancing constraint).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from loramoe.adapters import LoraMoELinear
from loramoe.errors import UsageError


@dataclass
class RoutingRecord:
    per_token: bool
    gates: dict[str, list[Tensor]] = field(default_factory=dict)
    """Per LoRAMoE layer path, one (batch, seq, E) float32 gate tensor per forward."""
    masks: list[Tensor | None] = field(default_factory=list)
    """Per forward, the (batch, seq) attention mask of the new tokens, or None when none was given."""

    @property
    def layers(self) -> dict[str, list[Tensor]]:
        """Per layer, one tensor per forward: the (batch, E) gate sums over non-padding tokens, or
        with ``per_token`` the (batch, seq, E) gates. Sums are taken here, after the forward, so
        nothing extra is recorded inside a checkpointed region."""
        if self.per_token:
            return self.gates
        return {path: [g.sum(-2) if m is None else (g * m.unsqueeze(-1)).sum(-2) for g, m in zip(values, self.masks)]
                for path, values in self.gates.items()}

    @property
    def token_counts(self) -> list[Tensor]:
        """Per forward, the (batch,) count of non-padding tokens the sums cover."""
        first = next(iter(self.gates.values()), [])
        return [g.new_full(g.shape[:1], g.shape[1]) if m is None else m.sum(-1) for g, m in zip(first, self.masks)]

    def sample_gates(self) -> dict[str, Tensor]:
        """Per layer, all forwards' per-sample gate sums concatenated: (samples, E)."""
        if self.per_token:
            raise UsageError("sample_gates() needs capture_routing(per_token=False)")
        return {path: torch.cat(values) for path, values in self.layers.items()}

    def clear(self) -> None:
        self.gates.clear()
        self.masks.clear()


@contextmanager
def capture_routing(model: nn.Module, *, per_token: bool = False,
                    keep_graph: bool = False) -> Iterator[RoutingRecord]:
    """Record the gates of every LoRAMoE layer of ``model`` during the ``with`` block."""
    layers = {path: m for path, m in model.named_modules() if isinstance(m, LoraMoELinear)}
    if not layers:
        raise UsageError("capture_routing: the model has no LoRAMoE layer")
    busy = [path for path, m in layers.items() if m.routing_hook is not None]
    if busy:
        raise RuntimeError(f"capture_routing: layer '{busy[0]}' is already being captured")
    record = RoutingRecord(per_token=per_token)
    # set by the model's hooks, read by the layers' hooks
    state: dict = {"mask": None, "batch": 1, "new_forward": False, "in_forward": False}

    def read_mask(_module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], Tensor):
            mask = args[1]
        state["mask"] = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
        inputs = next((t for t in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args[:1])
                       if isinstance(t, Tensor)), None)
        state["batch"] = (state["mask"].shape[0] if state["mask"] is not None else
                          inputs.shape[0] if inputs is not None and inputs.dim() >= 2 else 1)
        state["new_forward"] = state["in_forward"] = True

    def end_forward(*_) -> None:
        state["in_forward"] = False

    def make_hook(path: str):
        def hook(_layer: LoraMoELinear, gates: Tensor) -> None:
            # not "is a backward running?", which torch has no public way to ask: a region that
            # gradient checkpointing recomputes in backward runs after the model's forward returned
            if not state["in_forward"]:
                return
            if not keep_graph:
                gates = gates.detach()
            if gates.dim() == 2:  # (batch * seq, E): a block that flattens the tokens (Qwen2-MoE's shared expert)
                gates = gates.reshape(state["batch"], -1, gates.shape[-1])
            if state["new_forward"]:
                state["new_forward"] = False
                mask = state["mask"]
                record.masks.append(None if mask is None else mask[:, -gates.shape[-2]:].to(gates.dtype))
            record.gates.setdefault(path, []).append(gates)
        return hook

    handles = [model.register_forward_pre_hook(read_mask, with_kwargs=True),
               model.register_forward_hook(end_forward, always_call=True)]
    for path, layer in layers.items():
        layer.routing_hook = make_hook(path)
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()
        for layer in layers.values():
            layer.routing_hook = None
