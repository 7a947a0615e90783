"""Greedy generation with the KV cache: tokens/s of the base model and of the same model with a
LoRAMoE adapter (random, nonzero experts), at batch 1 and 16, measured interleaved in one run.

    python benchmarks/generation.py                          # the embedded SmolLM2-135M, CPU
    python benchmarks/generation.py --random --device cuda   # SmolLM2-135M's shape, random weights

``--random`` builds SmolLM2-135M's architecture with random weights, for machines without the
embedded model; speed does not depend on the weights, and every run generates exactly
``--new-tokens`` tokens (EOS is not allowed to end it early). ``--static-compile`` generates with
a static KV cache, for which transformers compiles the forward (CUDA graphs on a GPU), for both
models alike; without it, generation runs eagerly with the default dynamic cache.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from common import machine, measure, paired_ratio, summarize, write_json
from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM

from loramoe import LoraMoEConfig, attach, models

SMOLLM2_135M = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                           tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0, bos_token_id=1,
                           eos_token_id=2, pad_token_id=2)


def base_model(args: argparse.Namespace) -> torch.nn.Module:
    if args.random:
        torch.manual_seed(0)
        with torch.device(args.device):
            model = LlamaForCausalLM(SMOLLM2_135M)
    else:
        model, _ = models.load(args.model)
    return model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()


def with_loramoe(model: torch.nn.Module) -> torch.nn.Module:
    model = attach(model, LoraMoEConfig()).eval()  # the paper's defaults: 6 experts of rank 4
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(std=0.01)
    return model


def make_generate(model: torch.nn.Module, batch: int, args: argparse.Namespace):
    ids = torch.randint(100, 1000, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))
    ids = ids.to(args.device)
    mask = torch.ones_like(ids)

    static = {"cache_implementation": "static", "compile_config": CompileConfig()} if args.static_compile else {}
    if static and args.device == "cpu":
        static["compile_config"]._compile_all_devices = True  # transformers compiles on accelerators only

    def generate() -> None:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=2, **static)

    return generate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="embedded model name, hub id or folder")
    p.add_argument("--random", action="store_true", help="SmolLM2-135M's architecture with random weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--static-compile", action="store_true", help="static KV cache, compiled forward")
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    base = base_model(args)
    adapted = with_loramoe(copy.deepcopy(base))
    calls = {}
    for batch in args.batches:
        calls[f"base b={batch}"] = make_generate(base, batch, args)
        calls[f"LoRAMoE b={batch}"] = make_generate(adapted, batch, args)
    times = measure(calls, 1, args.rounds, device)
    median_ms, _ = summarize(times, next(iter(calls)))
    tokens_per_s = {name: batch_of(name) * args.new_tokens / (ms / 1000) for name, ms in median_ms.items()}
    ratio = {f"b={b}": 1 / paired_ratio(times, f"LoRAMoE b={b}", f"base b={b}")
             for b in args.batches}  # tokens/s over the base model's, round by round
    print(f"{args.model if not args.random else 'random SmolLM2-135M'} on {args.device} ({args.dtype}"
          f"{', static cache + compile' if args.static_compile else ''}), "
          f"{args.prompt}-token prompts, {args.new_tokens} new tokens, {args.rounds} rounds; "
          f"ratio: median of the rounds' ratios")
    for b in args.batches:
        print(f"batch {b:>3}: base {tokens_per_s[f'base b={b}']:8.1f} tok/s, LoRAMoE "
              f"{tokens_per_s[f'LoRAMoE b={b}']:8.1f} tok/s, ratio {ratio[f'b={b}']:.2f}")
    result = {"machine": machine(device),
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "tokens_per_s": tokens_per_s, "loramoe_over_base": ratio,
              "times_ms": {name: [1000 * s for s in t] for name, t in times.items()}}
    write_json(args.json, result)
    return result


def batch_of(name: str) -> int:
    return int(name.rpartition("b=")[2])


if __name__ == "__main__":
    run(parse_args())
