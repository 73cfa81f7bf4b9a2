"""Advantages stage: per-token KL, shaped rewards, advantages and returns from the scored table. Pure math, no actors.

`gae`: r_t = −β·KL_t (+ the score on the last token), GAE(γ, λ) with the critic's values, optional whitening.
`group_norm` (GRPO): each sample's score (minus β·ΣKL when the KL is in the reward) normalised within its prompt's
group, broadcast to every token; returns are zeros (no critic).

Tests: tests/stages/test_advantages.py
"""

import time

from prefect import task
from prefect.cache_policies import NO_CACHE

from stages.common import commit, fault_point, skip_if_committed, store_of


def _padded(rows: list, width: int):
    import torch

    out = torch.zeros((len(rows), width), dtype=torch.float64)
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = torch.tensor(row, dtype=torch.float64)
    return out


def compute_advantages(scored, algo) -> dict:
    """Columns kl, token_rewards, advantages, returns (lists per sample) and summary metrics."""
    import torch

    from algorithms.advantages import gae, group_norm, kl_shaped_rewards, masked_mean, whiten
    from algorithms.kl import kl_estimate

    lengths = [len(r) for r in scored["response_ids"].to_pylist()]
    width = max(lengths + [1])
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    old = _padded(scored["old_logprobs"].to_pylist(), width)
    ref = _padded(scored["ref_logprobs"].to_pylist(), width)
    scores = torch.tensor(scored["reward"].to_pylist(), dtype=torch.float64)

    kl = torch.where(mask, kl_estimate(old, ref, algo.kl_estimator), 0)
    beta = algo.kl_coef if algo.kl_in_reward else 0.0
    token_rewards = kl_shaped_rewards(scores, kl, mask, beta)
    if algo.estimator == "gae":
        values = _padded([v or [] for v in scored["values"].to_pylist()], width)
        advantages, returns = gae(token_rewards, values, mask, algo.gamma, algo.lam)
        if algo.whiten_advantages:
            advantages = whiten(advantages, mask)
    else:
        group_ids = torch.tensor(scored["group_id"].to_pylist())
        seq_adv = group_norm(torch.where(mask, token_rewards, 0).sum(-1), group_ids)
        advantages = torch.where(mask, seq_adv[:, None].expand_as(mask), 0)
        returns = torch.zeros_like(advantages)

    def trim(x) -> list[list[float]]:
        return [row[:n].tolist() for row, n in zip(x, lengths)]

    metrics = {
        "rollout/kl": float(torch.where(mask, kl, 0).sum(-1).mean()),
        "rollout/advantage_mean": float(masked_mean(advantages, mask)),
        "rollout/advantage_std": float(masked_mean((advantages - masked_mean(advantages, mask)) ** 2, mask).sqrt()),
        "rollout/return_mean": float(masked_mean(returns, mask)),
    }
    columns = {"kl": trim(kl), "token_rewards": trim(token_rewards), "advantages": trim(advantages),
               "returns": trim(returns)}
    return {"columns": columns, "metrics": metrics}


def advantages(config, run_uri: str, iteration: int) -> dict:
    import pyarrow as pa

    from storage.schema import EXPERIENCE

    store = store_of(config, run_uri)
    if (done := skip_if_committed(store, iteration, "advantages")) is not None:
        return done
    started = time.perf_counter()
    fault_point("advantages.start", iteration)
    scored = store.read_stage(iteration, "score")
    result = compute_advantages(scored, config.algo)
    table = scored
    for name, values in result["columns"].items():
        table = table.append_column(name, pa.array(values, EXPERIENCE.field(name).type))
    fault_point("advantages.before_commit", iteration)
    return commit(store, config, iteration, "advantages", table, "experience", started, result["metrics"])


@task(name="advantages", cache_policy=NO_CACHE)
def advantages_task(config, run_uri: str, iteration: int) -> dict:
    return advantages(config, run_uri, iteration)
