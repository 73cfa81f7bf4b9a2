"""The advantages stage on a scored table, against plain loops written here (GAE with KL-in-reward, GRPO)."""

import math
import random

import pyarrow as pa
import pytest

from algorithms.config import AlgoConfig
from stages.advantages import compute_advantages


def _scored(seed: int, n_groups: int = 3, n: int = 4):
    rng = random.Random(seed)
    rows = []
    for g in range(n_groups):
        for k in range(n):
            a = rng.randint(1, 6)
            rows.append({"group_id": g, "response_ids": list(range(a)), "reward": float(rng.choice([0, 0.5, 1])),
                         "old_logprobs": [rng.uniform(-3, 0) for _ in range(a)],
                         "ref_logprobs": [rng.uniform(-3, 0) for _ in range(a)],
                         "values": [rng.uniform(-1, 1) for _ in range(a)]})
    return pa.Table.from_pylist(rows), rows


@pytest.mark.parametrize("seed", range(10))
def test_gae_with_kl_in_reward_matches_a_plain_loop(seed):
    table, rows = _scored(seed)
    algo = AlgoConfig(estimator="gae", gamma=0.99, lam=0.9, kl_coef=0.1, kl_estimator="k1", whiten_advantages=False)
    out = compute_advantages(table, algo)["columns"]
    for i, r in enumerate(rows):
        kl = [o - ref for o, ref in zip(r["old_logprobs"], r["ref_logprobs"])]  # k1 = log π - log π_ref
        rew = [-0.1 * k for k in kl]
        rew[-1] += r["reward"]
        adv, last = [0.0] * len(rew), 0.0
        for t in reversed(range(len(rew))):
            next_v = r["values"][t + 1] if t + 1 < len(rew) else 0.0
            delta = rew[t] + 0.99 * next_v - r["values"][t]
            last = delta + 0.99 * 0.9 * last
            adv[t] = last
        assert out["kl"][i] == pytest.approx(kl, abs=1e-6)
        assert out["token_rewards"][i] == pytest.approx(rew, abs=1e-6)
        assert out["advantages"][i] == pytest.approx(adv, abs=1e-6)
        assert out["returns"][i] == pytest.approx([a + v for a, v in zip(adv, r["values"])], abs=1e-6)


@pytest.mark.parametrize("seed", range(10))
def test_group_norm_matches_a_plain_loop(seed):
    table, rows = _scored(seed)
    algo = AlgoConfig(estimator="group_norm", kl_in_reward=False)
    out = compute_advantages(table, algo)["columns"]
    for i, r in enumerate(rows):
        group = [x["reward"] for x in rows if x["group_id"] == r["group_id"]]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (len(group) - 1))
        expected = (r["reward"] - mean) / (std + 1e-6)
        assert out["advantages"][i] == pytest.approx([expected] * len(r["response_ids"]), abs=1e-6)
        assert out["returns"][i] == [0.0] * len(r["response_ids"])


@pytest.mark.parametrize("seed", range(5))
def test_rloo_and_dr_grpo_match_plain_loops(seed):
    table, rows = _scored(seed)
    rloo = compute_advantages(table, AlgoConfig(estimator="rloo", kl_in_reward=False))["columns"]["advantages"]
    dr = compute_advantages(table, AlgoConfig(estimator="dr_grpo", kl_in_reward=False))["columns"]["advantages"]
    for i, r in enumerate(rows):
        others = [x["reward"] for j, x in enumerate(rows) if x["group_id"] == r["group_id"] and j != i]
        group = others + [r["reward"]]
        assert rloo[i] == pytest.approx([r["reward"] - sum(others) / len(others)] * len(r["response_ids"]), abs=1e-6)
        assert dr[i] == pytest.approx([r["reward"] - sum(group) / len(group)] * len(r["response_ids"]), abs=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_reinforce_is_whitened_return_to_go(seed):
    table, rows = _scored(seed)
    algo = AlgoConfig(estimator="reinforce", gamma=0.9, kl_coef=0.05)
    out = compute_advantages(table, algo)["columns"]
    raw = []
    for i, r in enumerate(rows):
        rew = out["token_rewards"][i]
        raw.append([sum(0.9 ** (k - t) * rew[k] for k in range(t, len(rew))) for t in range(len(rew))])
    flat = [x for row in raw for x in row]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / len(flat))
    for i, row in enumerate(raw):
        assert out["advantages"][i] == pytest.approx([(x - mean) / math.sqrt(std**2 + 1e-8) for x in row], abs=1e-6)


