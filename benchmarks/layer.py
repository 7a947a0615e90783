"""CPU step time (forward + backward + AdamW step) of a stack of Llama MLP blocks: frozen base,
LoRA of rank E*r, the loop-reference LoRAMoE and the production LoRAMoE, as ratios to frozen.

    python benchmarks/layer.py [--blocks 4] [--dropout 0] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.reference

from loramoe import LoraConfig, LoraMoEConfig, attach  # noqa: E402
from tests.reference import loramoe_delta_loop  # noqa: E402

PROJECTIONS = ["gate_proj", "up_proj", "down_proj"]


class LlamaMLP(nn.Module):
    def __init__(self, dim: int, ffn: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, ffn, bias=False)
        self.up_proj = nn.Linear(dim, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """The MLP half of a decoder layer; the residual keeps activations bounded across blocks."""

    def __init__(self, dim: int, ffn: int) -> None:
        super().__init__()
        self.mlp = LlamaMLP(dim, ffn)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(x)


class LoopLoraMoELinear(nn.Module):
    """A frozen linear plus the paper-style per-expert loop (tests/reference.py)."""

    def __init__(self, base: nn.Linear, experts: int, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.dropout = dropout
        self.router = nn.Parameter(torch.randn(experts, base.in_features) / math.sqrt(base.in_features))
        self.lora_A = nn.Parameter(torch.randn(experts, rank, base.in_features) / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.randn(experts, base.out_features, rank) * 0.01)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + loramoe_delta_loop(x, self.router, self.lora_A, self.lora_B, self.scale,
                                                 self.dropout, self.training)


def frozen_stack(args: argparse.Namespace) -> nn.Sequential:
    model = nn.Sequential(*(Block(args.dim, args.ffn) for _ in range(args.blocks)))
    return model.requires_grad_(False)


def with_loop_loramoe(model: nn.Sequential, args: argparse.Namespace) -> nn.Sequential:
    for block in model:
        for name in PROJECTIONS:
            base = getattr(block.mlp, name)
            adapted = LoopLoraMoELinear(base, args.experts, args.rank, args.alpha, args.dropout)
            setattr(block.mlp, name, adapted)
    return model


def randomise_lora_B(model: nn.Module) -> nn.Module:
    """B starts at zero; make it nonzero so no variant times trivially-zero maths."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(std=0.01)
    return model


def build_variants(args: argparse.Namespace) -> dict[str, nn.Module]:
    moe = LoraMoEConfig(num_experts=args.experts, r=args.rank, alpha=args.alpha, dropout=args.dropout,
                        target_modules=PROJECTIONS)
    lora = LoraConfig(r=args.experts * args.rank, alpha=args.alpha, dropout=args.dropout,
                      target_modules=PROJECTIONS)
    variants = {
        "frozen base": frozen_stack(args),
        f"LoRA r={args.experts * args.rank}": randomise_lora_B(attach(frozen_stack(args), lora)),
        "LoRAMoE loop-reference": with_loop_loramoe(frozen_stack(args), args),
        "LoRAMoE production": randomise_lora_B(attach(frozen_stack(args), moe)),
    }
    return {name: model.train() for name, model in variants.items()}


def make_step(model: nn.Module, x: Tensor) -> Callable[[], None]:
    # An empty param group (rather than no optimizer) keeps the frozen base on the same code path.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": params}], lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        x.grad = None
        model(x).mean().backward()
        optimizer.step()

    return step


def measure(steps: dict[str, Callable[[], None]], warmup: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per step. Variants run round-robin, starting one later each round, so drifting
    machine load and cache state after a given neighbour hit every variant alike."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return times


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=576, help="hidden size (SmolLM2-135M)")
    p.add_argument("--ffn", type=int, default=1536, help="MLP intermediate size (SmolLM2-135M)")
    p.add_argument("--blocks", type=int, default=4, help="MLP blocks in the stack")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--experts", type=int, default=6)
    p.add_argument("--rank", type=int, default=4, help="rank per expert; LoRA gets experts * rank")
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--dropout", type=float, default=0.05, help="adapter input dropout (paper: 0.05)")
    p.add_argument("--steps", type=int, default=15, help="timed rounds (one step of every variant each)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.seq, args.dim, requires_grad=True)  # as if earlier layers train
    variants = build_variants(args)
    times = measure({name: make_step(model, x) for name, model in variants.items()}, args.warmup, args.steps)
    median_ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    frozen_ms = median_ms["frozen base"]

    print(f"{args.blocks} Llama MLP blocks d={args.dim} f={args.ffn}, {args.batch}x{args.seq} tokens, "
          f"E={args.experts} r={args.rank}, dropout={args.dropout}, fp32, {torch.get_num_threads()} threads, "
          f"median of {args.steps} steps")
    print(f"{'variant':<26}{'ms/step':>10}{'vs frozen':>11}")
    for name, ms in median_ms.items():
        print(f"{name:<26}{ms:>10.1f}{ms / frozen_ms:>10.2f}x")
    production, loop = median_ms["LoRAMoE production"], median_ms["LoRAMoE loop-reference"]
    print(f"production vs loop-reference speed-up: {loop / production:.2f}x (goal >= 2x)")
    print(f"production vs frozen: {production / frozen_ms:.2f}x (goal <= 1.15x)")

    if args.json:
        machine = {"platform": platform.platform(), "processor": platform.processor(),
                   "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                   "torch": torch.__version__, "python": platform.python_version()}
        result = {"machine": machine, "args": {k: v for k, v in vars(args).items() if k != "json"},
                  "median_ms": median_ms,
                  "ratio_to_frozen": {name: ms / frozen_ms for name, ms in median_ms.items()},
                  "times_ms": {name: [1000 * s for s in t] for name, t in times.items()}}
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
