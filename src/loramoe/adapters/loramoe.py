"""LoRAMoE (arXiv 2312.09979): several LoRA experts per frozen projection, mixed by a dense router.

Every adapted projection gets its own router ``W_g`` (E, d_in, float32) and E experts stored
concatenated: ``lora_A`` (E, r, d_in), ``lora_B`` (E, d_out, r). Initialisation follows the
reference code: ``A_i`` and ``W_g`` kaiming-uniform (a = sqrt(5)), ``B_i`` zeros, so the model
starts exactly equal to the base. The maths lives in :mod:`loramoe.functional`.

The router depends on the input, so LoRAMoE cannot be merged into W0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from loramoe.adapters.base import AdapterConfig, AdapterLayer, MergeError
from loramoe.functional import loramoe_delta, loramoe_inplace, router_gates

RoutingHook = Callable[["LoraMoELinear", Tensor], None]


@dataclass
class LoraMoEConfig(AdapterConfig):
    """A mixture of LoRA experts per target projection (defaults from the paper)."""

    method: ClassVar[str] = "loramoe"

    num_experts: int | None = None
    """Experts per adapted projection. None: the sum of ``groups``."""

    groups: dict[str, int] | None = None
    """Expert groups for the localized balancing constraint, by the sample type each serves, in
    expert order: ``{"knowledge": 3, "task": 3}`` makes experts 0-2 the knowledge group. None with
    ``num_experts`` None: the paper's two groups of 3; None with ``num_experts`` set: one pool
    without groups, where the constraint is plain importance balancing."""

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
    0 turns it off."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.groups is None and self.num_experts is None:
            self.groups = {"knowledge": 3, "task": 3}
        if self.groups is not None:
            if not self.groups or any(not isinstance(n, int) or n < 1 for n in self.groups.values()):
                raise ValueError(f"groups must map each sample type to a positive expert count, got {self.groups}")
            total = sum(self.groups.values())
            if self.num_experts is not None and self.num_experts != total:
                raise ValueError(f"num_experts is {self.num_experts} but groups {self.groups} hold {total} experts")
            self.num_experts = total
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 0.0 <= self.balance_delta < 1.0:
            raise ValueError(f"balance_delta must be in [0, 1), got {self.balance_delta}")
        if self.balance_weight < 0:
            raise ValueError(f"balance_weight must be >= 0, got {self.balance_weight}")
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")

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

    def __init__(self, base_layer: nn.Module, config: LoraMoEConfig) -> None:
        super().__init__(base_layer)
        self.scale = config.scale
        self.dropout = config.dropout
        self.routing_hook: RoutingHook | None = None
        dtype = self.parameter_dtype(base_layer, config)
        device = base_layer.weight.device
        e, r = config.num_experts, config.r
        self.router = nn.Linear(self.in_features, e, bias=False, device=device, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.empty(e, r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(e, self.out_features, r, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.router.weight, a=math.sqrt(5))
        for expert_A in self.lora_A.data:  # per expert: fan_in is d_in, as for an nn.Linear(d_in, r)
            nn.init.kaiming_uniform_(expert_A, a=math.sqrt(5))

    @property
    def num_experts(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        if self.merged or self.disabled:
            return out
        # the fused path writes into the base output, which must be a tensor of its own: GPT-2's
        # Conv1D returns a view, which autograd can't let a two-output function modify in place
        if out.dtype == x.dtype == self.lora_A.dtype and not out._is_view():
            out, gates = loramoe_inplace(out, x, self.router.weight, self.lora_A, self.lora_B, self.scale,
                                         self.dropout, self.training)
        else:
            gates = router_gates(x, self.router.weight)  # (..., E) float32
            out = out + loramoe_delta(x.to(self.lora_A.dtype), gates, self.lora_A, self.lora_B, self.scale,
                                      self.dropout, self.training).to(out.dtype)
        if self.routing_hook is not None:
            self.routing_hook(self, gates)
        return out

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
