"""algorithms.losses against plain Python loops written independently of the vectorised code."""

import math
import random

import pytest
import torch

from algorithms.losses import aggregate, entropy_from_logits, importance_weights, policy_loss, value_loss

SEEDS = range(50)
B, T = 7, 9


def assert_close(actual, expected):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)


def random_mask(rng: random.Random, B: int, T: int) -> torch.Tensor:
    """(B, T) bool with every kind of row: full, right-padded, holes then right-padded, all-masked."""
    kinds = ["full", "right", "holes", "empty"] + [rng.choice(["full", "right", "holes"]) for _ in range(B - 4)]
    rng.shuffle(kinds)
    rows = []
    for kind in kinds:
        length = {"full": T, "right": rng.randint(1, T - 1), "holes": rng.randint(2, T), "empty": 0}[kind]
        row = [t < length for t in range(T)]
        if kind == "holes":
            row = [r and (t in (0, length - 1) or rng.random() < 0.5) for t, r in enumerate(row)]
        rows.append(row)
    return torch.tensor(rows)


def policy_inputs(seed):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    mask = random_mask(rng, B, T)
    old_logp = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 4
    # log-ratios of ±0.3 so that, with ε = 0.2, both branches of the clip occur in every batch.
    logp = (old_logp + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)).requires_grad_()
    advantages = torch.randn(B, T, generator=gen, dtype=torch.float64)
    return logp, old_logp, advantages, mask


def policy_loop(logp, old_logp, advantages, mask, eps, denominator=None):
    """Loss, d loss / d logp and stats of the clipped surrogate, one token at a time."""
    total, n, clipped, low, high, kl, ratios = 0.0, 0, 0, 0, 0, 0.0, 0.0
    grad = [[0.0] * len(row) for row in logp]
    terms = []
    for b in range(len(logp)):
        for t in range(len(logp[b])):
            if not mask[b][t]:
                continue
            a = advantages[b][t]
            ratio = math.exp(logp[b][t] - old_logp[b][t])
            unclipped = -a * ratio
            clipped_term = -a * min(max(ratio, 1 - eps), 1 + eps)
            is_clipped = clipped_term > unclipped  # the max picks the clipped term: its gradient is 0
            terms.append((b, t, 0.0 if is_clipped else -a * ratio))
            total += max(unclipped, clipped_term)
            n += 1
            clipped += is_clipped
            low += a < 0 and ratio < 1 - eps
            high += a > 0 and ratio > 1 + eps
            kl += (ratio - 1) - math.log(ratio)
            ratios += ratio
    denominator = denominator if denominator is not None else max(n, 1)
    for b, t, g in terms:
        grad[b][t] = g / denominator
    stats = {"clipfrac": clipped / max(n, 1), "clipfrac_low": low / max(n, 1), "clipfrac_high": high / max(n, 1),
             "approx_kl": kl / max(n, 1), "ratio_mean": ratios / max(n, 1)}
    return total / denominator, grad, stats


@pytest.mark.parametrize("seed", SEEDS)
def test_policy_loss_matches_loop(seed):
    logp, old_logp, advantages, mask = policy_inputs(seed)
    loss, stats = policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2)
    loss.backward()
    loss_ref, grad_ref, stats_ref = policy_loop(
        logp.tolist(), old_logp.tolist(), advantages.tolist(), mask.tolist(), 0.2
    )
    assert_close(loss, loss_ref)
    assert_close(logp.grad, grad_ref)
    assert stats.keys() == stats_ref.keys()
    for key, value in stats.items():
        assert isinstance(value, float)
        assert math.isclose(value, stats_ref[key], rel_tol=1e-6, abs_tol=1e-6), key


@pytest.mark.parametrize("seed", range(10))
def test_policy_loss_micro_batches_with_global_denominator_equal_full_batch(seed):
    logp, old_logp, advantages, mask = policy_inputs(seed)
    full, _ = policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2)
    (full_grad,) = torch.autograd.grad(full, logp)

    denominator = mask.sum().item()
    split = 3
    micro = [
        policy_loss(logp[rows], old_logp[rows], advantages[rows], mask[rows], 0.2, loss_denominator=denominator)[0]
        for rows in (slice(0, split), slice(split, B))
    ]
    (micro_grad,) = torch.autograd.grad(sum(micro), logp)
    assert_close(sum(micro), full)
    assert_close(micro_grad, full_grad)


