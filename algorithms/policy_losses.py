"""The policy-loss variants (`algo.policy_loss`): each registered function gives the log importance ratio that PPO's
clipped surrogate acts on (algorithms/losses.py `policy_loss` applies the clip, dual-clip, IS weights and the
aggregation the same way for every variant).

Each takes `logp`, `old_logp` (B, T) and `mask` (B, T) bool, and returns the log-ratio (B, T), 0 at masked
positions, with the gradient flowing through `logp`. Import without torch: the bodies import it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from algorithms.registry import register_policy_loss

if TYPE_CHECKING:
    from torch import Tensor


@register_policy_loss("ppo", ratio="token", paper="Schulman et al. 2017",
                      note="with clip_eps_high: DAPO's clip-higher (Yu et al. 2025); with dual_clip: Ye et al. 2020")
def ppo(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """PPO: one ratio per token, r_t = π(a_t|s_t) / π_old(a_t|s_t)."""
    import torch

    return torch.where(mask, logp - old_logp, 0)


@register_policy_loss("gspo", ratio="sequence", paper="Zheng et al. 2025",
                      note="wants a much smaller clip_eps (3e-4 to 4e-4 in the paper)")
def gspo(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """GSPO: one length-normalised ratio per sequence, s_i = exp(mean_t (log π − log π_old)), applied per token in
    GSPO-token form log s_it = sg[log s_i] + log π_t − sg[log π_t] (so every token's gradient is s_i ∇log π_t)."""
    import torch

    token = torch.where(mask, logp - old_logp, 0)
    seq = token.sum(-1) / mask.sum(-1).clamp(min=1)  # log s_i
    logp_real = torch.where(mask, logp, 0)
    return torch.where(mask, seq.detach()[:, None] + logp_real - logp_real.detach(), 0)
