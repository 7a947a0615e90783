"""Training batches of records of similar length, in random order.

A batch is padded to its longest record, so a batch that mixes a 40-token question with a
150-token summarisation request spends most of its compute on padding: on the lab's mix, random
batches are 43 % padding. Hugging Face's ``group_by_length`` sorts each mega-batch longest first
and walks it in that order, so an epoch sweeps from long records to short ones, and short record
types (closed-book questions) pile up at the end of each sweep, a curriculum nobody asked for.
Here records are sorted by length inside each mega-batch, cut into batches, and the batches are
shuffled: little padding, and no order by length or type across the epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from loramoe.errors import UsageError

MEGA_BATCHES = 64
"""Batches per mega-batch: records are grouped by length among this many batches' worth, which
keeps the batches' make-up random from epoch to epoch on large data."""


def length_grouped_order(lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> list[int]:
    """Indices whose consecutive runs of ``batch_size`` are batches of similar lengths, the
    batches in random order."""
    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, got {batch_size}")
    shuffled = torch.randperm(len(lengths), generator=generator).tolist()
    mega = MEGA_BATCHES * batch_size
    batches = []
    for start in range(0, len(shuffled), mega):
        group = sorted(shuffled[start:start + mega], key=lambda i: lengths[i])  # stable: ties stay random
        batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    # a short batch stays last: anywhere else it would shift every later batch's boundary
    last = batches.pop() if batches and len(batches[-1]) < batch_size else []
    return [i for b in torch.randperm(len(batches), generator=generator).tolist() for i in batches[b]] + last


class LengthGroupedSampler(Sampler[int]):
    """:func:`length_grouped_order` for a ``DataLoader``, drawn anew each epoch from ``seed`` and the
    epoch number, so a resumed run replays the same batches."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0) -> None:
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(length_grouped_order(self.lengths, self.batch_size, generator))
