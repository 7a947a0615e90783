"""How the production LoRAMoE step grows with the number of experts (2, 4, 8, 16 at rank 4) and
the rank (4 to 64 with 6 experts), at fixed tokens, as ratios to the frozen base measured in the
same interleaved rounds; and the check that 16 experts of rank 16 stay within 1.5x of frozen.

    python benchmarks/scale.py [--json benchmarks/results/scale_cpu_smollm2.json]

Takes layer.py's shape, device and dtype options (``--arch``, ``--dim``, ``--device``, ...).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import layer
from common import machine, measure, ratio_spread, summarize, write_json

SETTINGS = [(2, 4), (4, 4), (8, 4), (16, 4), (6, 8), (6, 16), (6, 32), (6, 64), (16, 16)]
"""(experts, rank) pairs: the expert sweep at rank 4, the rank sweep at the paper's 6 experts,
and the 1.5x check. (6, 4), the paper's setting, is layer.py's own."""


def run(args: argparse.Namespace) -> dict:
    device, x = layer.setup(args)
    steps = {"frozen base": layer.make_step(layer.frozen_model(args), x)}
    for experts, rank in SETTINGS:
        setting = copy.copy(args)
        setting.experts, setting.rank, setting.variants, setting.compile = experts, rank, [], False
        model = layer.build_variants(setting)["LoRAMoE production"]
        steps[f"E={experts} r={rank}"] = layer.make_step(model, x)
    times = measure(steps, args.warmup, args.steps, device)
    median_ms, ratio = summarize(times, "frozen base")
    spread = ratio_spread(times, "frozen base")
    print(f"{args.blocks} {args.arch} layers d={args.dim} f={args.ffn}, {args.batch}x{args.seq} tokens, "
          f"dropout={args.dropout}, {args.dtype} on {args.device}, {args.steps} rounds; vs frozen: median of the "
          f"rounds' ratios (quartiles)")
    for name, ms in median_ms.items():
        print(f"{name:<14}{ms:>10.1f} ms{ratio[name]:>8.2f}x  ({spread[name][0]:.2f}-{spread[name][1]:.2f})")
    print(f"16 experts of rank 16: {ratio['E=16 r=16']:.2f}x frozen (goal <= 1.5x)")
    result = {"machine": machine(device),
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "median_ms": median_ms, "ratio_to_frozen": ratio, "ratio_quartiles": spread,
              "times_ms": {name: [1000 * s for s in t] for name, t in times.items()}}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    run(layer.parse_args())
