"""Trainable-parameter counts of LoRA and Tied LoRA from shapes alone, without building a model.

``python -m loramoe.param_count`` prints the tables of docs/tied_lora.md. The shapes describe one
transformer layer: target name -> (d_in, d_out), each name present in every one of the L layers.
The counts equal what ``trainable_parameters`` reports once the adapter is attached (tested).
"""

from __future__ import annotations

from loramoe.adapters import TiedLoraConfig

Shapes = dict[str, tuple[int, int]]

LLAMA2_7B_QKV: Shapes = {"self_attn.qkv_proj": (4096, 3 * 4096)}
"""Llama-2-7B's attention input as NeMo fuses it, where the Tied LoRA paper places its adapter."""

LLAMA2_7B_MLP: Shapes = {"mlp.gate_proj": (4096, 11008), "mlp.up_proj": (4096, 11008),
                         "mlp.down_proj": (11008, 4096)}

SMOLLM2_135M_MLP: Shapes = {"mlp.gate_proj": (576, 1536), "mlp.up_proj": (576, 1536), "mlp.down_proj": (1536, 576)}

EXAMPLES: list[tuple[str, Shapes, int]] = [
    ("Llama-2-7B, fused QKV (the paper's setting)", LLAMA2_7B_QKV, 32),
    ("Llama-2-7B, MLP projections (loramoe's default targets)", LLAMA2_7B_MLP, 32),
    ("SmolLM2-135M, MLP projections (loramoe's default targets)", SMOLLM2_135M_MLP, 30),
]

RANKS = (4, 8, 16, 32, 64)


def lora_parameters(shapes: Shapes, num_layers: int, r: int) -> int:
    """LoRA: r (d_in + d_out) per target, in every layer."""
    return num_layers * sum(r * (d_in + d_out) for d_in, d_out in shapes.values())


def tied_lora_parameters(shapes: Shapes, num_layers: int, config: TiedLoraConfig) -> int:
    """Tied LoRA's trainable parameters: the trained ones of A (r d_in) and B (r d_out) once per
    target name, the trained ones of u (r) and v (d_out) in every layer."""
    r = config.r
    return sum(config.train_A * r * d_in + config.train_B * r * d_out
               + num_layers * (config.train_u * r + config.train_v * d_out) for d_in, d_out in shapes.values())


def markdown_table(shapes: Shapes, num_layers: int, ranks: tuple[int, ...] = RANKS) -> str:
    """Trainable parameters of LoRA and the named Tied LoRA presets per rank, with each as a share
    of LoRA's, as a markdown table."""
    presets = {"TL5 (tied A, B)": "TL5", "TL6 (tied A, B + u, v)": "TL6", "VeRA-like (u, v)": "vera"}
    lines = ["| r | LoRA | " + " | ".join(presets) + " |", "|---:" * (len(presets) + 2) + "|"]
    for r in ranks:
        lora = lora_parameters(shapes, num_layers, r)
        cells = [f"{lora:,d}"]
        for preset in presets.values():
            tied = tied_lora_parameters(shapes, num_layers, TiedLoraConfig(r=r, preset=preset))
            cells.append(f"{tied:,d} ({100 * tied / lora:.1f} %)")
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    for title, shapes, num_layers in EXAMPLES:
        targets = ", ".join(f"`{name}` {d_in} -> {d_out}" for name, (d_in, d_out) in shapes.items())
        print(f"### {title}\n\n{num_layers} layers; {targets}.\n\n{markdown_table(shapes, num_layers)}\n")


if __name__ == "__main__":
    main()
