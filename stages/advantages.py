"""Advantages stage: per-token KL, shaped rewards, advantages and returns from the scored table. Pure math, no actors.

Scores are clipped / normalised first (algo.reward_clip, algo.normalize_rewards), then shaped: r_t = −β·KL_t plus the
score on the last token (β = 0 when the KL is a loss term instead). Then, by algo.estimator:
`gae` — GAE(γ, λ) with the critic's values; `reinforce` — discounted return-to-go (REINFORCE++); the group estimators
(`reinforce_baseline`, `rloo`, `group_norm` = GRPO, `dr_grpo`) — each sample's total shaped reward against its
prompt's group, broadcast to every token. Returns are the critic's targets (zeros without a critic).

State that spans iterations (the adaptive KL coefficient, the running reward statistics) is stored in this stage's
commit marker and read back from the previous iteration's, so a resumed run continues with the same values.

Tests: tests/stages/test_advantages.py
"""

import time

from prefect import task
from prefect.cache_policies import NO_CACHE

from stages.common import commit, fault_point, skip_if_committed, stage_errors, store_of


def _padded(rows: list, width: int):
    import torch

    out = torch.zeros((len(rows), width), dtype=torch.float64)
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = torch.tensor(row, dtype=torch.float64)
    return out


def compute_advantages(scored, algo, state: dict | None = None) -> dict:
    """Columns kl, token_rewards, advantages, returns (lists per sample), summary metrics, and the carried state."""
    import torch

    from algorithms import advantages as adv
    from algorithms.kl import AdaptiveKLController, FixedKLController, kl_estimate

    state = state or {}
    lengths = [len(r) for r in scored["response_ids"].to_pylist()]
    width = max(lengths + [1])
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    old = _padded(scored["old_logprobs"].to_pylist(), width)
    ref = _padded(scored["ref_logprobs"].to_pylist(), width)
    group_ids = torch.tensor(scored["group_id"].to_pylist())
    scores = torch.tensor(scored["reward"].to_pylist(), dtype=torch.float64)

    scores = adv.clip_rewards(scores, algo.reward_clip)
    rms = adv.RunningMeanStd()
    if algo.normalize_rewards:
        if "reward_rms" in state:
            rms.load_state_dict(state["reward_rms"])
        rms.update(scores)
        scores = rms.normalize(scores)
    if algo.kl_controller == "adaptive":
        controller = AdaptiveKLController(algo.kl_coef, algo.kl_target, algo.kl_horizon)
    else:
        controller = FixedKLController(algo.kl_coef)
    if "kl_controller" in state:
        controller.load_state_dict(state["kl_controller"])
    kl_coef = controller.value

    kl = torch.where(mask, kl_estimate(old, ref, algo.kl_estimator), 0)
    token_rewards = adv.kl_shaped_rewards(scores, kl, mask, kl_coef if algo.kl_in_reward else 0.0)
    seq_reward = torch.where(mask, token_rewards, 0).sum(-1)
    returns = None
    if algo.estimator == "gae":
        values = _padded([v or [] for v in scored["values"].to_pylist()], width)
        advantages, returns = adv.gae(token_rewards, values, mask, algo.gamma, algo.lam)
    elif algo.estimator == "reinforce":
        advantages = adv.discounted_returns(token_rewards, mask, algo.gamma)
    else:
        per_seq = {
            "reinforce_baseline": lambda: adv.group_mean_baseline(seq_reward, group_ids),
            "rloo": lambda: adv.rloo(seq_reward, group_ids),
            "group_norm": lambda: adv.group_norm(seq_reward, group_ids),
            "dr_grpo": lambda: adv.group_norm(seq_reward, group_ids, scale_by_std=False),
        }[algo.estimator]()
        advantages = torch.where(mask, per_seq[:, None].expand_as(mask), 0)
    if algo.whiten_advantages and algo.estimator in ("gae", "reinforce", "reinforce_baseline"):
        advantages = adv.whiten(advantages, mask)
    if returns is None:
        returns = torch.zeros_like(advantages)

    kl_per_sample = float(torch.where(mask, kl, 0).sum(-1).mean())
    controller.update(kl_per_sample, len(lengths))

    def trim(x) -> list[list[float]]:
        return [row[:n].tolist() for row, n in zip(x, lengths)]

    metrics = {
        "rollout/kl": kl_per_sample,
        "rollout/kl_coef": kl_coef,
        "rollout/advantage_mean": float(adv.masked_mean(advantages, mask)),
        "rollout/advantage_std": float(adv.masked_mean((advantages - adv.masked_mean(advantages, mask)) ** 2,
                                                       mask).sqrt()),
        "rollout/return_mean": float(adv.masked_mean(returns, mask)),
    }
    columns = {"kl": trim(kl), "token_rewards": trim(token_rewards), "advantages": trim(advantages),
               "returns": trim(returns)}
    new_state = {"kl_coef": kl_coef, "kl_controller": controller.state_dict()}
    if algo.normalize_rewards:
        new_state["reward_rms"] = rms.state_dict()
    return {"columns": columns, "metrics": metrics, "state": new_state}


def advantages(config, run_uri: str, iteration: int) -> dict:
    import pyarrow as pa

    from storage.schema import EXPERIENCE

    store = store_of(config, run_uri)
    if (done := skip_if_committed(store, iteration, "advantages")) is not None:
        return done
    started = time.perf_counter()
    fault_point("advantages.start", iteration)
    scored = store.read_stage(iteration, "score")
    previous = store.stage_marker(iteration - 1, "advantages") if iteration > 1 else None
    result = compute_advantages(scored, config.algo, (previous or {}).get("state"))
    table = scored
    for name, values in result["columns"].items():
        table = table.append_column(name, pa.array(values, EXPERIENCE.field(name).type))
    fault_point("advantages.before_commit", iteration)
    marker = commit(store, config, iteration, "advantages", table, "experience", started, result["metrics"],
                    state=result["state"])
    fault_point("advantages.after_commit", iteration)
    return marker


@task(name="advantages", task_run_name="advantages-{iteration}", cache_policy=NO_CACHE)
@stage_errors
def advantages_task(config, run_uri: str, iteration: int) -> dict:
    return advantages(config, run_uri, iteration)
