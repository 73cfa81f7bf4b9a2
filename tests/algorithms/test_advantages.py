"""algorithms.advantages against plain Python loops written independently of the vectorised code."""

import math
import random

import pytest
import torch

from algorithms.advantages import (
    RunningMeanStd,
    clip_rewards,
    discounted_returns,
    gae,
    group_mean_baseline,
    group_norm,
    kl_shaped_rewards,
    masked_mean,
    rloo,
    whiten,
)

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


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


# --- gae ---------------------------------------------------------------------------------------------------------


def gae_loop(rewards, values, mask, gamma, lam):
    """GAE from its definition A_k = Σ_{j≥k} (γλ)^{j−k} δ_j over each row's real tokens only (holes dropped)."""
    adv = [[0.0] * len(row) for row in rewards]
    ret = [[0.0] * len(row) for row in rewards]
    for b in range(len(rewards)):
        real = [t for t, m in enumerate(mask[b]) if m]
        deltas = []
        for k, t in enumerate(real):
            next_value = values[b][real[k + 1]] if k + 1 < len(real) else 0.0
            deltas.append(rewards[b][t] + gamma * next_value - values[b][t])
        for k, t in enumerate(real):
            adv[b][t] = sum((gamma * lam) ** (j - k) * deltas[j] for j in range(k, len(real)))
            ret[b][t] = adv[b][t] + values[b][t]
    return adv, ret


@pytest.mark.parametrize("seed", SEEDS)
def test_gae_matches_loop(seed):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    mask = random_mask(rng, B, T)
    rewards, values = randn(gen, B, T), randn(gen, B, T)
    gamma, lam = rng.uniform(0.8, 1.0), rng.uniform(0.5, 1.0)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    adv_ref, ret_ref = gae_loop(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    assert_close(advantages, adv_ref)
    assert_close(returns, ret_ref)


def test_gae_hole_is_skipped():
    # γ=0.5, λ=1. Real tokens at t=0 and t=3; the hole's rewards and values must not matter.
    # t=3: δ = 1 − 0.4 = 0.6, A = 0.6.  t=0: δ = 0 + 0.5·V_3 − V_0 = 0.2 − 0.2 = 0, A = 0 + 0.5·0.6 = 0.3.
    mask = torch.tensor([[1, 0, 0, 1]])
    rewards = torch.tensor([[0.0, 99.0, -99.0, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.2, 5.0, -5.0, 0.4]], dtype=torch.float64)
    advantages, returns = gae(rewards, values, mask, gamma=0.5, lam=1.0)
    assert_close(advantages, [[0.3, 0.0, 0.0, 0.6]])
    assert_close(returns, [[0.5, 0.0, 0.0, 1.0]])


def test_gae_gamma_lam_one_zero_values_is_reward_to_go():
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    mask = random_mask(rng, B, T)
    rewards = randn(gen, B, T)
    advantages, returns = gae(rewards, torch.zeros(B, T, dtype=torch.float64), mask, gamma=1.0, lam=1.0)
    r, m = rewards.tolist(), mask.tolist()
    to_go = [[sum(r[b][j] for j in range(t, T) if m[b][j]) if m[b][t] else 0.0 for t in range(T)] for b in range(B)]
    assert_close(advantages, to_go)
    assert_close(returns, to_go)


def test_gae_ignores_junk_at_masked_positions():
    rng, gen = random.Random(1), torch.Generator().manual_seed(1)
    mask = random_mask(rng, B, T)
    rewards, values = randn(gen, B, T), randn(gen, B, T)
    clean = gae(rewards, values, mask, 0.99, 0.95)
    junk = gae(rewards.masked_fill(~mask, float("nan")), values.masked_fill(~mask, float("inf")), mask, 0.99, 0.95)
    for a, b in zip(clean, junk):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_gae_float32():
    rng, gen = random.Random(2), torch.Generator().manual_seed(2)
    mask = random_mask(rng, B, T)
    rewards, values = randn(gen, B, T), randn(gen, B, T)
    adv64, ret64 = gae(rewards, values, mask, 0.99, 0.95)
    adv32, ret32 = gae(rewards.float(), values.float(), mask.float(), 0.99, 0.95)
    assert adv32.dtype == ret32.dtype == torch.float32
    torch.testing.assert_close(adv32, adv64.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret32, ret64.float(), atol=1e-5, rtol=1e-5)


# --- group_norm --------------------------------------------------------------------------------------------------


def group_norm_loop(scores, group_ids, eps, scale_by_std):
    out = []
    for r, g in zip(scores, group_ids):
        group = [s for s, h in zip(scores, group_ids) if h == g]
        n = len(group)
        mean = sum(group) / n
        if not scale_by_std:
            out.append(r - mean)
            continue
        std = math.sqrt(sum((s - mean) ** 2 for s in group) / (n - 1)) if n > 1 else 0.0
        out.append((r - mean) / (std + eps))
    return out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_norm_matches_loop(seed, scale_by_std):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    n = 16
    # Non-contiguous, non-consecutive ids, so singletons and interleaved groups both occur.
    group_ids = torch.tensor([rng.choice([-3, 7, 100, 5, 42]) for _ in range(n)])
    # Half the seeds use binary scores, as in verifiable rewards: ties within a group are then common.
    scores = randn(gen, n) if seed % 2 else torch.randint(0, 2, (n,), generator=gen).double()
    advantages = group_norm(scores, group_ids, eps=1e-6, scale_by_std=scale_by_std)
    assert_close(advantages, group_norm_loop(scores.tolist(), group_ids.tolist(), 1e-6, scale_by_std))


def test_group_norm_matches_torch_std_for_one_group():
    # One group: the formula OpenRLHF writes, (r − r.mean()) / (r.std() + eps), with torch's unbiased std.
    scores = randn(torch.Generator().manual_seed(0), 8)
    expected = (scores - scores.mean()) / (scores.std() + 1e-6)
    assert_close(group_norm(scores, torch.zeros(8, dtype=torch.long)), expected)


def test_group_norm_singleton_group_is_zero_not_nan():
    scores = torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)
    advantages = group_norm(scores, torch.tensor([0, 1, 1]))
    assert torch.isfinite(advantages).all()
    assert advantages[0] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_norm_ties_are_exactly_zero(dtype):
    # 0.7 is not representable: a plain float mean of eight copies is off by ~1 ulp, which a ~0 std would inflate.
    scores = torch.full((8,), 0.7, dtype=dtype)
    scores[4:] = 0.1
    advantages = group_norm(scores, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), eps=1e-9)
    assert torch.equal(advantages, torch.zeros_like(scores))


