"""algorithms.losses against plain Python loops written independently of the vectorised code."""

import math
import random

import pytest
import torch

from algorithms.losses import entropy_from_logits, policy_loss, value_loss

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
    total, n, clipped, kl, ratios = 0.0, 0, 0, 0.0, 0.0
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
            kl += (ratio - 1) - math.log(ratio)
            ratios += ratio
    denominator = denominator if denominator is not None else max(n, 1)
    for b, t, g in terms:
        grad[b][t] = g / denominator
    stats = {"clipfrac": clipped / max(n, 1), "approx_kl": kl / max(n, 1), "ratio_mean": ratios / max(n, 1)}
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
    assert stats == {"clipfrac": 0.0, "approx_kl": 0.0, "ratio_mean": 0.0}


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
