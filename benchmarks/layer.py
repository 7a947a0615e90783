"""One training step (forward + backward + AdamW) of a stack of Llama layers: step time and peak
memory of the frozen base, our LoRA and PEFT's LoRA of rank E*r, the loop-reference LoRAMoE and
the production LoRAMoE (and, with --compile, frozen and production under torch.compile), as
ratios to the frozen base, all measured in one run, interleaved round by round. Each ratio is the
median over rounds of the variant's time over the frozen base's in the same round, which cancels
the drift of a shared machine; the quartiles of those ratios say how much the rounds disagree.
``--variants ... no-dropout`` adds the production op with dropout 0, to weigh what dropout costs.

    python benchmarks/layer.py                                     # CPU, SmolLM2-135M MLP shape
    python benchmarks/layer.py --device cuda --dtype bfloat16 --arch llama --dim 4096 --ffn 11008 \\
        --blocks 8 --batch 4 --seq 2048 --compile                  # GPU, Llama-7B-shaped layers

``--arch mlp`` stacks the MLP half of decoder layers (the adapted part alone, the hardest case for
a ratio); ``--arch llama`` stacks whole Llama decoder layers with attention (transformers'
LlamaModel, random weights); ``--arch causal-lm`` is the whole causal LM, the decoder layers plus
the final norm, the tied LM head over ``--vocab`` tokens and the cross-entropy loss on random
labels, which is what a training step runs::

    python benchmarks/layer.py --arch causal-lm --blocks 30 --heads 9 --kv-heads 3  # SmolLM2-135M

Every variant's input embeddings require a gradient (as if earlier layers trained), so the frozen
base runs its whole backward too. The optimizer is AdamW with ``fused=True``, which is what the
training (Hugging Face Trainer's default ``adamw_torch_fused``) uses, for every variant alike.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from common import machine, measure, paired_ratio, ratio_spread, step_peak_bytes, summarize, write_json
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

from loramoe import LoraConfig, LoraMoEConfig, attach
from loramoe.reference import loramoe_delta_loop

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


def llama_config(args: argparse.Namespace) -> LlamaConfig:
    heads = args.heads or max(1, args.dim // 128)
    vocab = args.vocab if args.arch == "causal-lm" else 128  # a bare stack takes embeddings: no vocabulary to speak of
    return LlamaConfig(hidden_size=args.dim, intermediate_size=args.ffn, num_hidden_layers=args.blocks,
                       num_attention_heads=heads, num_key_value_heads=args.kv_heads or heads, vocab_size=vocab,
                       tie_word_embeddings=True, max_position_embeddings=args.seq, attn_implementation="sdpa")


class Layers(nn.Module):
    """Whole Llama decoder layers (attention + MLP) taking embeddings, returning hidden states."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.model = LlamaModel(llama_config(args))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(inputs_embeds=x, use_cache=False).last_hidden_state