# --- kl_shaped_rewards -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_kl_shaped_rewards_matches_loop(seed):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    mask = random_mask(rng, B, T)
    scores, kl = randn(gen, B), randn(gen, B, T)
    kl_coef = rng.uniform(0.0, 0.5)
    expected = []
    for b in range(B):
        real = [t for t in range(T) if mask[b, t]]
        row = [-kl_coef * kl[b, t].item() if t in real else 0.0 for t in range(T)]
        if real:
            row[real[-1]] += scores[b].item()
        expected.append(row)
    assert_close(kl_shaped_rewards(scores, kl, mask, kl_coef), expected)


def test_kl_shaped_rewards_all_masked_row_is_zero():
    kl = torch.ones(2, 3, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 0], [1, 1, 0]])
    rewards = kl_shaped_rewards(torch.tensor([5.0, 1.0], dtype=torch.float64), kl, mask, kl_coef=0.1)
    assert_close(rewards, [[0.0, 0.0, 0.0], [-0.1, 0.9, 0.0]])


# --- whiten, masked_mean -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_loop(seed, shift_mean):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    mask = random_mask(rng, B, T)
    x = 3.0 + 2.0 * randn(gen, B, T)
    real = [x[b, t].item() for b in range(B) for t in range(T) if mask[b, t]]
    mean = sum(real) / len(real)
    var = sum((v - mean) ** 2 for v in real) / len(real)
    expected = [
        [(x[b, t].item() - mean) / math.sqrt(var + 1e-8) + (0.0 if shift_mean else mean) if mask[b, t] else 0.0
         for t in range(T)]
        for b in range(B)
    ]
    assert_close(whiten(x, mask, shift_mean=shift_mean), expected)


def test_whiten_all_masked_is_zero():
    x = torch.randn(3, 4, dtype=torch.float64)
    assert torch.equal(whiten(x, torch.zeros(3, 4)), torch.zeros(3, 4, dtype=torch.float64))


@pytest.mark.parametrize("seed", SEEDS)
def test_masked_mean_matches_loop(seed):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    mask = random_mask(rng, B, T)
    x = randn(gen, B, T).masked_fill(~mask, float("nan"))  # junk at masked positions must not leak

    def mean(values):
        return sum(values) / len(values) if values else 0.0

    assert_close(masked_mean(x, mask), mean([x[b, t].item() for b in range(B) for t in range(T) if mask[b, t]]))
    rows = [mean([x[b, t].item() for t in range(T) if mask[b, t]]) for b in range(B)]
    cols = [mean([x[b, t].item() for b in range(B) if mask[b, t]]) for t in range(T)]
    assert_close(masked_mean(x, mask, dim=1), rows)
    assert_close(masked_mean(x, mask, dim=0), cols)


def test_masked_mean_all_masked_is_zero():
    assert masked_mean(torch.ones(2, 3), torch.zeros(2, 3)).item() == 0.0


# --- discounted_returns (REINFORCE++) ----------------------------------------------------------------------------


def returns_loop(rewards, mask, gamma):
    """G at the k-th real token = Σ_{j≥k} γ^{j−k}·r at the j-th real token; holes dropped, masked positions 0."""
    out = [[0.0] * len(row) for row in rewards]
    for b in range(len(rewards)):
        real = [t for t, m in enumerate(mask[b]) if m]
        for k, t in enumerate(real):
            out[b][t] = sum(gamma ** (j - k) * rewards[b][real[j]] for j in range(k, len(real)))
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_discounted_returns_matches_loop(seed):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    mask = random_mask(rng, B, T)
    rewards = randn(gen, B, T)
    gamma = rng.choice([1.0, 0.0, rng.uniform(0.5, 1.0)])
    assert_close(discounted_returns(rewards, mask, gamma), returns_loop(rewards.tolist(), mask.tolist(), gamma))