def test_policy_loss_junk_at_masked_positions_stays_out_of_loss_and_grad():
    logp, old_logp, advantages, mask = policy_inputs(0)
    clean, _ = policy_loss(logp, old_logp, advantages, mask, 0.2)
    (clean_grad,) = torch.autograd.grad(clean, logp)
    junk_logp = torch.where(mask, logp.detach(), float("-inf")).requires_grad_()
    junk, _ = policy_loss(junk_logp, old_logp, advantages.masked_fill(~mask, float("nan")), mask, 0.2)
    junk.backward()
    assert_close(junk, clean)
    assert_close(junk_logp.grad, clean_grad)


def test_policy_loss_all_masked_is_zero():
    loss, stats = policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3), 0.2)
    assert loss.item() == 0.0
    assert stats == {"clipfrac": 0.0, "clipfrac_low": 0.0, "clipfrac_high": 0.0, "approx_kl": 0.0, "ratio_mean": 0.0}


def test_policy_loss_float32():
    logp, old_logp, advantages, mask = policy_inputs(3)
    loss64, _ = policy_loss(logp.detach(), old_logp, advantages, mask, 0.2)
    loss32, _ = policy_loss(logp.detach().float(), old_logp.float(), advantages.float(), mask, 0.2)
    assert loss32.dtype == torch.float32
    torch.testing.assert_close(loss32, loss64.float(), atol=1e-5, rtol=1e-5)


def test_loss_denominator_must_be_positive():
    with pytest.raises(ValueError, match="loss_denominator"):
        policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), 0.2, loss_denominator=0)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 1), torch.ones(2, 3), 0.2)


def _ppo_loss_before_options(logp, old_logp, advantages, mask, clip_eps, loss_denominator=None):
    """policy_loss's loss as it was before the options existed, verbatim: the defaults must reproduce it bit for bit."""
    mask = mask.bool()
    log_ratio = torch.where(mask, logp - old_logp, 0)
    advantages = torch.where(mask, advantages, 0)
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    pg_loss = torch.where(mask, torch.max(pg_loss1, pg_loss2), 0)
    return pg_loss.sum() / (mask.sum().clamp(min=1) if loss_denominator is None else loss_denominator)


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_policy_loss_defaults_reproduce_plain_ppo_exactly(seed, dtype):
    logp, old_logp, advantages, mask = (x.detach().to(dtype) if x.is_floating_point() else x
                                        for x in policy_inputs(seed))
    for denominator in (None, 50.0):
        results = []
        for call in (
            lambda lp: _ppo_loss_before_options(lp, old_logp, advantages, mask, 0.2, denominator),
            lambda lp: policy_loss(lp, old_logp, advantages, mask, 0.2, denominator)[0],
            # Options at their neutral values are the plain loss too.
            lambda lp: policy_loss(lp, old_logp, advantages, mask, 0.2, denominator, clip_eps_high=0.2,
                                   is_weights=torch.ones_like(lp), agg="token-mean", num_seqs_denominator=3.0)[0],
        ):
            lp = logp.clone().requires_grad_()
            loss = call(lp)
            results.append((loss, torch.autograd.grad(loss, lp)[0]))
        for loss, grad in results[1:]:
            assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


