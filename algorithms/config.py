"""Hyper-parameters of the RL algorithm: advantage estimator, KL penalty and PPO clipping."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

GROUP_ESTIMATORS = ("group_norm",)
"""Estimators that compare samples of the same prompt, so they need several samples per prompt."""


class AlgoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    estimator: Literal["gae", "group_norm"] = "gae"
    """Advantage estimator. `gae`: generalised advantage estimation with a critic (Schulman et al. 2016) and the KL
    penalty in the reward. `group_norm`: GRPO (Shao et al. 2024), the reward normalised within each prompt's group of
    samples; no critic."""

    gamma: float = Field(1.0, ge=0.0, le=1.0)
    """Discount γ per token."""

    lam: float = Field(0.95, ge=0.0, le=1.0)
    """GAE λ."""

    clip_eps: float = Field(0.2, gt=0.0)
    """PPO ratio clip ε: the ratio is clipped to [1-ε, 1+ε]."""

    value_clip_eps: float = Field(0.2, gt=0.0)
    """Clip of the value update around the old value (clipped value loss)."""

    kl_coef: float = Field(0.01, ge=0.0)
    """β: weight of the KL(π‖π_ref) penalty."""

    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator (Schulman 2020). k1 is unbiased in the reward; k3 is the usual choice as a loss term."""

    kl_in_reward: bool = True
    """True: subtract β·KL from the per-token reward (PPO-RLHF). False: add β·KL as a loss term (GRPO)."""

    whiten_advantages: bool = True
    """Normalise advantages to mean 0, std 1 over the iteration's tokens (GAE only; GRPO is normalised already)."""

    ppo_epochs: int = Field(1, ge=1)
    """Passes over the iteration's experience in the update stage."""
