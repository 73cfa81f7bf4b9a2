"""DAPO's reward-side tricks (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale"):
dynamic sampling's group filter and the soft overlong punishment. Clip-higher and token-level loss aggregation, its
other two, are ``losses.policy_loss(clip_eps_high=...)`` and ``losses.aggregate(agg="token-mean")``."""

from __future__ import annotations

import torch
from torch import Tensor


def informative_groups(scores: Tensor, group_ids: Tensor) -> Tensor:
    """Dynamic sampling's filter (DAPO §3.2), (B,) bool: True for samples whose prompt group holds at least two
    different scores, i.e. keep the group iff 0 < #{correct} < G with binary rewards:

        keep_i = max_{j∈g} r_j > min_{j∈g} r_j          g = i's group

    A group whose samples all scored the same gets every group-relative advantage 0: no learning signal, but it
    still dilutes the batch. DAPO drops such groups and samples more prompts until the batch is full. A group of
    one is never informative. ``scores`` (B,) and ``group_ids`` (B,); groups need not be contiguous.
    """
    if scores.dim() != 1 or group_ids.shape != scores.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and group_ids {tuple(group_ids.shape)} must both be (B,)")
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n = int(inverse.max()) + 1 if inverse.numel() else 0
    lo = scores.new_zeros(n).scatter_reduce(0, inverse, scores, reduce="amin", include_self=False)
    hi = scores.new_zeros(n).scatter_reduce(0, inverse, scores, reduce="amax", include_self=False)
    return (hi > lo)[inverse]


def overlong_penalty(lengths: Tensor, max_len: int, buffer_len: int, penalty: float = 1.0) -> Tensor:
    """Soft overlong punishment (DAPO §3.4, eq. 13), added to the score of each response of length L:

        R(L) = 0                                          L ≤ max_len − buffer_len
             = −penalty·(L − (max_len − buffer_len)) / buffer_len    max_len − buffer_len < L ≤ max_len
             = −penalty                                   L > max_len

    so truncated or near-truncated responses lose reward gradually rather than all at once (DAPO: max_len 20480,
    buffer_len 4096, penalty 1). ``lengths`` (B,) integer response lengths; returns (B,) float64.
    """
    if not 0 < buffer_len <= max_len:
        raise ValueError(f"buffer_len={buffer_len}: must satisfy 0 < buffer_len ≤ max_len (={max_len})")
    if penalty < 0:
        raise ValueError(f"penalty={penalty}: pass the (non-negative) size of the largest punishment")
    start = max_len - buffer_len
    ramp = (lengths.to(torch.float64) - start) / buffer_len
    return -penalty * ramp.clamp(0.0, 1.0)