def option_inputs(seed):
    """Inputs and a random draw of the options; log-ratios of ±0.5 so every clip branch (low, high, dual) occurs."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    mask = random_mask(rng, B, T)
    old_logp = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 4
    logp = (old_logp + 0.5 * torch.randn(B, T, generator=gen, dtype=torch.float64)).requires_grad_()
    advantages = torch.randn(B, T, generator=gen, dtype=torch.float64)
    options = {
        "clip_eps_high": rng.choice([None, 0.28]),
        "dual_clip": rng.choice([None, 1.3]),
        "is_weights": rng.choice([None, 2 * torch.rand(B, T, generator=gen, dtype=torch.float64)]),
        "agg": rng.choice(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]),
        "variant": rng.choice(["ppo", "gspo"]),
        "norm_len": 12.0,
    }
    if rng.random() < 0.5:  # global counts, as the trainer passes them, or this call's own
        options["loss_denominator"], options["num_seqs_denominator"] = 60.0, 11.0
    return logp, old_logp, advantages, mask, options


def options_loop(logp, old_logp, advantages, mask, eps, clip_eps_high=None, dual_clip=None, is_weights=None,
                 agg="token-mean", variant="ppo", loss_denominator=None, num_seqs_denominator=None,
                 norm_len=None):
    """Loss, d loss / d logp and stats, one token at a time, from the docstring's definitions.

    variant="gspo" is GSPO-token (Zheng et al. 2025, eq. 13–14): every token's ratio is its sequence's
    s_i = exp(mean_t (logp_t − old_logp_t)) and its gradient is s_i·∇logp_t."""
    eps_high = eps if clip_eps_high is None else clip_eps_high
    n_tokens = sum(m for row in mask for m in row)
    n_tok = loss_denominator if loss_denominator is not None else max(n_tokens, 1)
    n_seq = num_seqs_denominator if num_seqs_denominator is not None else len(mask)
    total, grad = 0.0, [[0.0] * len(row) for row in logp]
    counts = {"clipfrac": 0, "clipfrac_low": 0, "clipfrac_high": 0, "dual_clipfrac": 0, "approx_kl": 0.0,
              "ratio_mean": 0.0}
    for b in range(len(logp)):
        real = [t for t, m in enumerate(mask[b]) if m]
        s_i = math.exp(sum(logp[b][t] - old_logp[b][t] for t in real) / len(real)) if real else 1.0
        for t in real:
            a = advantages[b][t]
            token_ratio = math.exp(logp[b][t] - old_logp[b][t])
            ratio = token_ratio if variant == "ppo" else s_i
            unclipped, clipped = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps_high)
            loss, d_loss = (clipped, 0.0) if clipped > unclipped else (unclipped, -a * ratio)
            counts["clipfrac"] += clipped > unclipped
            counts["clipfrac_low"] += a < 0 and ratio < 1 - eps
            counts["clipfrac_high"] += a > 0 and ratio > 1 + eps_high
            if dual_clip is not None and a < 0 and -dual_clip * a < loss:
                loss, d_loss = -dual_clip * a, 0.0
                counts["dual_clipfrac"] += 1
            w = is_weights[b][t] if is_weights is not None else 1.0
            weight = {"token-mean": 1 / n_tok, "seq-mean-token-mean": 1 / (len(real) * n_seq),
                      "seq-mean-token-sum-norm": 1 / (norm_len * n_seq)}[agg]
            total += weight * w * loss
            grad[b][t] = weight * w * d_loss
            counts["approx_kl"] += (token_ratio - 1) - math.log(token_ratio)
            counts["ratio_mean"] += ratio
    stats = {k: v / max(n_tokens, 1) for k, v in counts.items()}
    if dual_clip is None:
        del stats["dual_clipfrac"]
    return total, grad, stats


@pytest.mark.parametrize("seed", SEEDS)
def test_policy_loss_options_match_loop(seed):
    logp, old_logp, advantages, mask, options = option_inputs(seed)
    loss, stats = policy_loss(logp, old_logp, advantages, mask, 0.2, **options)
    loss.backward()
    plain = {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    loss_ref, grad_ref, stats_ref = options_loop(
        logp.tolist(), old_logp.tolist(), advantages.tolist(), mask.tolist(), 0.2, **plain
    )
    assert_close(loss, loss_ref)
    assert_close(logp.grad, grad_ref)
    assert stats.keys() == stats_ref.keys()
    for key, value in stats.items():
        assert math.isclose(value, stats_ref[key], rel_tol=1e-6, abs_tol=1e-6), key
    assert math.isclose(stats["clipfrac"], stats["clipfrac_low"] + stats["clipfrac_high"], abs_tol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_gspo_gradient_is_the_sequence_objective_gradient(seed, agg):
    """GSPO (Zheng et al. 2025, eq. 5–7) as the paper defines it, differentiated by autograd through s_i and all of
    its tokens (no stop-gradient), against policy_loss(variant="gspo"). With a sequence-constant advantage
    (and IS weight) the two must agree for every aggregation, each sequence weighted as the aggregation weighs its
    tokens: |y_i|/N_tok (token-mean), 1/N_seq (seq-mean-token-mean), |y_i|/(L·N_seq) (token-sum-norm)."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    mask = random_mask(rng, B, T)
    old_logp = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 4
    logp = (old_logp + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)).requires_grad_()
    seq_adv = torch.randn(B, generator=gen, dtype=torch.float64)
    seq_w = torch.rand(B, generator=gen, dtype=torch.float64)
    advantages, is_weights = seq_adv[:, None].expand(B, T).clone(), seq_w[:, None].expand(B, T).clone()
    eps, eps_high, dual, L = 0.05, 0.08, rng.choice([None, 1.05]), 11.0

    loss, _ = policy_loss(logp, old_logp, advantages, mask, eps, clip_eps_high=eps_high, dual_clip=dual,
                          variant="gspo", is_weights=is_weights, agg=agg, norm_len=L)
    (grad,) = torch.autograd.grad(loss, logp)

    n_tok, n_seq = max(int(mask.sum()), 1), B
    loop_logp = logp.detach().clone().requires_grad_()
    total = torch.zeros((), dtype=torch.float64)
    for b in range(B):
        real = [t for t in range(T) if mask[b, t]]
        if not real:
            continue
        s = torch.exp(sum(loop_logp[b, t] - old_logp[b, t] for t in real) / len(real))
        a = seq_adv[b]
        seq_loss = max(-a * s, -a * torch.clamp(s, 1 - eps, 1 + eps_high))
        if dual is not None and a < 0:
            seq_loss = min(seq_loss, -a * dual)
        weight = {"token-mean": len(real) / n_tok, "seq-mean-token-mean": 1 / n_seq,
                  "seq-mean-token-sum-norm": len(real) / (L * n_seq)}[agg]
        total = total + weight * seq_w[b] * seq_loss
    (grad_ref,) = torch.autograd.grad(total, loop_logp, allow_unused=True) if total.requires_grad else (None,)
    assert_close(loss, total)
    assert_close(grad, grad_ref if grad_ref is not None else torch.zeros_like(grad))


