"""algorithms.dapo against plain Python loops written independently of the vectorised code."""

import random

import pytest
import torch

from algorithms.dapo import informative_groups, overlong_penalty

SEEDS = range(50)


def assert_close(actual, expected):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)


# --- informative_groups (dynamic sampling) -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_informative_groups_matches_loop(seed):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    n = rng.choice([1, 2, 15])  # n=1: one sample, a group of one
    group_ids = [rng.choice([-3, 7, 100, 5, 42]) for _ in range(n)]  # non-contiguous ids; singletons occur
    # Binary rewards (verifiable tasks: all-correct / all-wrong groups are common) or real-valued ones with ties.
    if seed % 2:
        scores = torch.randint(0, 2, (n,), generator=gen).double()
    else:
        scores = torch.tensor([rng.choice([0.25, -1.5, rng.random()]) for _ in range(n)], dtype=torch.float64)
    keep = informative_groups(scores, torch.tensor(group_ids))
    expected = []
    for g in group_ids:
        members = [s for s, h in zip(scores.tolist(), group_ids) if h == g]
        expected.append(any(s != members[0] for s in members))
    assert keep.dtype == torch.bool
    assert keep.tolist() == expected


def test_informative_groups_edge_cases():
    ids = torch.tensor([0, 0, 0, 1, 1, 2])
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.5])  # all-equal group, mixed group, singleton
    assert informative_groups(scores, ids).tolist() == [False, False, False, True, True, False]
    assert informative_groups(torch.zeros(0), torch.zeros(0, dtype=torch.long)).tolist() == []
    with pytest.raises(ValueError, match="group_ids"):
        informative_groups(torch.zeros(3), torch.zeros(2, dtype=torch.long))


# --- overlong_penalty (soft overlong punishment) -----------------------------------------------------------------


def overlong_loop(length, max_len, buffer_len, penalty):
    if length <= max_len - buffer_len:
        return 0.0
    if length <= max_len:
        return -penalty * (length - (max_len - buffer_len)) / buffer_len
    return -penalty


@pytest.mark.parametrize("seed", SEEDS)
def test_overlong_penalty_matches_loop(seed):
    rng = random.Random(seed)
    max_len = rng.randint(1, 64)
    buffer_len = rng.randint(1, max_len)
    penalty = rng.choice([1.0, rng.uniform(0.0, 3.0)])
    lengths = [rng.randint(0, max_len + 10) for _ in range(20)] + [max_len - buffer_len, max_len, max_len + 1]
    got = overlong_penalty(torch.tensor(lengths), max_len, buffer_len, penalty)
    assert_close(got, [overlong_loop(n, max_len, buffer_len, penalty) for n in lengths])


def test_overlong_penalty_by_hand_and_errors():
    # max 16, buffer 4: free up to 12, then −¼ per token, −1 from 16 on.
    got = overlong_penalty(torch.tensor([0, 12, 13, 14, 16, 40]), max_len=16, buffer_len=4, penalty=1.0)
    assert got.tolist() == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(torch.tensor([1]), max_len=4, buffer_len=0, penalty=1.0)
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(torch.tensor([1]), max_len=4, buffer_len=5, penalty=1.0)
    with pytest.raises(ValueError, match="penalty"):
        overlong_penalty(torch.tensor([1]), max_len=4, buffer_len=2, penalty=-1.0)
