"""What fits where: the GPU memory a LoRAMoE training step needs, computed from parameter and
activation counts (not measured), for Llama-shaped 7B, 13B and 70B models with a bf16 or a 4-bit
base, in one process or sharded with FSDP over 8 GPUs.

The count, per GPU:
- base weights: 2 bytes per parameter in bf16; 4-bit NF4 stores 0.5 byte plus one fp32 scale per
  block of 64 (0.5625 bytes); embeddings and the LM head stay bf16. FSDP divides them by the GPUs
  and holds one decoder layer whole while it runs.
- adapter: LoRAMoE with 6 experts of rank 4 on the MLP's three projections, fp32 weights, grads and
  two AdamW states: 16 bytes per parameter (divided by the GPUs under FSDP).
- activations, with gradient checkpointing (a 7B step does not fit without it): each layer's bf16
  input kept for backward, one layer's activations during its recomputation (per token
  ``2 * (10 d + 4 ffn)`` bytes: norms, attention projections and outputs with flash attention, the
  MLP's gate, up and product), and fp32 logits over the vocabulary at the label positions (a
  quarter of the tokens, as loramoe's trainer computes the head only there).
- 1.5 GiB for the CUDA context and the allocator's slack.

``--check-cpu`` prints the same count for the embedded SmolLM2-135M step that
benchmarks/quantized.py measures (fp32, no checkpointing, batch 4 x 128), next to its measurement.

    python benchmarks/fit.py                 # the table in the README
    python benchmarks/fit.py --tokens 4096   # another sequence budget per GPU
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GIB = 1024 ** 3


@dataclass(frozen=True)
class Shape:
    name: str
    params: float
    d: int
    ffn: int
    layers: int
    vocab: int


SHAPES = [Shape("7B", 6.74e9, 4096, 11008, 32, 32000), Shape("13B", 13.0e9, 5120, 13824, 40, 32000),
          Shape("70B", 69.0e9, 8192, 28672, 80, 32000)]
EXPERTS, RANK = 6, 4


def adapter_params(s: Shape) -> int:
    """Router (E x d_in) and E experts (r x d_in, d_out x r) on gate, up and down per layer."""
    per_projection = [(s.d, s.ffn), (s.d, s.ffn), (s.ffn, s.d)]
    return s.layers * sum(EXPERTS * d_in + EXPERTS * RANK * (d_in + d_out) for d_in, d_out in per_projection)


def step_gib(s: Shape, base_bytes: float, tokens: int, gpus: int = 1, checkpointing: bool = True,
             act_bytes: int = 2, float_bytes: int = 2, tied: bool = False) -> dict[str, float]:
    embed = (1 if tied else 2) * s.vocab * s.d  # input embeddings and LM head, never quantized
    body = s.params - embed
    weights = (body * base_bytes + embed * float_bytes) / gpus
    if gpus > 1:
        weights += body / s.layers * base_bytes  # the layer FSDP gathers while it runs
    adapter = 16 * adapter_params(s) / gpus
    layer = act_bytes * (10 * s.d + 4 * s.ffn) * tokens
    kept = act_bytes * s.d * tokens * s.layers if checkpointing else layer * s.layers
    logits = 4 * s.vocab * tokens / 4
    activations = kept + (layer if checkpointing else 0) + logits
    return {"weights": weights / GIB, "adapter": adapter / GIB, "activations": activations / GIB,
            "total": (weights + adapter + activations) / GIB + 1.5}


def table(tokens: int) -> str:
    rows = ["| model | base | GPUs | weights | adapter + AdamW | activations | total | 24 GB | 48 GB | 80 GB |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    for s in SHAPES:
        for base, size in (("bf16", 2.0), ("4-bit", 0.5625)):
            for gpus in (1, 8):
                g = step_gib(s, size, tokens, gpus)
                fits = ["fits" if g["total"] * GIB <= cap * 1e9 * 0.95 else "no" for cap in (24, 48, 80)]
                mode = "1" if gpus == 1 else "8, FSDP"
                rows.append(f"| {s.name} | {base} | {mode} | {g['weights']:.1f} | {g['adapter']:.2f} | "
                            f"{g['activations']:.1f} | {g['total']:.1f} | " + " | ".join(fits) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per GPU per micro-batch")
    parser.add_argument("--check-cpu", action="store_true", help="the embedded model's measured step, computed")
    args = parser.parse_args()
    if args.check_cpu:
        smol = Shape("SmolLM2-135M", 134.5e6, 576, 1536, 30, 49152)
        for name, size in (("fp32", 4.0), ("4-bit", 0.5625)):
            g = step_gib(smol, size, 4 * 128, checkpointing=False, act_bytes=4, float_bytes=4, tied=True)
            print(f"{name}: weights {g['weights'] * 1024:.0f} MiB, step activations {g['activations'] * 1024:.0f} MiB "
                  "(computed; benchmarks/quantized.py measures both)")
        return
    print(f"GiB per GPU, {args.tokens} tokens per GPU per micro-batch, gradient checkpointing (computed)\n")
    print(table(args.tokens))


if __name__ == "__main__":
    main()
