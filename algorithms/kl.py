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


class FixedKLController:
    """β (the KL penalty's weight) held at ``coef``; the same interface as ``AdaptiveKLController`` so a stage can
    hold either. ``value`` is β to use now."""

    def __init__(self, coef: float):
        if coef < 0:
            raise ValueError(f"coef={coef}: the KL coefficient β must be ≥ 0")
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: β is fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Adaptive β of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences", §2.2), a
    proportional controller that steers the measured KL toward ``target``:

        e_t = clip(KL_t / KL_target − 1, −0.2, 0.2)
        β_{t+1} = β_t·(1 + K_β·e_t),   K_β = n_steps / horizon

    ``current_kl`` is the batch's KL(π‖π_ref) per sample (summed over its tokens, averaged over samples) and
    ``n_steps`` the number of samples it came from, as in OpenAI's lm-human-preferences and TRL/OpenRLHF: β grows
    while the policy drifts past the target and shrinks below it, by at most 20%·n_steps/horizon per update.
    The state is β alone; ``target`` and ``horizon`` are configuration.
    """

    def __init__(self, init_coef: float, target: float, horizon: int):
        super().__init__(init_coef)
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target={target}, horizon={horizon}: both must be > 0 (KL per sample, samples)")
        self.target, self.horizon = float(target), horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
