"""Advantages stage: per-token KL, shaped rewards, advantages and returns from the scored table. Pure math, no actors.

Scores are clipped / normalised first (algo.reward_clip, algo.normalize_rewards), then shaped: r_t = −β·KL_t plus the
score on the last token (β = 0 when the KL is a loss term instead), plus a multi-turn environment's reward increments
where it put them. Then the estimator registered as algo.estimator (algorithms/estimators.py; docs/algorithms.md lists
them) turns them into advantages, and returns for the critic's targets (zeros without a critic); the estimators
registered with whiten=True are whitened over the batch when algo.whiten_advantages is on. A multi-turn episode's
environment tokens are holes: the estimators' mask is the policy's tokens (storage/schema.py `policy_mask`), so the
holes carry no KL, reward, advantage or return, and GAE and the returns-to-go pass through them.

State that spans iterations (the adaptive KL coefficient, the running reward statistics) is stored in this stage's
commit marker and read back from the previous iteration's, so a resumed run continues with the same values.

Tests: tests/stages/test_advantages.py
"""

from algorithms.registry import ESTIMATORS
from stages.common import Output, StageRun, stage


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
    from algorithms.estimators import EstimatorInputs
    from algorithms.kl import AdaptiveKLController, FixedKLController, kl_estimate
    from storage.schema import policy_mask

    state = state or {}
    lengths = [len(r) for r in scored["response_ids"].to_pylist()]
    width = max(lengths + [1])
    # Real tokens: the policy's; a multi-turn episode's environment tokens are holes every estimator skips.
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]) & _padded(policy_mask(scored), width).bool()
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
    env_rewards = scored["env_rewards"].to_pylist() if "env_rewards" in scored.column_names else []
    if any(r is not None for r in env_rewards):  # an environment's per-turn increments, on top of the outcome
        token_rewards = token_rewards + torch.where(mask, _padded([r or [] for r in env_rewards], width), 0)
    estimator = ESTIMATORS[algo.estimator]
    inputs = EstimatorInputs(
        token_rewards=token_rewards, seq_rewards=torch.where(mask, token_rewards, 0).sum(-1),
        values=_padded([v or [] for v in scored["values"].to_pylist()], width) if estimator.needs_critic else None,
        mask=mask, group_ids=group_ids, gamma=algo.gamma, lam=algo.lam)
    advantages, returns = estimator.fn(inputs)
    if algo.whiten_advantages and estimator.whiten:
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


@stage("advantages", schema="experience")
def advantages(s: StageRun) -> Output:
    import pyarrow as pa

    from storage.schema import EXPERIENCE

    scored = s.store.read_stage(s.iteration, "score")
    previous = s.store.stage_marker(s.iteration - 1, "advantages") if s.iteration > 1 else None
    result = compute_advantages(scored, s.config.algo, (previous or {}).get("state"))
    table = scored
    for name, values in result["columns"].items():
        table = table.append_column(name, pa.array(values, EXPERIENCE.field(name).type))
    return Output(table, result["metrics"], {"state": result["state"]})


advantages_task = advantages.task
