"""The advantage estimators (`algo.estimator`), each one registered function over the same inputs.

Every estimator gets `EstimatorInputs`: the KL-shaped per-token rewards r_t = −β·KL_t + [t last]·score (β = 0 when
the KL is a loss term), the per-sequence total of those rewards, the critic's values when the estimator needs a
critic, the response mask and the prompt groups; it returns (advantages, returns | None), both (B, T). The math lives
in algorithms/advantages.py; these wrappers say which formula an estimator name means, and the registry
(algorithms/registry.py) says what it needs. The stage applies `algo.whiten_advantages` to the estimators registered
with whiten=True.

Add an estimator: one `@register_estimator` function here (or in a module imported before the config is loaded) and
its test (tests/algorithms/test_registry.py shows one). Import without torch: the bodies import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from algorithms.registry import register_estimator

if TYPE_CHECKING:
    from torch import Tensor


@dataclass
class EstimatorInputs:
    token_rewards: Tensor  # (B, T) float64: −β·KL_t on every real token, plus the score on the last one
    seq_rewards: Tensor  # (B,) float64: Σ_t token_rewards over real tokens, the sample's total shaped reward
    values: Tensor | None  # (B, T) float64: V(s_t) of the critic, only for estimators with needs_critic
    mask: Tensor  # (B, T) bool: real response tokens
    group_ids: Tensor  # (B,) int: samples of one prompt share their id
    gamma: float  # discount per real token (algo.gamma)
    lam: float  # GAE λ (algo.lam)


def per_sequence(values: Tensor, mask: Tensor) -> Tensor:
    """One value per sequence (B,) → the same value on each of its real tokens (B, T), 0 elsewhere."""
    import torch

    return torch.where(mask, values[:, None].expand_as(mask), 0)


@register_estimator("gae", needs_critic=True, whiten=True, paper="Schulman et al. 2016",
                    kl="per token, in the rewards GAE discounts",
                    openrlhf="`gae`: the same", verl="`gae`: the same")
def gae(x: EstimatorInputs) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation with the critic's values: A_t = Σ_k (γλ)^k δ_{t+k}, δ_t = r_t + γV_{t+1} −
    V_t; returns R_t = A_t + V_t are the critic's targets."""
    from algorithms.advantages import gae as gae_math

    return gae_math(x.token_rewards, x.values, x.mask, x.gamma, x.lam)


@register_estimator("reinforce", whiten=True, paper="Hu 2025 (REINFORCE++)",
                    kl="per token, in the rewards-to-go",
                    openrlhf="`reinforce`: the same", verl="`reinforce_plus_plus`: the same")
def reinforce(x: EstimatorInputs) -> tuple[Tensor, None]:
    """REINFORCE++: the discounted return-to-go of the shaped rewards, G_t = Σ_{k≥t} γ^(k−t) r_k, whitened over
    the batch."""
    from algorithms.advantages import discounted_returns

    return discounted_returns(x.token_rewards, x.mask, x.gamma), None


@register_estimator("reinforce_baseline", needs_groups=True, whiten=True, paper="Hu 2025 (REINFORCE++-baseline)",
                    kl="in the total shaped reward, before the group mean is subtracted",
                    openrlhf="`reinforce_baseline`: score minus group mean, then + per-token KL returns-to-go",
                    verl="`reinforce_plus_plus_baseline`: the same as ppoflow")
def reinforce_baseline(x: EstimatorInputs) -> tuple[Tensor, None]:
    """The sample's total shaped reward minus its prompt group's mean, A_i = R_i − mean_g(R), on every token,
    whitened over the batch."""
    from algorithms.advantages import group_mean_baseline

    return per_sequence(group_mean_baseline(x.seq_rewards, x.group_ids), x.mask), None


@register_estimator("rloo", needs_groups=True, paper="Ahmadian et al. 2024",
                    kl="in the total shaped reward, before the leave-one-out baseline",
                    openrlhf="`rloo`: baseline on the score, then + per-token KL returns-to-go",
                    verl="`rloo`: the same as ppoflow")
def rloo(x: EstimatorInputs) -> tuple[Tensor, None]:
    """REINFORCE leave-one-out: A_i = R_i − mean of the other samples of its group, on every token."""
    from algorithms.advantages import rloo as rloo_math

    return per_sequence(rloo_math(x.seq_rewards, x.group_ids), x.mask), None


@register_estimator("group_norm", needs_groups=True, paper="Shao et al. 2024 (GRPO)",
                    kl="in the total shaped reward, before the group normalisation",
                    openrlhf="`group_norm`: normalises the score (std + 1e-9), then + per-token KL returns-to-go",
                    verl="`grpo`: the same as ppoflow (std + 1e-6)")
def group_norm(x: EstimatorInputs) -> tuple[Tensor, None]:
    """GRPO: A_i = (R_i − mean_g(R)) / (std_g(R) + 1e-6) over the samples of its prompt, on every token."""
    from algorithms.advantages import group_norm as group_norm_math

    return per_sequence(group_norm_math(x.seq_rewards, x.group_ids), x.mask), None


@register_estimator("dr_grpo", needs_groups=True, paper="Liu et al. 2025 (Dr. GRPO)",
                    kl="in the total shaped reward, before the group mean is subtracted",
                    openrlhf="`dr_grpo`: score minus group mean, then + per-token KL returns-to-go",
                    verl="`grpo` with `norm_adv_by_std_in_grpo: false`: the same as ppoflow")
def dr_grpo(x: EstimatorInputs) -> tuple[Tensor, None]:
    """Dr. GRPO: A_i = R_i − mean_g(R), GRPO without the std scaling, on every token (pair it with
    `loss_agg: seq-mean-token-sum-norm`)."""
    from algorithms.advantages import group_norm as group_norm_math

    return per_sequence(group_norm_math(x.seq_rewards, x.group_ids, scale_by_std=False), x.mask), None
