"""LoRAMoE (arXiv 2312.09979): several LoRA experts per frozen projection, mixed by a dense router.

Every adapted projection gets its own router ``W_g`` (E, d_in, float32) and E experts stored
concatenated: ``lora_A`` (E, r, d_in), ``lora_B`` (E, d_out, r). Initialisation follows the
reference code: ``A_i`` and ``W_g`` kaiming-uniform (a = sqrt(5)), ``B_i`` zeros, so the model
starts exactly equal to the base. The maths lives in :mod:`loramoe.functional` (plain form),
:mod:`loramoe.fused` (the production op) and :mod:`loramoe.router` (the gates, which both use).

Projections that read the same input (a Llama MLP's ``gate_proj`` and ``up_proj``, see
:data:`SHARED_INPUT_NAMES`) run as one group: whichever is called first computes
both, in one fused op with one dropout mask, and hands its sibling the result, which the sibling
returns when the model calls it with that same input tensor (same object, not modified in place
since). The model's own forward code runs unchanged, so any call order, a sibling called with
other inputs or alone, and recomputation under gradient checkpointing all stay correct.

Over a quantized base (:mod:`loramoe.quantized`) the group still runs as one op for the experts and
routers, but the base product is the quantized layer's own forward (bitsandbytes' kernel and
backward), added to the op's output: gradients reach x through both.

The router depends on the input, so LoRAMoE cannot be merged into W0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from loramoe.adapters.base import SUPPORTED_BASE_LAYERS, AdapterConfig, AdapterLayer, MergeError
from loramoe.balance import IMPORTANCE_MODES
from loramoe.errors import UsageError
from loramoe.functional import dropout_positions, loramoe_delta
from loramoe.fused import Member, inference_plan, loramoe_group, loramoe_group_inference
from loramoe.quantized import is_quantized
from loramoe.router import router_gates

RoutingHook = Callable[["LoraMoELinear", Tensor], None]

SHARED_INPUT_NAMES: tuple[frozenset[str], ...] = (
    frozenset({"gate_proj", "up_proj"}),  # Llama, Mistral, Qwen2, Gemma, ... MLPs
    frozenset({"q_proj", "k_proj", "v_proj"}),  # their attention, when targeted
    frozenset({"w1", "w3"}),  # Mixtral's experts
)
"""Sibling module names that read the same input in the architectures that use them."""


def shared_input_groups(paths: list[str]) -> list[list[str]]:
    """The paths, among ``paths``, that form a group of :data:`SHARED_INPUT_NAMES` under one parent
    (two or more members), in the given order."""
    groups: dict[tuple[str, frozenset[str]], list[str]] = {}
    for path in paths:
        parent, _, name = path.rpartition(".")
        for names in SHARED_INPUT_NAMES:
            if name in names:
                groups.setdefault((parent, names), []).append(path)
    return [group for group in groups.values() if len(group) > 1]


@dataclass
class LoraMoEConfig(AdapterConfig):
    """A mixture of LoRA experts per target projection (defaults from the paper)."""

    method: ClassVar[str] = "loramoe"

    num_experts: int | None = None
    """Experts per adapted projection. None: the sum of ``groups``."""

    groups: dict[str, int] | None = None
    """Expert groups for the balancing constraint and the routing objective, by the sample type
    each serves, in expert order: ``{"knowledge": 3, "task": 3}`` makes experts 0-2 the knowledge
    group. None with ``num_experts`` None: the paper's two groups of 3; None with ``num_experts``
    set: one pool without groups, where the constraint is plain importance balancing."""

    r: int = 4
    """Rank of each expert."""

    alpha: float = 32.0
    """Scale numerator: each expert's update is multiplied by alpha / r."""

    dropout: float = 0.05
    """Dropout on the experts' input (one mask shared by all experts); the router sees x unchanged."""

    balance_delta: float = 0.1
    """delta of the balancing constraint: an expert's importance for a sample of its own group's
    type is weighted 1 + delta, for other typed samples 1 - delta."""

    balance_weight: float = 0.1
    """beta: weight of the balancing constraint (summed over LoRAMoE layers) in the training loss;
    0 turns it off. The constraint balances the experts; at its minimum a typed sample gives its
    own group slightly less than an even share ((1 - delta) / 2 with two equal groups)."""

    balance_importance: str = "mean"
    """A sample's importance Q in the constraint: ``"mean"``, its gate sums divided by its
    non-padding token count, so every sample weighs the same as in the reference code (which sums
    over padding); ``"sum"``, the raw sums, which let sample length into the constraint."""

    route_weight: float = 0.0
    """Weight of the routing objective (not in the paper, see :func:`loramoe.balance.group_routing_loss`)
    summed over LoRAMoE layers in the training loss: it pulls each typed sample's gate mass
    towards ``route_target`` on its own group. 0 turns it off."""

    route_target: float = 0.9
    """Share of a typed sample's gate mass the routing objective sends to its own group; the rest
    is spread evenly over the other groups."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.groups is None and self.num_experts is None:
            self.groups = {"knowledge": 3, "task": 3}
        if self.groups is not None:
            if not self.groups or any(not isinstance(n, int) or n < 1 for n in self.groups.values()):
                raise UsageError(f"groups must map each sample type to a positive expert count, got {self.groups}")
            total = sum(self.groups.values())
            if self.num_experts is not None and self.num_experts != total:
                raise UsageError(f"num_experts is {self.num_experts} but groups {self.groups} hold {total} experts")
            self.num_experts = total
        if self.num_experts < 1:
            raise UsageError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 0.0 <= self.balance_delta < 1.0:
            raise UsageError(f"balance_delta must be in [0, 1), got {self.balance_delta}")
        if self.balance_weight < 0:
            raise UsageError(f"balance_weight must be >= 0, got {self.balance_weight}")
        if self.balance_importance not in IMPORTANCE_MODES:
            raise UsageError(f"balance_importance must be one of {', '.join(IMPORTANCE_MODES)}, "
                             f"got {self.balance_importance!r}")
        if self.route_weight < 0:
            raise UsageError(f"route_weight must be >= 0, got {self.route_weight}")
        if not 0.0 < self.route_target < 1.0:
            raise UsageError(f"route_target must be in (0, 1), got {self.route_target}")
        if self.route_weight > 0 and (self.groups is None or len(self.groups) < 2):
            raise UsageError(f"route_weight > 0 routes samples to their type's group: it needs groups "
                             f"with at least 2 sample types, got groups={self.groups}")
        if self.r < 1:
            raise UsageError(f"r must be >= 1, got {self.r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def expert_groups(self) -> list[int]:
        """For each expert, the index of its group in ``groups`` (-1 for all without groups)."""
        if self.groups is None:
            return [-1] * self.num_experts
        return [g for g, size in enumerate(self.groups.values()) for _ in range(size)]


class LoraMoELinear(AdapterLayer):
    """A frozen linear (or Conv1D) layer plus a router-weighted mixture of LoRA experts.

    ``routing_hook``, when set (see :mod:`loramoe.routing`), receives the float32 gates
    (..., E) of every forward; when None the forward does no extra work.
    """

    config_class = LoraMoEConfig
    display_name = "LoRAMoE"

    def __init__(self, base_layer: nn.Module, config: LoraMoEConfig) -> None:
        super().__init__(base_layer)
        self.scale = config.scale
        self.dropout = config.dropout
        self.routing_hook: RoutingHook | None = None
        self.input_siblings: tuple[LoraMoELinear, ...] = ()
        """Adapter layers that read the same input as this one (set by ``build_layers``)."""
        # (x, x's version, output, the group's gates, our index in them) that a sibling computed for us
        self._handed: tuple | None = None
        self._inference_plan: tuple | None = None  # (key, InferencePlan) for generation without autograd
        self._quantized_base = is_quantized(base_layer)
        dtype = self.parameter_dtype(base_layer, config)
        device = base_layer.weight.device
        e, r = config.num_experts, config.r
        self.router = nn.Linear(self.in_features, e, bias=False, device=device, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.empty(e, r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(e, self.out_features, r, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.router.weight, a=math.sqrt(5))
        for expert_A in self.lora_A.data:  # per expert: fan_in is d_in, as for an nn.Linear(d_in, r)
            nn.init.kaiming_uniform_(expert_A, a=math.sqrt(5))

    @classmethod
    def build_layers(cls, bases: dict[str, nn.Module], config: AdapterConfig) -> dict[str, LoraMoELinear]:
        layers = super().build_layers(bases, config)
        for group in shared_input_groups(list(layers)):
            for path in group:
                layers[path].input_siblings = tuple(layers[p] for p in group if p != path)
        return layers

    @property
    def num_experts(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x)
        # the hand-off is written straight into __dict__: nn.Module.__setattr__ checks parameters,
        # buffers and modules first, which costs more than a decoded token's adapter maths
        state = self.__dict__
        handed, state["_handed"] = state["_handed"], None
        member = None  # the fused op gives the group's gates (..., K, E); ours is picked only if a hook wants it
        if handed is not None and handed[0] is x and handed[1] == x._version:
            out, gates, member = handed[2], handed[3], handed[4]
        elif self._fusable(x) and not (torch.compiler.is_compiling() and not torch.is_grad_enabled()):
            group = [self, *(s for s in self.input_siblings if s._fusable(x) and s.training == self.training)]
            outs, gates = self._run_group(x, group)
            for i, sibling in enumerate(group[1:], 1):
                sibling.__dict__["_handed"] = (x, x._version, outs[i], gates, i)
            out, member = outs[0], 0
        else:  # a base the op can't fold in (hooks, trainable, other dtype), or generation under
            # torch.compile, where plain maths lets inductor fuse the adapter and CUDA graphs remove
            # its launches, and the group's caches and hand-offs would only break the graph: plain ops
            gates = router_gates(x, self.router.weight)  # (..., E) float32
            out = self.base_layer(x) + loramoe_delta(x.to(self.lora_A.dtype), gates, self.lora_A, self.lora_B,
                                                     self.scale, self.dropout, self.training).to(x.dtype)
        if self.routing_hook is not None:
            self.routing_hook(self, gates if member is None else gates[..., member, :])
        return out

    def _fusable(self, x: Tensor) -> bool:
        """Whether the fused op can compute this layer for x: an active adapter in x's dtype over a
        frozen, hook-free nn.Linear or Conv1D base in x's dtype (the op calls no base module), or
        over a quantized base (whose own module runs beside the op). Reads the module dicts
        directly: this runs for every layer and decoded token, where nn.Module's attribute lookup
        would cost more than the check."""
        if self.merged or self.disabled or self._parameters["lora_A"].dtype != x.dtype:
            return False
        if self._quantized_base:
            return True
        base = self._modules["base_layer"]
        weight, bias = base._parameters["weight"], base._parameters.get("bias")
        return (type(base) in SUPPORTED_BASE_LAYERS
                and not base._forward_hooks and not base._forward_pre_hooks and "forward" not in base.__dict__
                and not weight.requires_grad and (bias is None or not bias.requires_grad)
                and weight.dtype == x.dtype)

    def _member(self) -> Member:
        base, params = self._modules["base_layer"], self._parameters
        router = self._modules["router"]._parameters["weight"]
        if self._quantized_base:  # the op computes the experts only: see _run_group
            return Member(None, None, router, params["lora_A"], params["lora_B"])
        weight = base._parameters["weight"]
        return Member(weight.T if isinstance(base, Conv1D) else weight, base._parameters.get("bias"), router,
                      params["lora_A"], params["lora_B"])

    def _run_group(self, x: Tensor, group: list[LoraMoELinear]) -> tuple[list[Tensor], Tensor]:
        members = [layer._member() for layer in group]
        device = x.device.type
        if torch.is_autocast_enabled(device):
            # the op's in-place accumulations and custom backward are not autocast-aware: run it in
            # the autocast dtype throughout, as autocast would run each of its matmuls (the casts
            # are differentiable, so the parameters' gradients come back in their own dtype)
            dtype = torch.get_autocast_dtype(device)
            members = [Member(*(None if t is None else t.to(dtype) for t in m)) for m in members]
            with torch.autocast(device, enabled=False):
                outs, gates = self._run_members(x.to(dtype), members)
        else:
            outs, gates = self._run_members(x, members)
        # a quantized weight is unpacked only by its own module's kernels, which also carry the
        # gradient to x through the base: its product is added here (out of place: the op's outputs
        # are views of its own, which autograd does not let change in place)
        for i, layer in enumerate(group):
            if layer._quantized_base:
                outs[i] = layer._modules["base_layer"](x) + outs[i]
        return outs, gates

    def _run_members(self, x: Tensor, members: list[Member]) -> tuple[list[Tensor], Tensor]:
        training = self.training and self.dropout > 0
        if torch.is_grad_enabled() or training:
            drop = dropout_positions(x.shape, self.dropout, x.device) if training else None
            return loramoe_group(x, members, self.scale, drop, 1.0 / (1.0 - self.dropout) if training else 1.0)
        # generation: no autograd node, the experts laid out once and kept until a tensor changes
        key = (x.dtype, *((t.data_ptr(), t._version) for m in members for t in m if t is not None))
        if self._inference_plan is None or self._inference_plan[0] != key:
            self._inference_plan = (key, inference_plan(members, x.dtype, self.scale))
        return loramoe_group_inference(x, self._inference_plan[1])

    def train(self, mode: bool = True) -> LoraMoELinear:
        # the inference plan is keyed on the tensors' version counters, which fused optimizers
        # (AdamW(fused=True), the Trainer's default) do not bump: an evaluation between training
        # steps would reuse the experts laid out before the steps. Every switch of mode drops it.
        self._inference_plan = None
        return super().train(mode)

    def adapter_delta(self, x: Tensor) -> Tensor:
        return loramoe_delta(x.to(self.lora_A.dtype), router_gates(x, self.router.weight), self.lora_A,
                             self.lora_B, self.scale, self.dropout, self.training)

    def delta_weight(self) -> Tensor:
        raise MergeError("LoRAMoE cannot be merged: its router mixes the experts differently for "
                         "every input token, so there is no single weight update to fold into W0")

    @classmethod
    def parameter_shapes(cls, d_in: int, d_out: int, config: LoraMoEConfig) -> dict[str, tuple[int, ...]]:
        e, r = config.num_experts, config.r
        return {"router.weight": (e, d_in), "lora_A": (e, r, d_in), "lora_B": (e, d_out, r)}
