"""PPO's clipped policy and value losses, aggregated as token means over real tokens."""

from __future__ import annotations

import torch
from torch import Tensor

from algorithms.advantages import _check_same_shape, masked_mean


def _denominator(mask: Tensor, loss_denominator: float | None) -> Tensor | float:
    """The token count a summed loss is divided by: this micro-batch's by default, or the caller's global one."""
    if loss_denominator is None:
        return mask.sum().clamp(min=1)  # an all-masked micro-batch contributes 0, not NaN
    if loss_denominator <= 0:
        raise ValueError(
            f"loss_denominator={loss_denominator}: pass the (positive) number of real tokens in the optimizer step, "
            "or None to divide by this micro-batch's own count"
        )
    return loss_denominator


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    loss_denominator: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate (Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7), as a loss:

        ratio_t = exp(logp_t − old_logp_t)
        loss_t  = max(−A_t·ratio_t, −A_t·clip(ratio_t, 1 − ε, 1 + ε))
        loss    = Σ_t loss_t·mask_t / denominator

    The denominator defaults to this call's real-token count (a token mean). Pass ``loss_denominator`` = the real
    tokens of the whole optimizer step to make the summed gradient of its micro-batches equal the full-batch one,
    whatever the split (otherwise short micro-batches would weigh more per token).

    Stats (python floats, no grad, over real tokens): ``clipfrac`` — fraction where the clipped branch is the
    larger one (the token gets no gradient); ``approx_kl`` — mean of (ratio − 1) − log ratio, the k3 estimate of
    KL(π_old‖π) (http://joschu.net/blog/kl-approx.html); ``ratio_mean``.
    """
    _check_same_shape(mask, logp=logp, old_logp=old_logp, advantages=advantages)
    mask = mask.bool()
    # Neutralise masked positions before any arithmetic: junk there (−inf log-probs, NaN advantages) would be
    # dropped from the forward by the final mask but still turn into 0·inf = NaN in the backward.
    log_ratio = torch.where(mask, logp - old_logp, 0)
    advantages = torch.where(mask, advantages, 0)
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    pg_loss = torch.where(mask, torch.max(pg_loss1, pg_loss2), 0)
    loss = pg_loss.sum() / _denominator(mask, loss_denominator)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_loss2 > pg_loss1).to(ratio.dtype), mask).item(),
            "approx_kl": masked_mean((ratio - 1) - log_ratio, mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
        }
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float,
    loss_denominator: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped value loss of OpenAI baselines' PPO2, kept by RLHF trainers (TRL, OpenRLHF); see Huang et al. 2022,
    "The 37 Implementation Details of PPO", detail 9:

        v_clipped = old_v + clip(v − old_v, −ε, ε)
        loss_t    = ½·max((v − R)², (v_clipped − R)²)
        loss      = Σ_t loss_t·mask_t / denominator      (denominator as in ``policy_loss``)

    ε is in the units of the value (not a ratio). Stats (python floats, no grad, over real tokens): ``clipfrac`` —
    fraction where the clipped term is the larger one; ``values_mean``.
    """
    _check_same_shape(mask, values=values, old_values=old_values, returns=returns)
    mask = mask.bool()
    # As in policy_loss: junk at masked positions must not reach the backward as 0·NaN.
    values, old_values, returns = (torch.where(mask, x, 0) for x in (values, old_values, returns))
    vpredclipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    vf_losses1 = (values - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    vf_loss = torch.where(mask, 0.5 * torch.max(vf_losses1, vf_losses2), 0)
    loss = vf_loss.sum() / _denominator(mask, loss_denominator)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((vf_losses2 > vf_losses1).to(values.dtype), mask).item(),
            "values_mean": masked_mean(values, mask).item(),
        }
    return loss, stats


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dim, per position: H = logsumexp(z) − Σ_v softmax(z)_v·z_v.

    (..., V) → (...). This form needs one softmax and no log of probabilities; logits must be finite.
    """
    pd = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (pd * logits).sum(dim=-1)
