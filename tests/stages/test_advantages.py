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
