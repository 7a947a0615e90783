"""Peak memory and step time of LoRAMoE training on the embedded SmolLM2-135M over a float32 base and
a 4-bit NF4 base (``loramoe.models.load(..., quantize="4bit")``; ``--bases`` adds ``8bit``).

A step is forward, backward and AdamW (``fused=True``, as the Trainer's default) over a batch of
4 x 128 random tokens with the causal-LM loss, LoRAMoE of 6 experts of rank 4 on the MLP
projections with the default dropout 0.05 (the balancing constraint, a few small ops in the
Trainer, is left out). Each base runs in fresh processes, ``--rounds`` of them taking turns with the
other bases', so its resident memory is its own: ``getrusage`` maxrss, the most the process ever
held, once loaded and attached and at the end. Beside it, the model's own bytes
(``get_memory_footprint``) and a step's peak of live tensors above those alive when it starts
(:func:`common.step_peak_bytes`). The table gives the median step time with its quartiles over
every round's ``--steps`` steps after ``--warmup``, and the ratio of each median to the float32 base's.

    python benchmarks/quantized.py [--steps 10] [--json benchmarks/results/quantized_cpu_smollm2.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import machine, step_peak_bytes, write_json

from loramoe import LoraMoEConfig, attach, models

MODEL = "smollm2-135m"


def measure_one(base: str, steps: int, warmup: int, batch: int, seq: int, threads: int) -> dict:
    """One base's numbers, in this process (see the module docstring)."""
    torch.set_num_threads(threads)
    model, _ = models.load(MODEL, quantize=None if base == "fp32" else base)
    attach(model, LoraMoEConfig())
    model.train()
    loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()

    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"base": base, "times_s": times, "weights_bytes": model.get_memory_footprint(),
            "step_peak_bytes": step_peak_bytes(step, torch.device("cpu")), "loaded_maxrss_kib": loaded_rss,
            "peak_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def run(args: argparse.Namespace) -> dict:
    models.embedded_model_dir(MODEL)  # the one-time conversion, outside the measured processes
    runs: dict[str, list[dict]] = {base: [] for base in args.bases}
    for _ in range(args.rounds):
        for base in args.bases:
            child = [sys.executable, __file__, "--child", base, *(f"--{key}={getattr(args, key)}" for key in
                     ("steps", "warmup", "batch", "seq", "threads"))]
            out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
            runs[base].append(json.loads(out.strip().splitlines()[-1]))
    results = [{"base": base, "times_s": [t for r in rs for t in r["times_s"]],
                **{key: max(r[key] for r in rs) for key in rs[0] if key not in ("base", "times_s")}}
               for base, rs in runs.items()]
    reference = statistics.median(results[0]["times_s"])
    print(f"LoRAMoE 6 x r4 training steps on {MODEL}, batch {args.batch} x {args.seq} tokens, {args.rounds} x "
          f"{args.steps} steps after {args.warmup} per process, {args.threads} thread(s); memory in MiB, the "
          f"highest of the rounds")
    print(f"{'base':<6}{'weights':>9}{'step peak':>11}{'RSS loaded':>12}{'RSS peak':>10}{'step s (quartiles)':>24}"
          f"{'vs ' + args.bases[0]:>9}")
    for r in results:
        q1, median, q3 = statistics.quantiles(r["times_s"], n=4)
        r["median_s"], r["quartiles_s"], r["ratio"] = median, [q1, q3], median / reference
        print(f"{r['base']:<6}{r['weights_bytes'] / 2**20:>9.0f}{r['step_peak_bytes'] / 2**20:>11.0f}"
              f"{r['loaded_maxrss_kib'] / 1024:>12.0f}{r['peak_maxrss_kib'] / 1024:>10.0f}"
              f"{median:>10.2f} ({q1:.2f}-{q3:.2f}){r['ratio']:>8.2f}x")
    result = {"machine": machine(torch.device("cpu")), "args": {k: v for k, v in vars(args).items() if k != "json"},
              "results": results}
    write_json(args.json, result)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bases", nargs="+", choices=["fp32", "4bit", "8bit"], default=["fp32", "4bit"],
                   help="the first is the reference of the ratios")
    p.add_argument("--steps", type=int, default=8, help="timed steps per process")
    p.add_argument("--rounds", type=int, default=2, help="processes per base, taking turns")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (one: on a shared machine, threads that wait on each other swamp the numbers)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers, per-step times included")
    p.add_argument("--child", choices=["fp32", "4bit", "8bit"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.child:
        print(json.dumps(measure_one(arguments.child, arguments.steps, arguments.warmup, arguments.batch,
                                     arguments.seq, arguments.threads)))
    else:
        run(arguments)