def test_is_weights_get_no_gradient():
    logp, old_logp, advantages, mask = policy_inputs(0)
    weights = torch.rand(B, T, dtype=torch.float64).requires_grad_()
    loss, _ = policy_loss(logp, old_logp, advantages, mask, 0.2, is_weights=weights)
    loss.backward()
    assert weights.grad is None and logp.grad is not None


@pytest.mark.parametrize("variant", ["ppo", "gspo"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("seed", range(10))
def test_policy_loss_every_aggregation_is_micro_batch_invariant(seed, agg, variant):
    logp, old_logp, advantages, mask, options = option_inputs(seed)
    options.update(agg=agg, variant=variant, loss_denominator=float(mask.sum()), num_seqs_denominator=B)
    weights = options.pop("is_weights")
    whole, _ = policy_loss(logp, old_logp, advantages, mask, 0.2, is_weights=weights, **options)
    (whole_grad,) = torch.autograd.grad(whole, logp)
    halves = sum(
        policy_loss(logp[rows], old_logp[rows], advantages[rows], mask[rows], 0.2,
                    is_weights=None if weights is None else weights[rows], **options)[0]
        for rows in (slice(0, 3), slice(3, B))
    )
    (halves_grad,) = torch.autograd.grad(halves, logp)
    assert_close(halves, whole)
    assert_close(halves_grad, whole_grad)


def test_policy_loss_rejects_bad_options():
    x, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(x, x, x, mask, 0.2, dual_clip=1.0)
    with pytest.raises(ValueError, match="variant"):
        policy_loss(x, x, x, mask, 0.2, variant="tokens")
    with pytest.raises(ValueError, match="is_weights"):
        policy_loss(x, x, x, mask, 0.2, is_weights=torch.ones(2, 1))
    with pytest.raises(ValueError, match="norm_len"):
        policy_loss(x, x, x, mask, 0.2, agg="seq-mean-token-sum-norm")


# --- aggregate ---------------------------------------------------------------------------------------------------


def aggregate_loop(x, mask, agg, loss_denominator=None, num_seqs_denominator=None, norm_len=None):
    rows = [[v for v, m in zip(xr, mr) if m] for xr, mr in zip(x, mask)]
    if agg == "token-mean":
        n = loss_denominator if loss_denominator is not None else max(sum(len(r) for r in rows), 1)
        return sum(sum(r) for r in rows) / n
    n_seqs = num_seqs_denominator if num_seqs_denominator is not None else len(rows)
    if agg == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in rows if r) / n_seqs
    return sum(sum(r) / norm_len for r in rows) / n_seqs


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregate_matches_loop(seed, agg):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    mask = random_mask(rng, B, T)
    x = torch.randn(B, T, generator=gen, dtype=torch.float64)
    denominators = rng.choice([{}, {"loss_denominator": 40.0, "num_seqs_denominator": 13.0}])
    expected = aggregate_loop(x.tolist(), mask.tolist(), agg, norm_len=15.0, **denominators)
    junk = x.masked_fill(~mask, float("nan"))  # what sits at masked positions must not matter
    assert_close(aggregate(junk, mask, agg, norm_len=15.0, **denominators), expected)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("seed", range(10))
def test_aggregate_micro_batch_invariant_and_all_masked_is_zero(seed, agg):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    mask = random_mask(rng, B, T)
    x = torch.randn(B, T, generator=gen, dtype=torch.float64).requires_grad_()
    glob = {"loss_denominator": float(mask.sum()), "num_seqs_denominator": float(B), "norm_len": 9.0}
    whole = aggregate(x, mask, agg, **glob)
    (whole_grad,) = torch.autograd.grad(whole, x)
    halves = aggregate(x[:4], mask[:4], agg, **glob) + aggregate(x[4:], mask[4:], agg, **glob)
    (halves_grad,) = torch.autograd.grad(halves, x)
    assert_close(halves, whole)
    assert_close(halves_grad, whole_grad)
    assert aggregate(x, torch.zeros(B, T, dtype=torch.bool), agg, norm_len=9.0).item() == 0.0


def test_aggregate_rejects_bad_arguments():
    x, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="agg"):
        aggregate(x, mask, "sequence-mean")
    with pytest.raises(ValueError, match="num_seqs_denominator"):
        aggregate(x, mask, "seq-mean-token-mean", num_seqs_denominator=0)
    with pytest.raises(ValueError, match="norm_len"):
        aggregate(x, mask, "seq-mean-token-sum-norm")


