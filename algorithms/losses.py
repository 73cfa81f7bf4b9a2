"""PPO's clipped policy loss (with clip-higher, dual-clip, GSPO and IS-correction options), the clipped value loss,
loss aggregation modes, engine/trainer importance weights and entropy.

Per-token tensors are (B, T) over response tokens with ``mask`` (B, T) true on real tokens, as in
``algorithms.advantages``; junk at masked positions never reaches a loss or a gradient.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

import algorithms.policy_losses  # noqa: F401  (registers the built-in variants)
from algorithms.advantages import _check_same_shape, masked_mean
from algorithms.registry import POLICY_LOSSES

LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]

LOG_RATIO_CLAMP = 20.0
"""|log π/π_old| is clamped to this before it is exponentiated (e^20 ≈ 5e8: far outside any clip range)."""


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


def aggregate(
    loss_t: Tensor,
    mask: Tensor,
    agg: LossAgg = "token-mean",
    loss_denominator: float | None = None,
    num_seqs_denominator: float | None = None,
    norm_len: float | None = None,
) -> Tensor:
    """Reduce a per-token loss ℓ (B, T) to a scalar over real tokens (|y_i| = real tokens of row i):

        token-mean               Σ_{i,t} ℓ_it / N_tok                 PPO/DAPO: every token weighs the same
        seq-mean-token-mean      Σ_i (Σ_t ℓ_it / |y_i|) / N_seq       GRPO (Shao et al. 2024, eq. 3): every sequence
        seq-mean-token-sum-norm  Σ_i (Σ_t ℓ_it / L) / N_seq           Dr. GRPO (Liu et al. 2025): L a constant, so
                                                                      no per-length weighting of the gradient

    N_tok = ``loss_denominator`` and N_seq = ``num_seqs_denominator``: pass the optimizer step's global counts (real
    tokens; sequences) so that micro-batch losses (and gradients) add up to the full batch's; None uses this call's
    own (real tokens, clamped to ≥ 1; rows, all-masked ones included, which add 0). ``norm_len`` is L, required by
    ``seq-mean-token-sum-norm`` (e.g. the generation's max_new_tokens); it is not defaulted to the padded width
    because that changes from micro-batch to micro-batch. Denominators that the mode does not use are ignored.
    Works for any per-token term: policy loss, value loss, entropy bonus (−coef·aggregate(entropy)), KL loss.
    """
    _check_same_shape(mask, loss_t=loss_t)
    mask = mask.bool()
    x = torch.where(mask, loss_t, 0)
    if agg == "token-mean":
        return x.sum() / _denominator(mask, loss_denominator)
    if agg not in ("seq-mean-token-mean", "seq-mean-token-sum-norm"):
        raise ValueError(f"agg={agg!r}: expected 'token-mean', 'seq-mean-token-mean' or 'seq-mean-token-sum-norm'")
    if num_seqs_denominator is None:
        n_seqs = max(mask.shape[0], 1)
    elif num_seqs_denominator <= 0:
        raise ValueError(f"num_seqs_denominator={num_seqs_denominator}: pass the (positive) number of sequences in "
                         "the optimizer step, or None to divide by this micro-batch's own")
    else:
        n_seqs = num_seqs_denominator
    if agg == "seq-mean-token-mean":
        per_seq = x.sum(-1) / mask.sum(-1).clamp(min=1)
    else:
        if norm_len is None or norm_len <= 0:
            raise ValueError(f"norm_len={norm_len}: seq-mean-token-sum-norm needs Dr. GRPO's constant length L > 0 "
                             "(e.g. generation.max_new_tokens)")
        per_seq = x.sum(-1) / norm_len
    return per_seq.sum() / n_seqs


def importance_weights(
    old_logp: Tensor,
    engine_logp: Tensor,
    mask: Tensor,
    mode: Literal["tis", "icepop"],
    cap: float,
    low: float | None = None,
) -> Tensor:
    """Per-token weights that correct for the inference engine sampling from a slightly different distribution than
    the trainer computes (other kernels, precision, quantisation), (B, T), 0 at masked positions, no gradient.
    With w_t = π_old(a_t)/π_engine(a_t) = exp(old_logp_t − engine_logp_t):

        tis      w_t ← min(w_t, cap)                 truncated IS (Yao et al. 2025, "Your Efficient RL Framework
                                                     Secretly Brings You Off-Policy RL Training"; Ionides 2008)
        icepop   w_t if low ≤ w_t ≤ cap, else 0      IcePop (Ling team / inclusionAI, 2025, "Small Leak Can Sink
                                                     a Great Ship", Ring-1T): tokens whose mismatch is too large
                                                     either way are dropped from the gradient

    Multiply them into the per-token policy loss (``policy_loss(..., is_weights=w)``). A zeroed icepop token still
    counts in the loss's denominator: it is masked from the gradient, not from the batch. ``low`` is required by
    icepop and ignored by tis (which only truncates from above).
    """
    _check_same_shape(mask, old_logp=old_logp, engine_logp=engine_logp)
    if cap <= 0:
        raise ValueError(f"cap={cap}: the IS weight's upper bound must be > 0 (typically 2–5)")
    mask = mask.bool()
    with torch.no_grad():
        w = torch.exp(torch.where(mask, old_logp - engine_logp, 0))
        if mode == "tis":
            w = w.clamp(max=cap)
        elif mode == "icepop":
            if low is None or not 0 <= low <= cap:
                raise ValueError(f"low={low}: icepop keeps tokens with low ≤ w ≤ cap (={cap}); pass 0 ≤ low ≤ cap, "
                                 "e.g. 0.5")
            w = torch.where((w >= low) & (w <= cap), w, 0)
        else:
            raise ValueError(f"mode={mode!r}: expected 'tis' (truncate at cap) or 'icepop' (mask outside [low, cap])")
        return torch.where(mask, w, 0)


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    loss_denominator: float | None = None,
    *,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    variant: str = "ppo",
    is_weights: Tensor | None = None,
    agg: LossAgg = "token-mean",
    num_seqs_denominator: float | None = None,
    norm_len: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate (Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7), as a loss:

        r_t     = exp(logp_t − old_logp_t)
        loss_t  = max(−A_t·r_t, −A_t·clip(r_t, 1 − ε, 1 + ε_high))         (ε_high = ε unless given)
        loss    = aggregate(w_t·loss_t)                                     (token mean over real tokens by default)

    Options, all keyword-only; the defaults give plain PPO, bit for bit the loss before they existed:

    - ``clip_eps_high`` ε_high: DAPO's "clip-higher" (Yu et al. 2025, §3.1): r clipped to [1 − ε, 1 + ε_high], so
      low-probability tokens can grow more before the clip stops them (against entropy collapse). DAPO: ε_high=0.28.
    - ``dual_clip`` c > 1: dual-clip PPO (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL"):
      for A_t < 0, loss_t ← min(loss_t, −c·A_t), so a huge ratio on a bad token cannot blow the loss up (that
      token's gradient is then 0).
    - ``variant``: the registered policy-loss variant (algorithms/policy_losses.py) whose log-ratio the clip acts
      on: ``"ppo"``, one ratio per token, or ``"gspo"``, GSPO (Zheng et al. 2025, "Group Sequence Policy
      Optimization"). The ratio is the
      sequence's length-normalised one, s_i = exp(mean_{t real} (logp_t − old_logp_t)), clipped as a whole. It is
      applied per token in GSPO-token form (paper eq. 13–14), with stop-gradient sg:

          log s_it = sg[log s_i] + logp_t − sg[logp_t]

      so s_it has the value s_i and ∂s_it/∂logp_t = s_i: every token's clip decision is its sequence's, and each
      token's gradient is the sequence ratio times its own ∇logp_t. With an advantage constant over the sequence
      (every group estimator) this is exactly the gradient of GSPO's sequence objective −A_i·min(s_i, clip(s_i)),
      since ∂s_i/∂logp_t = s_i/|y_i| and seq-mean-token-mean divides by |y_i| (token-mean gives the same up to the
      per-sequence weight |y_i|/N_tok). GSPO uses a much smaller ε (3e-4, 4e-4 in the paper).
    - ``is_weights`` w_t (B, T): per-token weights multiplied into loss_t, no gradient through them (e.g.
      ``importance_weights``, TIS / IcePop).
    - ``agg`` with ``loss_denominator`` / ``num_seqs_denominator`` / ``norm_len``: see ``aggregate``. Pass the
      optimizer step's global counts to make micro-batch gradients add up to the full-batch one.

    Stats (python floats, no grad, means over real tokens):
    ``clipfrac`` — where the clipped term is the larger one (the token gets no gradient), = clipfrac_low +
    clipfrac_high; ``clipfrac_low`` — A < 0 and r < 1 − ε; ``clipfrac_high`` — A > 0 and r > 1 + ε_high;
    ``approx_kl`` — mean of (ρ − 1) − log ρ with ρ the *token* ratio whatever ``variant``, the k3 estimate of
    KL(π_old‖π) (http://joschu.net/blog/kl-approx.html); ``ratio_mean`` — of the ratio the loss uses (s_i under
    GSPO); ``dual_clipfrac`` (only with dual-clip) — A < 0 and the −c·A cap is active.
    """
    _check_same_shape(mask, logp=logp, old_logp=old_logp, advantages=advantages)
    if is_weights is not None:
        _check_same_shape(mask, is_weights=is_weights)
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip={dual_clip}: the dual-clip constant c must be > 1 (Ye et al. use 3), or None")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    mask = mask.bool()
    # Neutralise masked positions before any arithmetic: junk there (−inf log-probs, NaN advantages) would be
    # dropped from the forward by the final mask but still turn into 0·inf = NaN in the backward.
    token_log_ratio = torch.where(mask, logp - old_logp, 0)
    advantages = torch.where(mask, advantages, 0)
    if variant not in POLICY_LOSSES:
        raise ValueError(f"variant={variant!r}: expected a registered policy loss, one of {sorted(POLICY_LOSSES)}")
    # Clamped before exp, as verl does: a token whose log-ratio is wildly off (a broken sync, a NaN-adjacent logit)
    # would overflow exp and poison the step; within ±20 the clip decides everything anyway.
    ratio = torch.exp(POLICY_LOSSES[variant].fn(logp, old_logp, mask).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + eps_high)
    pg_loss = torch.max(pg_loss1, pg_loss2)
    if dual_clip is not None:
        pg_loss3 = -advantages * dual_clip
        capped = torch.where(advantages < 0, torch.min(pg_loss, pg_loss3), pg_loss)
        dual_active = (advantages < 0) & (pg_loss3 < pg_loss)
        pg_loss = capped
    if is_weights is not None:
        pg_loss = pg_loss * torch.where(mask, is_weights.detach(), 0)
    loss = aggregate(pg_loss, mask, agg, loss_denominator, num_seqs_denominator, norm_len)
    with torch.no_grad():
        frac = lambda cond: masked_mean(cond.to(ratio.dtype), mask).item()  # noqa: E731
        stats = {
            "clipfrac": frac(pg_loss2 > pg_loss1),
            "clipfrac_low": frac((advantages < 0) & (ratio < 1.0 - clip_eps)),
            "clipfrac_high": frac((advantages > 0) & (ratio > 1.0 + eps_high)),
            "approx_kl": masked_mean((torch.exp(token_log_ratio) - 1) - token_log_ratio, mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
        }
        if dual_clip is not None:
            stats["dual_clipfrac"] = frac(dual_active)
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float,
    loss_denominator: float | None = None,
    *,
    agg: LossAgg = "token-mean",
    num_seqs_denominator: float | None = None,
    norm_len: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped value loss of OpenAI baselines' PPO2, kept by RLHF trainers (TRL, OpenRLHF); see Huang et al. 2022,
    "The 37 Implementation Details of PPO", detail 9:

        v_clipped = old_v + clip(v − old_v, −ε, ε)
        loss_t    = ½·max((v − R)², (v_clipped − R)²)
        loss      = aggregate(loss_t)      (token mean by default; ``agg`` and denominators as in ``aggregate``)

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
    vf_loss = 0.5 * torch.max(vf_losses1, vf_losses2)
    loss = aggregate(vf_loss, mask, agg, loss_denominator, num_seqs_denominator, norm_len)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((vf_losses2 > vf_losses1).to(values.dtype), mask).item(),
            "values_mean": masked_mean(values, mask).item(),
        }
    return loss, stats


def entropy_from_logits(logits: Tensor, lse: Tensor | None = None) -> Tensor:
    """Entropy of softmax(logits) over the last dim, per position: H = logsumexp(z) − Σ_v softmax(z)_v·z_v.

    (..., V) → (...). This form needs one softmax and no log of probabilities; logits must be finite. `lse`: the
    logsumexp(z) the caller has already (the log-prob took it), so that softmax(z) = exp(z − lse) costs one pass.
    """
    if lse is None:
        pd = torch.softmax(logits, dim=-1)
        return torch.logsumexp(logits, dim=-1) - (pd * logits).sum(dim=-1)
    return lse - (torch.exp(logits - lse[..., None]) * logits).sum(dim=-1)