def test_discounted_returns_is_gae_without_critic_and_ignores_junk():
    rng, gen = random.Random(3), torch.Generator().manual_seed(3)
    mask = random_mask(rng, B, T)
    rewards = randn(gen, B, T)
    returns = discounted_returns(rewards, mask, 0.9)
    assert_close(returns, gae(rewards, torch.zeros_like(rewards), mask, 0.9, 1.0)[0])
    junk = discounted_returns(rewards.masked_fill(~mask, float("nan")), mask, 0.9)
    torch.testing.assert_close(junk, returns, atol=0, rtol=0)


# --- group_mean_baseline, rloo, Dr. GRPO ------------------------------------------------------------------------


def baselines_loop(scores, group_ids):
    mean_baseline, loo = [], []
    for i, (r, g) in enumerate(zip(scores, group_ids)):
        members = [s for s, h in zip(scores, group_ids) if h == g]
        others = [s for j, (s, h) in enumerate(zip(scores, group_ids)) if h == g and j != i]
        mean_baseline.append(r - sum(members) / len(members))
        loo.append(r - sum(others) / len(others) if others else 0.0)
    return mean_baseline, loo


@pytest.mark.parametrize("seed", SEEDS)
def test_group_baselines_match_loop(seed):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    n = rng.choice([1, 2, 16])  # n=1: a single sample, necessarily a group of one
    group_ids = torch.tensor([rng.choice([-3, 7, 100, 5, 42]) for _ in range(n)])
    scores = randn(gen, n) if seed % 2 else torch.randint(0, 2, (n,), generator=gen).double()  # binary: ties
    mean_ref, loo_ref = baselines_loop(scores.tolist(), group_ids.tolist())
    assert_close(group_mean_baseline(scores, group_ids), mean_ref)
    assert_close(rloo(scores, group_ids), loo_ref)
    # Dr. GRPO (Liu et al. 2025) is group_norm without the std: the same number as the mean baseline.
    assert_close(group_norm(scores, group_ids, scale_by_std=False), mean_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_baselines_ties_and_singletons_are_exactly_zero(dtype):
    scores = torch.tensor([0.7, 0.7, 0.7, 0.1, 0.1, 0.1, 0.1, 3.0], dtype=dtype)
    group_ids = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2])  # ties in groups 0 and 1; group 2 is a singleton
    for estimator in (group_mean_baseline, rloo):
        assert torch.equal(estimator(scores, group_ids), torch.zeros_like(scores)), estimator.__name__
    assert torch.equal(rloo(scores[:1], group_ids[:1]), torch.zeros(1, dtype=dtype))


def test_group_baselines_reject_misshapen_input():
    for estimator in (group_mean_baseline, rloo):
        with pytest.raises(ValueError, match="group_ids"):
            estimator(torch.zeros(4), torch.zeros(3, dtype=torch.long))


# --- clip_rewards, RunningMeanStd --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_clip_rewards_matches_loop(seed):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    scores = 3 * randn(gen, 11)
    clip = rng.uniform(0.1, 4.0)
    assert_close(clip_rewards(scores, clip), [min(max(s, -clip), clip) for s in scores.tolist()])
    assert clip_rewards(scores, None) is scores
    with pytest.raises(ValueError, match="clip"):
        clip_rewards(scores, 0.0)


@pytest.mark.parametrize("seed", SEEDS)
def test_running_mean_std_batched_equals_concatenation(seed):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    chunks = [rng.uniform(-5, 5) + rng.uniform(0.1, 10) * randn(gen, rng.choice([0, 1, 2, 7, 30]))
              for _ in range(rng.randint(1, 6))]
    values = [v for c in chunks for v in c.tolist()]
    rms = RunningMeanStd()
    for chunk in chunks:
        rms.update(chunk)
    assert rms.count == len(values)
    if values:
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / len(values)
        assert math.isclose(rms.mean, mean, rel_tol=1e-9, abs_tol=1e-9)
        assert math.isclose(rms.var, var, rel_tol=1e-9, abs_tol=1e-9)
    # Carried across iterations as plain floats (a commit marker is JSON): resuming continues the same statistics.
    state = rms.state_dict()
    assert all(type(v) is float for v in state.values())
    resumed = RunningMeanStd()
    resumed.load_state_dict(state)
    extra = randn(gen, 5)
    rms.update(extra)
    resumed.update(extra)
    assert resumed.state_dict() == rms.state_dict()
    x = randn(gen, 4)
    assert_close(resumed.normalize(x), [v / math.sqrt(rms.var + 1e-8) for v in x.tolist()])


def test_running_mean_std_before_any_update_is_identity():
    x = torch.tensor([1.0, -2.0], dtype=torch.float64)
    rms = RunningMeanStd()
    rms.update(torch.zeros(0))
    assert rms.count == 0
    assert_close(rms.normalize(x), x)
