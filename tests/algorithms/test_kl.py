"""algorithms.kl against plain Python formulas, and the estimators' expectations against the exact KL."""

import json
import math

import pytest
import torch

from algorithms.kl import AdaptiveKLController, FixedKLController, kl_estimate

SEEDS = range(50)


def kl_loop(logp, ref_logp, kind):
    out = []
    for lp, rlp in zip(logp, ref_logp):
        log_r = rlp - lp
        out.append({"k1": -log_r, "k2": 0.5 * log_r**2, "k3": math.exp(log_r) - 1 - log_r}[kind])
    return out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimate_matches_loop(seed, kind):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(5, 7, generator=gen, dtype=torch.float64) * 5
    ref_logp = logp + torch.randn(5, 7, generator=gen, dtype=torch.float64)
    expected = [kl_loop(a, b, kind) for a, b in zip(logp.tolist(), ref_logp.tolist())]
    torch.testing.assert_close(kl_estimate(logp, ref_logp, kind), torch.tensor(expected, dtype=torch.float64),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("seed", range(10))
def test_k1_and_k3_are_unbiased(seed):
    # E_{x~π}[k(x)] summed exactly over a categorical vocabulary equals KL(π‖π_ref) for k1 and k3.
    gen = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(50, generator=gen, dtype=torch.float64), -1)
    ref_logp = torch.log_softmax(torch.randn(50, generator=gen, dtype=torch.float64), -1)
    p = logp.exp().tolist()
    kl = sum(pi * (a - b) for pi, a, b in zip(p, logp.tolist(), ref_logp.tolist()))
    for kind in ("k1", "k3"):
        expectation = (logp.exp() * kl_estimate(logp, ref_logp, kind)).sum().item()
        assert math.isclose(expectation, kl, rel_tol=1e-9, abs_tol=1e-12), kind


def test_k2_k3_nonnegative_and_zero_at_equality():
    gen = torch.Generator().manual_seed(0)
    logp, ref_logp = torch.randn(2, 100, generator=gen, dtype=torch.float64)
    for kind in ("k2", "k3"):
        assert (kl_estimate(logp, ref_logp, kind) >= 0).all()
        assert torch.equal(kl_estimate(logp, logp, kind), torch.zeros_like(logp))


def test_kl_estimate_float32():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    out = kl_estimate(logp, logp + 0.1, "k3")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full((3,), math.exp(0.1) - 1.1), atol=1e-6, rtol=1e-5)


def test_kl_estimate_unknown_kind():
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k4")


# --- KL controllers ----------------------------------------------------------------------------------------------


def test_fixed_kl_controller_never_moves_and_round_trips():
    ctl = FixedKLController(0.05)
    for kl, n in [(100.0, 64), (0.0, 1), (-3.0, 1000)]:
        ctl.update(kl, n)
        assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert other.value == 0.05


def test_adaptive_kl_controller_by_hand():
    # target 6, horizon 1000, 100 samples per update, so β ← β·(1 + e/10) with e = clip(KL/6 − 1, −0.2, 0.2).
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    steps = [
        (12.0, 0.1 * 1.02),  # e = +1 clipped to +0.2
        (5.4, 0.102 * 0.99),  # e = −0.1
        (6.0, 0.10098),  # on target: e = 0
        (0.0, 0.10098 * 0.98),  # e = −1 clipped to −0.2
        (6.6, 0.0989604 * 1.01),  # e = +0.1
    ]
    for kl, expected in steps:
        ctl.update(kl, 100)
        assert math.isclose(ctl.value, expected, rel_tol=1e-12), (kl, ctl.value, expected)
    ctl.update(12.0, 500)  # n_steps scales the step: 1 + 0.2·500/1000
    assert math.isclose(ctl.value, 0.0989604 * 1.01 * 1.1, rel_tol=1e-12)


def test_adaptive_kl_controller_state_round_trip_resumes_identically():
    ctl = AdaptiveKLController(0.2, target=3.0, horizon=500)
    ctl.update(4.0, 64)
    state = json.loads(json.dumps(ctl.state_dict()))  # plain floats, as stored in a commit marker
    assert state == {"value": ctl.value}
    resumed = AdaptiveKLController(0.2, target=3.0, horizon=500)
    resumed.load_state_dict(state)
    for kl in (1.0, 9.0, 3.3):
        ctl.update(kl, 64)
        resumed.update(kl, 64)
        assert resumed.value == ctl.value


def test_kl_controllers_reject_bad_settings():
    with pytest.raises(ValueError, match="coef"):
        FixedKLController(-0.1)
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError, match="horizon"):
        AdaptiveKLController(0.1, target=1.0, horizon=0)
