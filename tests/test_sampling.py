"""Length-grouped training batches: every record once per epoch, little padding, random order."""

from __future__ import annotations

import random

import pytest
import torch

from loramoe.train.sampling import LengthGroupedSampler, length_grouped_order


def _padded_tokens(order: list[int], lengths: list[int], batch_size: int) -> int:
    return sum(max(lengths[i] for i in order[s:s + batch_size]) * len(order[s:s + batch_size])
               for s in range(0, len(order), batch_size))


def test_every_record_once_and_far_less_padding_than_random_batches():
    rng = random.Random(0)
    lengths = [rng.choice([40, 45, 60, 150, 160]) + rng.randrange(10) for _ in range(203)]
    order = length_grouped_order(lengths, 8, torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(203))
    random_order = torch.randperm(203, generator=torch.Generator().manual_seed(0)).tolist()
    assert _padded_tokens(order, lengths, 8) < 0.75 * _padded_tokens(random_order, lengths, 8)
    assert _padded_tokens(order, lengths, 8) < 1.1 * sum(lengths)


def test_batches_come_in_random_order_not_sorted_by_length():
    lengths = list(range(64))
    order = length_grouped_order(lengths, 8, torch.Generator().manual_seed(1))
    firsts = [lengths[order[s]] for s in range(0, 64, 8)]
    assert sorted(firsts) != firsts and sorted(firsts, reverse=True) != firsts
    assert all(max(order[s:s + 8]) - min(order[s:s + 8]) == 7 for s in range(0, 64, 8))


def test_the_sampler_replays_an_epoch_and_draws_anew_for_the_next():
    lengths = [i % 17 for i in range(100)]
    sampler = LengthGroupedSampler(lengths, 4, seed=3)
    first = list(sampler)
    assert list(sampler) == first and len(sampler) == 100
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == list(range(100))
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        length_grouped_order(lengths, 0, torch.Generator())