def _with_holes(rows: list[dict], seed: int) -> pa.Table:
    """`rows` as multi-turn samples: environment tokens (holes) inserted before, between and after their tokens, with
    NaN logprobs and values (anything may sit there); the table has a response_mask column."""
    rng = random.Random(seed)
    out = []
    for r in rows:
        holed = {k: v for k, v in r.items() if not isinstance(v, list)}
        cols = {k: [] for k in ("response_ids", "old_logprobs", "ref_logprobs", "values")}
        mask = []
        for t in range(len(r["response_ids"]) + 1):
            for _ in range(rng.choice([0, 0, 1, 3])):
                for k in cols:
                    cols[k].append(7 if k == "response_ids" else float("nan"))
                mask.append(0)
            if t < len(r["response_ids"]):
                for k in cols:
                    cols[k].append(r[k][t])
                mask.append(1)
        out.append({**holed, **cols, "response_mask": mask})
    return pa.Table.from_pylist(out)


@pytest.mark.parametrize("estimator", ["gae", "reinforce", "reinforce_baseline", "rloo", "group_norm", "dr_grpo"])
def test_every_estimator_skips_the_holes_of_multiturn_samples(estimator):
    """Environment tokens are holes: each estimator gives the policy tokens of a holed sample exactly what it gives
    the sample without them (a table without the mask column: all policy tokens), and 0 at the holes, in every
    column; the batch statistics (whitening, the adaptive KL) see the policy tokens only."""
    from algorithms.registry import ESTIMATORS

    assert estimator in ESTIMATORS
    table, rows = _scored(11, n_groups=4)
    holed = _with_holes(rows, seed=12)
    algo = AlgoConfig(estimator=estimator, gamma=0.95, lam=0.9, kl_coef=0.1, kl_estimator="k3")
    plain, with_holes = compute_advantages(table, algo), compute_advantages(holed, algo)
    assert with_holes["metrics"] == pytest.approx(plain["metrics"], rel=1e-9, abs=1e-12)
    for i, mask in enumerate(holed["response_mask"].to_pylist()):
        assert 0 in mask or len(mask) == len(rows[i]["response_ids"])
        for column, values in with_holes["columns"].items():
            assert [v for v, m in zip(values[i], mask) if m] == pytest.approx(plain["columns"][column][i], abs=1e-9)
            assert [v for v, m in zip(values[i], mask) if not m] == [0.0] * mask.count(0), column


def test_environment_reward_increments_join_the_token_rewards():
    """env_rewards (per token, null for none) are added where the environment put them, on top of the score on the
    last policy token; GRPO's group totals include them."""
    table, rows = _scored(4, n_groups=2, n=2)
    increments = [None, [0.0] * (len(rows[1]["response_ids"]) - 1) + [0.5], None, None]
    increments[2] = [0.25] + [0.0] * (len(rows[2]["response_ids"]) - 1)
    with_env = table.append_column("env_rewards", pa.array(increments, pa.list_(pa.float32())))
    algo = AlgoConfig(estimator="group_norm", kl_coef=0.0)
    base = compute_advantages(table, algo)["columns"]["token_rewards"]
    got = compute_advantages(with_env, algo)["columns"]["token_rewards"]
    for i, inc in enumerate(increments):
        assert got[i] == pytest.approx([b + (inc[t] if inc else 0.0) for t, b in enumerate(base[i])], abs=1e-9)