class CausalLM(nn.Module):
    """The whole causal LM taking embeddings, returning its loss on fixed random labels."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.model = LlamaForCausalLM(llama_config(args))
        self.register_buffer("labels", torch.randint(args.vocab, (args.batch, args.seq)))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(inputs_embeds=x, labels=self.labels, use_cache=False).loss


class LoopLoraMoELinear(nn.Module):
    """A frozen linear plus the paper-style per-expert loop (:mod:`loramoe.reference`)."""

    def __init__(self, base: nn.Linear, experts: int, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.dropout = dropout
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.router = nn.Parameter(torch.randn(experts, base.in_features, device=like["device"])
                                   / math.sqrt(base.in_features))
        self.lora_A = nn.Parameter(torch.randn(experts, rank, base.in_features, **like) / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.randn(experts, base.out_features, rank, **like) * 0.01)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + loramoe_delta_loop(x, self.router, self.lora_A, self.lora_B, self.scale,
                                                 self.dropout, self.training)


def frozen_model(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)  # every variant adapts the same base weights
    with torch.device(args.device):
        if args.arch == "causal-lm":
            model = CausalLM(args)
        elif args.arch == "llama":
            model = Layers(args)
        else:
            model = nn.Sequential(*(Block(args.dim, args.ffn) for _ in range(args.blocks)))
    return model.to(getattr(torch, args.dtype)).requires_grad_(False)


def with_loop_loramoe(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    for name, module in list(model.named_modules()):
        if name.rpartition(".")[2] == "mlp":
            for proj in PROJECTIONS:
                base = getattr(module, proj)
                setattr(module, proj, LoopLoraMoELinear(base, args.experts, args.rank, args.alpha, args.dropout))
    return model


def with_peft_lora(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """PEFT's LoRA of the same total rank, adapters in float32 as ``get_peft_model`` makes them by
    default (``autocast_adapter_dtype``) for a half-precision base."""
    import peft

    config = peft.LoraConfig(r=args.experts * args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout,
                             target_modules=PROJECTIONS)
    model = peft.inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
            if name.endswith("lora_B.default.weight"):
                param.data.normal_(std=0.01)
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
    total_rank = args.experts * args.rank
    variants = {"frozen base": frozen_model(args)}
    if "lora" in args.variants:
        variants[f"LoRA r={total_rank}"] = randomise_lora_B(attach(frozen_model(args), lora))
    if "peft" in args.variants:
        variants[f"PEFT LoRA r={total_rank}"] = with_peft_lora(frozen_model(args), args)
    if "loop" in args.variants:
        variants["LoRAMoE loop-reference"] = with_loop_loramoe(frozen_model(args), args)
    variants["LoRAMoE production"] = randomise_lora_B(attach(frozen_model(args), moe))
    if "no-dropout" in args.variants and args.dropout > 0:  # what dropout costs, paired in the same run
        variants["LoRAMoE production, dropout 0"] = randomise_lora_B(
            attach(frozen_model(args), dataclasses.replace(moe, dropout=0.0)))
    if args.compile:  # compiled frozen too: compile also fuses the base model's own elementwise ops
        variants["frozen base + compile"] = torch.compile(frozen_model(args))
        variants["LoRAMoE production + compile"] = torch.compile(copy.deepcopy(variants["LoRAMoE production"]))
    return {name: model.train() for name, model in variants.items()}


def make_step(model: nn.Module, x: Tensor):
    params = [p for p in model.parameters() if p.requires_grad]
    # an empty param group (rather than no optimizer) keeps the frozen base on the same code path
    optimizer = torch.optim.AdamW([{"params": params}], lr=1e-4, fused=bool(params))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        x.grad = None
        model(x).float().mean().backward()
        optimizer.step()

    step.optimizer = optimizer
    return step


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if isinstance(t, Tensor))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["mlp", "llama", "causal-lm"], default="mlp")
    p.add_argument("--dim", type=int, default=576, help="hidden size (SmolLM2-135M)")
    p.add_argument("--ffn", type=int, default=1536, help="MLP intermediate size (SmolLM2-135M)")
    p.add_argument("--blocks", type=int, default=4, help="layers in the stack")
    p.add_argument("--heads", type=int, help="attention heads (default: dim / 128, as Llama-7B)")
    p.add_argument("--kv-heads", type=int, help="key/value heads (default: --heads)")
    p.add_argument("--vocab", type=int, default=49152, help="vocabulary of --arch causal-lm (SmolLM2-135M)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--experts", type=int, default=6)
    p.add_argument("--rank", type=int, default=4, help="rank per expert; LoRA gets experts * rank")
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--dropout", type=float, default=0.05, help="adapter input dropout (paper: 0.05)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--variants", nargs="*", default=["lora", "peft", "loop"],
                   help="besides frozen and production: any of lora peft loop no-dropout (production "
                        "with dropout 0, to weigh what dropout costs)")
    p.add_argument("--compile", action="store_true", help="also frozen and production under torch.compile")
    p.add_argument("--steps", type=int, default=15, help="timed rounds (one step of every variant each)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def setup(args: argparse.Namespace) -> tuple[torch.device, Tensor]:
    """Apply the thread count; the device and the stack's input."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.seq, args.dim, device=device, dtype=getattr(torch, args.dtype),
                    requires_grad=True)  # as if earlier layers train
    return device, x


def run(args: argparse.Namespace) -> dict:
    """Time and measure every variant; return the results (also printed)."""
    device, x = setup(args)
    variants = build_variants(args)
    steps = {name: make_step(model, x) for name, model in variants.items()}
    times = measure(steps, args.warmup, args.steps, device)
    peak = {}
    for name, step in steps.items():
        step.optimizer.zero_grad(set_to_none=True)  # the step starts with no gradients alive
        x.grad = None
        peak[name] = step_peak_bytes(step, device) + optimizer_state_bytes(step.optimizer)
    median_ms, ratio = summarize(times, "frozen base")
    spread = ratio_spread(times, "frozen base")
    peak_ratio = {name: b / peak["frozen base"] for name, b in peak.items()}
    print(f"{args.blocks} {args.arch} layers d={args.dim} f={args.ffn}, {args.batch}x{args.seq} tokens, "
          f"E={args.experts} r={args.rank}, dropout={args.dropout}, {args.dtype} on {args.device}, "
          f"{torch.get_num_threads()} threads, {args.steps} rounds; vs frozen: median of the rounds' ratios "
          f"(quartiles)")
    print(f"{'variant':<30}{'ms/step':>10}{'vs frozen':>11}{'quartiles':>14}{'peak MiB':>10}{'vs frozen':>11}")
    for name in median_ms:
        low, high = spread[name]
        print(f"{name:<30}{median_ms[name]:>10.1f}{ratio[name]:>10.2f}x{f'{low:.2f}-{high:.2f}':>14}"
              f"{peak[name] / 2**20:>10.1f}{peak_ratio[name]:>10.2f}x")
    speedup = None
    if "LoRAMoE loop-reference" in median_ms:
        speedup = paired_ratio(times, "LoRAMoE loop-reference", "LoRAMoE production")
        print(f"production vs loop-reference speed-up: {speedup:.2f}x")
    dropout_cost = None
    if "LoRAMoE production, dropout 0" in median_ms:
        dropout_cost = paired_ratio(times, "LoRAMoE production", "LoRAMoE production, dropout 0")
        print(f"production with dropout {args.dropout} over production without: {dropout_cost:.3f}x")
    result = {"machine": machine(device),
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "median_ms": median_ms, "ratio_to_frozen": ratio, "ratio_quartiles": spread,
              "loop_over_production": speedup, "dropout_over_none": dropout_cost,
              "peak_bytes": peak, "peak_ratio_to_frozen": peak_ratio,
              "times_ms": {name: [1000 * s for s in t] for name, t in times.items()}}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    run(parse_args())
