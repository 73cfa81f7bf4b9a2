"""Hyper-parameters of the RL algorithm: advantage estimator, KL penalty, policy-loss variants and IS correction."""

import warnings
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

import algorithms.estimators  # noqa: F401  (registers the built-in estimators)
import algorithms.policy_losses  # noqa: F401  (registers the built-in policy losses)
from algorithms.registry import ESTIMATORS, POLICY_LOSSES

# The names a config may use are the registered ones (the JSON schema and Prefect's form list them).
Estimator = Literal[tuple(ESTIMATORS)]
PolicyLossName = Literal[tuple(POLICY_LOSSES)]


class AlgoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    estimator: Estimator = "gae"
    """Advantage estimator, a name of algorithms/estimators.py's registry: `gae` (with a critic), `reinforce`
    (REINFORCE++), `reinforce_baseline`, `rloo`, `group_norm` (GRPO), `dr_grpo`. docs/algorithms.md lists each with
    its formula, whether it trains a critic or needs groups of samples, and how it differs from the OpenRLHF and verl
    estimators of the same name."""

    gamma: float = Field(1.0, ge=0.0, le=1.0)
    """Discount γ per token (gae, reinforce)."""

    lam: float = Field(0.95, ge=0.0, le=1.0)
    """GAE λ."""

    whiten_advantages: bool = True
    """Normalise advantages to mean 0, std 1 over the iteration's tokens (gae, reinforce, reinforce_baseline)."""

    reward_clip: float | None = Field(None, gt=0.0)
    """Clip each sample's score to [-reward_clip, reward_clip] before anything else; None keeps it."""

    normalize_rewards: bool = False
    """Divide scores by a running std (mean kept) carried across iterations in the advantages stage's marker."""

    kl_coef: float = Field(0.01, ge=0.0)
    """β: weight of the KL(π‖π_ref) penalty (the initial value with the adaptive controller)."""

    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator (Schulman 2020). k1 is unbiased in the reward; k2 or k3 suit a loss term."""

    kl_in_reward: bool = True
    """True: subtract β·KL from the per-token reward (PPO-RLHF). False: add β·KL as a loss term (GRPO)."""

    kl_controller: Literal["fixed", "adaptive"] = "fixed"
    """`fixed` keeps β; `adaptive` steers it toward `kl_target` (Ziegler et al. 2019), state carried across
    iterations in the advantages stage's marker."""

    kl_target: float = Field(6.0, gt=0.0)
    """Target KL per sample of the adaptive controller."""

    kl_horizon: int = Field(10000, ge=1)
    """Horizon (samples) of the adaptive controller."""

    clip_eps: float = Field(0.2, gt=0.0)
    """PPO ratio clip ε: the ratio is clipped to [1-ε, 1+ε] (1+clip_eps_high above when set)."""

    clip_eps_high: float | None = Field(None, gt=0.0)
    """Upper clip ε_high of DAPO's "clip-higher" (asymmetric clipping); None uses clip_eps."""

    dual_clip: float | None = Field(None, gt=1.0)
    """Dual-clip constant c > 1 (Ye et al. 2020): caps the loss of negative-advantage tokens at -c·A."""

    policy_loss: PolicyLossName = "ppo"
    """Policy-loss variant, a name of algorithms/policy_losses.py's registry: `ppo` (one importance ratio per token)
    or `gspo` (GSPO, Zheng et al. 2025: one length-normalised ratio per sequence). docs/algorithms.md lists them."""

    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    """How per-token losses become one number: over all tokens of the optimizer step; per sequence then over
    sequences; or per-sequence sums over a constant length (Dr. GRPO, norm = generation.max_new_tokens)."""

    entropy_coef: float = Field(0.0, ge=0.0)
    """Entropy bonus weight."""

    is_correction: Literal["none", "tis", "icepop"] = "none"
    """Importance-sampling correction for the engine/trainer mismatch: `tis` truncates w = π_old/π_engine at
    `is_cap`; `icepop` masks tokens whose w leaves [is_low, is_cap]. With `max_staleness` ≥ 1 the engine's policy
    is older than π_old and w is the behaviour-policy weight of AReaL's decoupled PPO objective: there the default
    becomes `tis` (docs/async.md); `none` must then be written to train without it."""

    is_cap: float = Field(2.0, gt=1.0)
    """Upper bound of the IS weight."""

    is_low: float = Field(0.5, gt=0.0, lt=1.0)
    """Lower bound of the IS weight (icepop)."""

    max_logprob_gap: float | None = Field(None, gt=1.0)
    """Logprob gate: the bound on `rollout/logprob_diff_mean` = mean exp|engine − trainer logprob| over the rollout's
    response tokens (≥ 1; 1 is exact agreement). Above it the score stage fails the iteration before committing: the
    engine did not sample from the policy version the trainer scores (a broken or skipped weight sync) or their
    numerics disagree. None picks it by `model.dtype`: 1.043 for bfloat16 (engine and trainer kernels differ by a few
    1e-3 per token), 1.01 for float32 (they agree to ~1e-6), both far under what one unsynced update gives; the
    measurements are in bench/RESULTS.md and tests/flows/test_logprob_gate.py. `.inf` turns it off."""

    max_staleness: int = Field(0, ge=0)
    """S, how many policy versions a rollout may lag behind the policy its update starts from. 0: the synchronous
    loop (iteration n samples from policy n−1, the one its update trains). S ≥ 1: iteration n samples from policy
    max(0, n−1−S), exactly, and the engines generate iteration n+S while the trainers score, update and sync iteration
    n (flows/ppo.py; stages/pipeline.py). Needs engines and trainers on resources of their own
    (`generation.placement: standard`). The rollouts keep their version and staleness, the IS weight between the
    engine's policy and π_old goes through `is_correction` (default `tis` here), and the logprob gate checks each
    policy version on the engines at its sync (docs/async.md)."""

    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop prompt groups whose samples all got the same reward (no group-relative signal)
    and generate for more prompts until the batch holds data.prompts_per_iteration informative groups. Rewards are
    computed once in the generate stage to filter (the reward function must be deterministic) and again in score."""

    max_sampling_rounds: int = Field(3, ge=1)
    """Generation rounds of dynamic sampling per iteration, each over prompts_per_iteration new prompts. When the
    batch is still short after the last round, the first dropped groups fill it (counted in
    `rollout/groups_filled`) so every iteration trains on the same number of samples."""

    overlong_buffer: int | None = Field(None, ge=1)
    """DAPO soft overlong punishment: responses longer than generation.max_new_tokens − overlong_buffer lose up to
    `overlong_penalty` from their score, linearly; None turns it off."""

    overlong_penalty: float = Field(1.0, ge=0.0)
    """Largest overlong punishment (at the length limit)."""

    value_clip_eps: float = Field(0.2, gt=0.0)
    """Clip of the value update around the old value (clipped value loss)."""

    ppo_epochs: int = Field(1, ge=1)
    """Passes over the iteration's experience in the update stage."""

    @model_validator(mode="before")
    @classmethod
    def _renamed_fields(cls, data: Any) -> Any:
        return upgrade(data)

    @model_validator(mode="after")
    def _decoupled_by_default(self) -> "AlgoConfig":
        # Stale rollouts come from an older policy than π_old: AReaL's decoupled objective weights each token by
        # π_old/π_behaviour, which is_correction computes; truncated (tis) unless the config says otherwise.
        if self.max_staleness > 0 and "is_correction" not in self.model_fields_set:
            self.is_correction = "tis"
        return self

    @model_validator(mode="after")
    def _kl_advice(self) -> "AlgoConfig":
        # Schulman's note: k1 is the unbiased estimator of the KL value (what a reward penalty needs); as a loss its
        # gradient is zero in expectation, so a KL loss term should use k2 or k3 (GRPO uses k3).
        if self.kl_coef > 0 and not self.kl_in_reward and self.kl_estimator == "k1":
            warnings.warn("algo.kl_estimator: k1 as a loss term has zero expected gradient; use k3 (or k2) with "
                          "algo.kl_in_reward=false", stacklevel=2)
        return self


def upgrade(algo: Any) -> Any:
    """An `algo` section written before a field was renamed, in today's names (configs and run manifests):
    `ratio_level: token | sequence` is `policy_loss: ppo | gspo`."""
    if isinstance(algo, dict) and "ratio_level" in algo:
        algo = dict(algo)
        level = algo.pop("ratio_level")
        if level not in ("token", "sequence"):
            raise ValueError(f"ratio_level: expected token or sequence, got {level!r} (renamed: use policy_loss: ppo "
                             "or gspo)")
        algo.setdefault("policy_loss", "gspo" if level == "sequence" else "ppo")
    return algo