# --- importance_weights ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_importance_weights_match_loop(seed):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    mask = random_mask(rng, B, T)
    old_logp = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 4
    engine_logp = (old_logp + torch.randn(B, T, generator=gen, dtype=torch.float64)).masked_fill(~mask, float("-inf"))
    cap, low = rng.uniform(1.5, 5.0), rng.uniform(0.2, 0.8)
    tis = importance_weights(old_logp, engine_logp, mask, "tis", cap=cap, low=low)  # low is ignored by tis
    icepop = importance_weights(old_logp, engine_logp, mask, "icepop", cap=cap, low=low)
    tis_ref, icepop_ref = [], []
    for b in range(B):
        tis_ref.append([]), icepop_ref.append([])
        for t in range(T):
            w = math.exp(old_logp[b, t].item() - engine_logp[b, t].item()) if mask[b, t] else 0.0
            tis_ref[-1].append(min(w, cap) if mask[b, t] else 0.0)
            icepop_ref[-1].append(w if mask[b, t] and low <= w <= cap else 0.0)
    assert_close(tis, tis_ref)
    assert_close(icepop, icepop_ref)


def test_importance_weights_rejects_bad_arguments():
    x, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="low"):
        importance_weights(x, x, mask, "icepop", cap=2.0)
    with pytest.raises(ValueError, match="mode"):
        importance_weights(x, x, mask, "is", cap=2.0)
    with pytest.raises(ValueError, match="cap"):
        importance_weights(x, x, mask, "tis", cap=0.0)


