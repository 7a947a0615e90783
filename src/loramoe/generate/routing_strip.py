"""Which expert group wrote each generated token: the gate share per group, averaged over the
LoRAMoE layers, at the position that predicted the token, printed as a coloured strip in a
terminal and as plain numbers elsewhere.

The position that predicted token k is the last position of the forward that produced its logits:
the prompt's last token for the first generated token, the previous generated token after that.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from rich.console import Console
from rich.text import Text

from loramoe.adapters import LoraMoEConfig
from loramoe.routing import RoutingRecord

COLOURS = ("blue", "yellow", "green", "magenta", "cyan", "red")
STRIP_WIDTH = 20


def group_names(config: LoraMoEConfig) -> list[str]:
    """The groups shares are given for: the config's groups, or each expert of one pool."""
    return list(config.groups) if config.groups else [f"expert {i}" for i in range(config.num_experts)]


def group_matrix(config: LoraMoEConfig) -> torch.Tensor:
    """(E, groups) one-hot: which of :func:`group_names` each expert counts for."""
    groups = torch.tensor(config.expert_groups() if config.groups else list(range(config.num_experts)))
    return torch.nn.functional.one_hot(groups, len(group_names(config))).float()


def share_rows(gates: torch.Tensor, config: LoraMoEConfig) -> list[dict[str, float]]:
    """Gates (layers, rows, E) as each row's share per group, averaged over the layers (4 decimals)."""
    shares = (gates.float() @ group_matrix(config)).mean(0)  # (rows, groups)
    return [{name: round(float(value), 4) for name, value in zip(group_names(config), row)} for row in shares]


def token_shares(record: RoutingRecord, config: LoraMoEConfig, tokens: int) -> list[dict[str, float]]:
    """Per generated token (``tokens`` of them), each group's share of the gate mass."""
    # a layer's gates are one (batch, seq, E) tensor per forward; a token's are the last position's
    return share_rows(torch.stack([torch.stack([gates[0, -1] for gates in forwards[:tokens]])
                                   for forwards in record.gates.values()]), config)


def render(tokens: Sequence[str], shares: Sequence[dict[str, float]], console: Console) -> None:
    """One line per token: the token, then its strip (a terminal) or its shares (plain text)."""
    if not shares:
        return
    names = list(shares[0])
    width = max(len(repr(token)) for token in tokens)
    if console.is_terminal:
        legend = Text("routing: ")
        for i, name in enumerate(names):
            legend.append(f"{name} ", style=f"bold {COLOURS[i % len(COLOURS)]}")
        console.print(legend)
    for token, share in zip(tokens, shares):
        line = Text(repr(token).ljust(width + 2))
        if console.is_terminal:
            cells = _cells(list(share.values()))
            for i, count in enumerate(cells):
                line.append("█" * count, style=COLOURS[i % len(COLOURS)])
            line.append("  ")
        line.append("  ".join(f"{name} {value:.2f}" for name, value in share.items()))
        console.print(line, highlight=False)


def _cells(values: list[float]) -> list[int]:
    """Shares as whole cells of the strip, summing to its width (largest remainders first)."""
    exact = [v * STRIP_WIDTH for v in values]
    cells = [int(x) for x in exact]
    for i in sorted(range(len(values)), key=lambda i: exact[i] - cells[i], reverse=True)[:STRIP_WIDTH - sum(cells)]:
        cells[i] += 1
    return cells
