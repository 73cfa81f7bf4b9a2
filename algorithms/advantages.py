"""Advantage estimators and the masked reductions they rely on.

Per-token tensors are (B, T) over response tokens: B sequences, T the padded response length, and ``mask`` (B, T) is
1/True on real tokens. Per-token outputs are 0 at masked positions, and whatever an input holds at a masked position
(padding, junk, even NaN) never reaches a real position: masking uses ``torch.where``, not a product, because
0·NaN = NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_same_shape(mask: Tensor, **tensors: Tensor) -> None:
    """Raise if a per-token tensor is not shaped like ``mask``: (B, 1) against (B, T) would broadcast silently."""
    for name, x in tensors.items():
        if x.shape != mask.shape:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)} but mask has {tuple(mask.shape)}: "
                "pass per-token tensors (B, T) aligned with the response mask"
            )


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Mean over real tokens: sum(x·mask) / sum(mask), and 0 (not NaN) where there are none.

    An all-masked row (a sample with no policy token) then adds nothing to a loss or a metric instead of poisoning
    it with NaN. ``dim=None`` reduces over everything; otherwise over ``dim`` as ``Tensor.sum`` does.
    """
    mask = mask.bool()
    total = torch.where(mask, x, 0).sum() if dim is None else torch.where(mask, x, 0).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1).to(total.dtype)


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Masked whitening over all real tokens of the batch: (x − μ) / sqrt(σ² + eps).

    The usual PPO advantage normalisation (OpenAI baselines, CleanRL ``norm_adv``, OpenRLHF, TRL ``masked_whiten``).
    μ and σ² come from real tokens only, so padding does not drag them; σ² is the population variance (divides by
    the token count, as OpenRLHF does): over thousands of tokens Bessel's correction is immaterial, and a batch with
    a single real token gives 0 rather than 0/0. ``shift_mean=False`` adds μ back, (x − μ)/sqrt(σ² + eps) + μ, so
    the spread is normalised but the level kept (TRL's semantics, used when whitening rewards).
    """
    _check_same_shape(mask, x=x)
    mask = mask.bool()
    x = torch.where(mask, x, 0)  # so junk at masked positions cannot reach a gradient as 0·NaN
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0)


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE").

        delta_t = r_t + γ·V_{t+1} − V_t
        A_t     = delta_t + γλ·A_{t+1}
        R_t     = A_t + V_t            (the critic's target, "returns")

    The episode ends after the last real token: V = 0 beyond it (a response cut at the length limit is treated as
    terminal too, the usual RLHF convention). Returns ``(advantages, returns)``, (B, T), 0 at masked positions;
    computed without grad because both are targets, never differentiated.

    Holes (masked positions between real tokens: tool output, user turns, anything the policy did not sample) are
    skipped: the recursion passes straight through them, so the next *real* token's value bootstraps the previous
    real token, and γ, λ discount once per real token. Why: the policy acts only at its own tokens; a hole is the
    environment's reply, part of the transition from one action to the next, not a step of the MDP. Counting hole
    tokens would discount a later reward by how long a tool's output happened to be, and the critic's values on
    tokens the policy never chose would leak into the targets. Rewards and values at masked positions are ignored,
    so put an environment reward on a real token (e.g. the last one before the hole). verl's multi-turn GAE makes
    the same choice ("skip values and TD-error on observation tokens").
    """
    _check_same_shape(mask, rewards=rewards, values=values)
    mask = mask.bool()
    B, T = mask.shape
    advantages = torch.zeros_like(values)
    nextvalues = values.new_zeros(B)  # V after the last real token: terminal
    lastgaelam = values.new_zeros(B)
    for t in reversed(range(T)):
        real = mask[:, t]
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        gaelam = delta + gamma * lam * lastgaelam
        # At a hole, keep the state of the next real token so it bootstraps the previous real one.
        lastgaelam = torch.where(real, gaelam, lastgaelam)
        nextvalues = torch.where(real, values[:, t], nextvalues)
        advantages[:, t] = torch.where(real, gaelam, 0)
    returns = torch.where(mask, advantages + values, 0)
    return advantages, returns


def _check_scores(scores: Tensor, group_ids: Tensor) -> None:
    if scores.dim() != 1 or group_ids.shape != scores.shape:
        raise ValueError(
            f"scores {tuple(scores.shape)} and group_ids {tuple(group_ids.shape)} must both be (B,): one score and "
            "one prompt id per sequence"
        )


def _group_centered(scores: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """r_i − mean(r_g) for every sample, with each sample's group index and the group sizes (float).

    Scores are centred on a member of their group (its minimum) before the mean is taken, so ties give exactly 0:
    the rounding error of a float mean cannot survive as ~1e-17 noise that a later division (a ~0 std, a whitening)
    would blow up to ±O(1)."""
    _check_scores(scores, group_ids)
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    G = counts.numel()
    counts = counts.to(scores.dtype)
    pivot = scores.new_zeros(G).scatter_reduce(0, inverse, scores, reduce="amin", include_self=False)
    shifted = scores - pivot[inverse]
    mean = shifted.new_zeros(G).index_add(0, inverse, shifted) / counts
    return shifted - mean[inverse], inverse, counts


def group_norm(scores: Tensor, group_ids: Tensor, eps: float = 1e-6, scale_by_std: bool = True) -> Tensor:
    """GRPO's group-relative advantage (Shao et al. 2024, DeepSeekMath, §4.1.2), one value per sequence:

        A_i = (r_i − mean(r_g)) / (std(r_g) + eps)      over the group g of samples sharing i's prompt

    ``scores`` (B,) and ``group_ids`` (B,) integers; groups need not be contiguous. std is the unbiased sample std
    (divides by n − 1), torch's ``.std()`` default, as in OpenRLHF's ``group_norm`` and TRL's GRPOTrainer. A group
    of one has nothing to compare against: its advantage is 0, not NaN.

    ``scale_by_std=False`` is **Dr. GRPO** (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical
    Perspective", §3.1): A_i = r_i − mean(r_g), mean-only centering, which drops the std's bias toward groups whose
    scores barely vary (too easy or too hard prompts). It equals ``group_mean_baseline``. Dr. GRPO's other half, a
    constant length normaliser, is ``losses.aggregate(..., "seq-mean-token-sum-norm")``.

    Ties give exactly 0 (see ``_group_centered``).
    """
    centered, inverse, counts = _group_centered(scores, group_ids)
    if not scale_by_std:
        return centered
    var = centered.new_zeros(counts.numel()).index_add(0, inverse, centered**2) / (counts - 1).clamp(min=1)
    return centered / (var.sqrt()[inverse] + eps)


def kl_shaped_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token reward with the KL penalty folded in (Ziegler et al. 2019; Ouyang et al. 2022, InstructGPT):

        r_t = −β·kl_t + [t is the last real token]·score          (β = ``kl_coef``)

    ``kl`` (B, T) is a per-token estimate of KL(π‖π_ref), e.g. ``algorithms.kl.kl_estimate(..., "k1")``; ``scores``
    (B,) is the sequence-level reward. The score lands on the last real token because the reward model judges the
    response once it is complete. All-masked rows give zeros (their score has no token to land on).
    """
    _check_same_shape(mask, kl=kl)
    if scores.shape != mask.shape[:1]:
        raise ValueError(f"scores has shape {tuple(scores.shape)}; expected ({mask.shape[0]},): one per sequence")
    mask = mask.bool()
    B, T = mask.shape
    rewards = torch.where(mask, -kl_coef * kl, 0)
    positions = torch.arange(T, device=mask.device).expand(B, T)
    last = torch.where(mask, positions, -1).amax(dim=-1)  # (B,) last real token; −1 when the row has none
    score = torch.where(last >= 0, scores, 0).to(rewards.dtype)
    return rewards.scatter_add(1, last.clamp(min=0).unsqueeze(1), score.unsqueeze(1))


@torch.no_grad()
def discounted_returns(token_rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Discounted return-to-go over real tokens, the advantage of REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and
    Efficient Approach for Aligning Large Language Models"), which the caller then whitens over the batch:

        G_t = Σ_{k≥t, k real} γ^{n(t,k)}·r_k       n(t,k) = number of real tokens after t up to and including k
                                                  (so γ^{k−t} when the row has no holes)

    ``token_rewards`` (B, T) is typically ``kl_shaped_rewards(...)``. Holes are skipped exactly as in ``gae``: the
    recursion G_t = r_t + γ·G_next passes through them, γ counts real tokens, rewards at masked positions are
    ignored. It is ``gae`` with V ≡ 0 and λ = 1. Output (B, T), 0 at masked positions, computed without grad.
    """
    _check_same_shape(mask, token_rewards=token_rewards)
    mask = mask.bool()
    returns = torch.zeros_like(token_rewards)
    running = token_rewards.new_zeros(token_rewards.shape[0])  # G of the next real token; 0 after the last
    for t in reversed(range(token_rewards.shape[1])):
        real = mask[:, t]
        running = torch.where(real, token_rewards[:, t] + gamma * running, running)
        returns[:, t] = torch.where(real, running, 0)
    return returns


def group_mean_baseline(scores: Tensor, group_ids: Tensor) -> Tensor:
    """REINFORCE with the prompt group's mean score as baseline (OpenRLHF's ``reinforce_baseline``), (B,):

        A_i = r_i − mean_{j∈g} r_j

    The same number as Dr. GRPO (``group_norm(..., scale_by_std=False)``); OpenRLHF then whitens it over the batch's
    tokens, which is the caller's business. A group of one gives 0; ties give exactly 0.
    """
    return _group_centered(scores, group_ids)[0]


def rloo(scores: Tensor, group_ids: Tensor) -> Tensor:
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
    Learning from Human Feedback in LLMs"; Kool et al. 2019), (B,):

        A_i = r_i − 1/(n−1)·Σ_{j∈g, j≠i} r_j  =  n/(n−1)·(r_i − mean_{j∈g} r_j)

    n the size of i's group. The baseline leaves the sample itself out, so it is independent of r_i and the
    estimator unbiased. Computed through the right-hand form so ties give exactly 0. A group of one has no other
    sample to compare with: its advantage is 0.
    """
    centered, inverse, counts = _group_centered(scores, group_ids)
    n = counts[inverse]
    return torch.where(n > 1, centered * n / (n - 1).clamp(min=1), 0)


def clip_rewards(scores: Tensor, clip: float | None) -> Tensor:
    """Clip sequence scores to [−clip, clip]; ``None`` returns them unchanged. One outlier reward (a reward model
    extrapolating far off its training distribution) then cannot dominate a batch's advantages."""
    if clip is None:
        return scores
    if clip <= 0:
        raise ValueError(f"clip={clip}: pass a positive bound on |score|, or None to keep scores as they are")
    return scores.clamp(-clip, clip)


class RunningMeanStd:
    """Running mean and population variance of every value seen, merged batch by batch with the parallel update of
    Chan, Golub & LeVeque 1979 (Welford's online algorithm generalised to batches):

        n' = n + n_b;   δ = μ_b − μ;   μ' = μ + δ·n_b/n';   M2' = M2 + M2_b + δ²·n·n_b/n';   σ² = M2/n

    so after any sequence of ``update`` calls, mean and var equal those of the concatenation. ``normalize`` divides
    by sqrt(σ² + eps) and keeps the level, x/σ (the reward's sign and offset carry meaning: OpenRLHF's
    ``normalize_reward``, TRL's reward scaling). Before any update σ² is 1, so normalize is the identity.

    The state is plain floats (``state_dict``/``load_state_dict``) so a stage can store it in its commit marker and
    the next iteration continue from it. Accumulates in float64 whatever the input dtype.
    """

    def __init__(self, eps: float = 1e-8):
        self.count, self.mean, self.m2, self.eps = 0.0, 0.0, 0.0, eps

    def update(self, x: Tensor) -> None:
        """Merge every element of ``x`` (any shape; mask it first if it holds padding)."""
        x = x.detach().double().flatten()
        n_b = float(x.numel())
        if n_b == 0:
            return
        mean_b = float(x.mean())
        m2_b = float(((x - mean_b) ** 2).sum())
        total = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / total
        self.m2 += m2_b + delta**2 * self.count * n_b / total
        self.count = total

    @property
    def var(self) -> float:
        return self.m2 / self.count if self.count else 1.0

    @property
    def std(self) -> float:
        return self.var**0.5

    def normalize(self, x: Tensor) -> Tensor:
        return x / (self.var + self.eps) ** 0.5

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = float(state["count"]), float(state["mean"]), float(state["m2"])
