"""Sample-based estimators of KL(π‖π_ref) per token."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: Literal["k1", "k2", "k3"]) -> Tensor:
    """Elementwise estimators of KL(π‖π_ref) from tokens sampled from π (Schulman 2020, "Approximating KL
    Divergence", http://joschu.net/blog/kl-approx.html). With log r = ref_logp − logp:

        k1 = −log r                 unbiased, high variance, can be negative (the InstructGPT reward penalty)
        k2 = ½ (log r)²             biased, low variance, ≥ 0
        k3 = (r − 1) − log r        unbiased, low variance, ≥ 0 (GRPO's KL term, DeepSeekMath eq. 4)

    Masked positions are the caller's business: the result is elementwise, shaped like ``logp``.
    """
    log_ratio = ref_logp - logp
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        # expm1 keeps r − 1 accurate when π ≈ π_ref, where k3 is a difference of two small numbers.
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"kind={kind!r}: expected 'k1', 'k2' or 'k3' (see Schulman 2020, 'Approximating KL Divergence')")