# --- value_loss --------------------------------------------------------------------------------------------------


def value_inputs(seed):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    mask = random_mask(rng, B, T)
    old_values = torch.randn(B, T, generator=gen, dtype=torch.float64)
    values = (old_values + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)).requires_grad_()
    returns = torch.randn(B, T, generator=gen, dtype=torch.float64)
    return values, old_values, returns, mask


@pytest.mark.parametrize("seed", SEEDS)
def test_value_loss_matches_loop(seed):
    values, old_values, returns, mask = value_inputs(seed)
    loss, stats = value_loss(values, old_values, returns, mask, clip_eps=0.2)
    total, n, clipped, value_sum = 0.0, 0, 0, 0.0
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            v, old_v, ret = values[b, t].item(), old_values[b, t].item(), returns[b, t].item()
            v_clipped = old_v + min(max(v - old_v, -0.2), 0.2)
            total += 0.5 * max((v - ret) ** 2, (v_clipped - ret) ** 2)
            clipped += (v_clipped - ret) ** 2 > (v - ret) ** 2
            value_sum += v
            n += 1
    assert_close(loss, total / n)
    assert math.isclose(stats["clipfrac"], clipped / n, abs_tol=1e-9)
    assert math.isclose(stats["values_mean"], value_sum / n, rel_tol=1e-6, abs_tol=1e-6)


@pytest.mark.parametrize("seed", range(10))
def test_value_loss_micro_batches_with_global_denominator_equal_full_batch(seed):
    values, old_values, returns, mask = value_inputs(seed)
    full, _ = value_loss(values, old_values, returns, mask, clip_eps=0.2)
    (full_grad,) = torch.autograd.grad(full, values)
    denominator = mask.sum().item()
    micro = [
        value_loss(values[rows], old_values[rows], returns[rows], mask[rows], 0.2, loss_denominator=denominator)[0]
        for rows in (slice(0, 3), slice(3, B))
    ]
    (micro_grad,) = torch.autograd.grad(sum(micro), values)
    assert_close(sum(micro), full)
    assert_close(micro_grad, full_grad)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_value_loss_aggregations_match_loop(seed, agg):
    values, old_values, returns, mask = value_inputs(seed)
    loss, _ = value_loss(values, old_values, returns, mask, clip_eps=0.2, agg=agg, num_seqs_denominator=10.0,
                         norm_len=12.0)
    total = 0.0
    for b in range(B):
        row = []
        for t in range(T):
            if mask[b, t]:
                v, old_v, ret = values[b, t].item(), old_values[b, t].item(), returns[b, t].item()
                v_clipped = old_v + min(max(v - old_v, -0.2), 0.2)
                row.append(0.5 * max((v - ret) ** 2, (v_clipped - ret) ** 2))
        if row:
            total += sum(row) / (len(row) if agg == "seq-mean-token-mean" else 12.0)
    assert_close(loss, total / 10.0)


# --- entropy_from_logits -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(10))
def test_entropy_from_logits_matches_loop(seed):
    logits = 3 * torch.randn(4, 5, 11, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    expected = []
    for row in logits.tolist():
        expected.append([])
        for z in row:
            weights = [math.exp(v) for v in z]
            p = [w / sum(weights) for w in weights]
            expected[-1].append(-sum(pi * math.log(pi) for pi in p))
    assert_close(entropy_from_logits(logits), expected)


def test_entropy_of_uniform_is_log_vocab():
    assert_close(entropy_from_logits(torch.zeros(3, 32, dtype=torch.float64)), [math.log(32)] * 3)
