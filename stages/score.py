"""Score stage: rewards (rule function, reward model, remote endpoint; weighted sum), reference logprobs, old policy
logprobs and critic values for every rollout sample.

The policy must hold version iteration-1, the one the update starts from (the proximal policy π_old): it is reloaded
from the committed checkpoint if it holds anything else. That is the version that generated the rollout, unless
algo.max_staleness ≥ 1 drew it from an older one (stages/pipeline.py). Reference, policy and critic work concurrently
on one shared Arrow table in Ray's object store.

The logprob gate: the engine's sampling logprobs must match the trainer's on the same (policy) tokens within
`algo.max_logprob_gap`, else the iteration fails with LogprobGateError and nothing is committed: the engine served
other weights than the version it reported (a broken sync), and training on that rollout would be silently off-policy.
It applies to rollouts of staleness 0; a stale rollout's gap to π_old is the off-policy distance (still reported as
`rollout/logprob_diff_mean`), and its version was gated at its sync instead (stages/pipeline.py probe_engines).

Tests: tests/stages/test_logprob_gate.py (the gate), tests/flows/test_rewards.py (reward sources); end to end:
tests/flows/test_ppo_flow.py
"""

import importlib
import json
import math

import numpy as np

from stages.common import Output, StageRun, stage


class RewardError(ValueError):
    pass


class LogprobGateError(RuntimeError):
    """The engine's logprobs stray from the trainer's beyond algo.max_logprob_gap (see `check_logprob_gap`)."""


AUTO_MAX_LOGPROB_GAP = {"bfloat16": 1.043, "float32": 1.01}
"""The bound per model.dtype when algo.max_logprob_gap is None; the measurements behind it are in its docstring."""


def max_logprob_gap(config) -> float:
    """algo.max_logprob_gap, else the automatic bound for model.dtype."""
    if config.algo.max_logprob_gap is not None:
        return config.algo.max_logprob_gap
    return AUTO_MAX_LOGPROB_GAP[config.model.dtype]


def check_logprob_gap(config, store, iteration: int, rollout, metrics: dict) -> None:
    """Raise LogprobGateError when rollout/logprob_diff_mean exceeds the bound (NaN fails too)."""
    gap, bound = metrics["rollout/logprob_diff_mean"], max_logprob_gap(config)
    if gap <= bound:
        return
    claimed = sorted(set(rollout["policy_version"].to_pylist()))
    source = ("" if config.algo.max_logprob_gap is not None
              else f" (automatic for model.dtype={config.model.dtype})")
    raise LogprobGateError(
        f"iteration {iteration}: logprob gate failed: rollout/logprob_diff_mean = {gap:.6f} exceeds "
        f"algo.max_logprob_gap = {bound}{source} (max |engine - trainer logprob| = "
        f"{metrics['rollout/logprob_abs_diff_max']:.4g}). The engine reported policy version "
        f"{claimed[0] if len(claimed) == 1 else claimed} while sampling and the trainer scored version "
        f"{iteration - 1}: the engine most likely does not hold the weights of the version it reports (a broken or "
        f"skipped weight sync), or engine and trainer numerics differ (dtype, kernels). Nothing of score was "
        f"committed for iteration {iteration}. Fix the sync, delete {store.stage_uri(iteration, 'generate')} "
        f"(sampled by those weights) and resume; if the numerics legitimately differ this much, raise "
        f"algo.max_logprob_gap (--set algo.max_logprob_gap=...).")


def load_reward_fn(path: str | None):
    """The rule reward `module:function`; None for none (reward.fn: null)."""
    if path is None:
        return None
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise RewardError(f"reward.fn: cannot import {path!r} ({err})") from None


def _checked(source: str, values, ids: list[str]) -> list[float]:
    """`values` as floats, or RewardError naming `source` and the first bad sample."""
    values = list(values)
    if len(values) != len(ids):
        raise RewardError(f"{source} returned {len(values)} values for {len(ids)} samples")
    for sample_id, r in zip(ids, values):
        if not isinstance(r, (int, float)) or not math.isfinite(r):
            raise RewardError(f"{source} returned {r!r} for sample {sample_id}; expected a finite number")
    return [float(r) for r in values]


def rewards_by_source(reward, rollout, reward_model=None, label_key: str | None = None) -> dict[str, list[float]]:
    """Each configured source's rewards, checked: {"fn": rule function, "model": reward model, "remote": endpoint}.

    The reward model's request goes to its actor (`reward_model`, the run's `reward` actor) first, so it scores while
    the rule function and the HTTP requests run here."""
    from stages.common import logger
    from workers.reward import RemoteReward, RemoteRewardError

    if reward.model is not None and reward_model is None:
        raise RewardError("reward.model is set, but no reward-model actor was passed to score with")
    ids = rollout["sample_id"].to_pylist()
    prompts, responses = rollout["prompt"].to_pylist(), rollout["response"].to_pylist()
    model_ref = reward_model.score.remote(prompts, responses) if reward.model is not None else None
    out = {}
    if reward.fn is not None:
        out["fn"] = rule_rewards(reward.fn, rollout, label_key)
    if reward.remote is not None:
        r = reward.remote
        client = RemoteReward(r.url, batch_size=r.batch_size, concurrency=r.concurrency, timeout_s=r.timeout_s,
                              retries=r.retries, backoff_s=r.backoff_s, token_env=r.token_env,
                              log=logger().warning)
        metadata = [json.loads(m) for m in rollout["metadata"].to_pylist()]
        try:
            out["remote"] = _checked(f"reward.remote {r.url}", client.score(prompts, responses, metadata, ids), ids)
        except RemoteRewardError as err:
            raise RewardError(str(err)) from None
    if model_ref is not None:
        import ray

        out["model"] = _checked(f"reward.model {reward.model.path}", ray.get(model_ref), ids)
    return out


def combine_rewards(reward, by_source: dict[str, list[float]]) -> list[float]:
    """reward_i = Σ_source weight_source × reward_source,i (the weights: reward.fn_weight, reward.model.weight,
    reward.remote.weight)."""
    weights = {"fn": reward.fn_weight}
    if reward.model is not None:
        weights["model"] = reward.model.weight
    if reward.remote is not None:
        weights["remote"] = reward.remote.weight
    return np.sum([weights[source] * np.asarray(values, np.float64) for source, values in by_source.items()],
                  axis=0).tolist()


def labels_argument(fn) -> str | None:
    """How `fn` takes labels: "keyword" (a `labels` parameter or **kwargs), "positional" (a 4th positional
    parameter, or *args), or None (fn(prompts, responses, metadata) only, the original contract)."""
    import inspect

    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin or C callable without a signature: the original contract
        return None
    if any(p.name == "labels" and p.kind is not p.POSITIONAL_ONLY for p in params) or any(
            p.kind is p.VAR_KEYWORD for p in params):
        return "keyword"
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 4 or any(p.kind is p.VAR_POSITIONAL for p in params):
        return "positional"
    return None


def rule_rewards(fn_path: str, rollout, label_key: str | None = None) -> list[float]:
    """Call the rule function on the whole batch and check what it returns, naming the first bad sample.

    A function that takes labels (`labels_argument`) gets the reference answers read from each sample's metadata
    at data.label_key (`label_key`), or None when it is unset; others are called as fn(prompts, responses,
    metadata)."""
    from storage.prompts import MISSING, lookup

    fn = load_reward_fn(fn_path)
    metadata = [json.loads(m) for m in rollout["metadata"].to_pylist()]
    args = (rollout["prompt"].to_pylist(), rollout["response"].to_pylist(), metadata)
    takes = labels_argument(fn)
    labels = None if label_key is None else [None if (v := lookup(m, label_key)) is MISSING else v for m in metadata]
    if takes == "keyword":
        rewards = fn(*args, labels=labels)
    elif takes == "positional":
        rewards = fn(*args, labels)
    else:
        rewards = fn(*args)
    return _checked(f"reward.fn {fn_path}", rewards, rollout["sample_id"].to_pylist())


def compute_rewards(reward, rollout, reward_model=None, label_key: str | None = None) -> list[float]:
    """Every sample's reward. `reward` is the RewardConfig (the weighted sum of its sources; `reward_model` is the
    run's `reward` actor when reward.model is set), or a rule function path alone, as evaluation and dynamic
    sampling pass it (`config.reward.fn`). `label_key` is data.label_key (the rule function's labels)."""
    if isinstance(reward, str):
        return rule_rewards(reward, rollout, label_key)
    if reward is None:
        raise RewardError("reward.fn is null, but evaluation and algo.dynamic_sampling score with the rule function "
                          "alone: set reward.fn (the rule they judge by), or turn them off (eval.prompts: null, "
                          "algo.dynamic_sampling: false)")
    return combine_rewards(reward, rewards_by_source(reward, rollout, reward_model, label_key))


def _retry_unless_gate(task, task_run, state) -> bool:
    # The gate is deterministic: a retry scores the same committed rollout with the same weights and fails again,
    # so it would only delay the gate's error (and bury it under a second traceback).
    return not isinstance(state.data, LogprobGateError)


@stage("score", schema="scored", trainers=True, retry_condition_fn=_retry_unless_gate)
def score(s: StageRun) -> Output:
    import pyarrow as pa
    import ray

    from stages.pipeline import staleness
    from storage.schema import SCORED, policy_mask
    from workers.cluster import on_all_ranks
    from workers.trainers import threads_each

    config, iteration = s.config, s.iteration
    rollout = s.store.read_stage(iteration, "generate")
    tokens = ray.put(rollout.select(["prompt_ids", "response_ids"]))
    s.trainers().bring_to(iteration - 1)  # the policy (and critic) the update starts from

    # Each column's ObjectRefs, one per rank of the group that computes it: every rank returns the whole column.
    # The models work at once: on CPU each on its share of the threads.
    # A LoRA policy is its own reference (the adapter disabled): its actor runs both calls, one after the other.
    lora = config.policy.lora is not None
    working = (1 if lora else 2) + config.uses_critic + (config.reward.model is not None)
    policy = s.group("policy")
    threads = threads_each(config, config.policy, working)
    pending = {"old_logprobs": on_all_ranks(policy, "logprobs", tokens, threads),
               "ref_logprobs": (on_all_ranks(policy, "logprobs", tokens, threads, False) if lora
                                else [s.actor("reference").logprobs.remote(tokens, threads)])}
    if config.uses_critic:
        critic = s.group("critic")
        pending["values"] = on_all_ranks(critic, "values", tokens, threads_each(config, config.critic, working))
    # Rule function and remote endpoint run here, the reward model in its actor, all while the trainers work.
    reward_model = s.actor("reward") if config.reward.model is not None else None
    by_source = rewards_by_source(config.reward, rollout, reward_model, config.data.label_key)
    rewards = combine_rewards(config.reward, by_source)
    if config.algo.overlong_buffer is not None:
        import torch

        from algorithms.dapo import overlong_penalty

        lengths = torch.tensor([len(r) for r in rollout["response_ids"].to_pylist()])
        penalty = overlong_penalty(lengths, config.generation.max_new_tokens, config.algo.overlong_buffer,
                                   config.algo.overlong_penalty)
        rewards = [r + p for r, p in zip(rewards, penalty.tolist())]
    columns = {name: ray.get(refs)[0] for name, refs in pending.items()}
    columns.setdefault("values", [None] * rollout.num_rows)

    table = rollout
    table = table.append_column("reward", pa.array(rewards, pa.float32()))
    for name in ("old_logprobs", "ref_logprobs", "values"):
        table = table.append_column(name, pa.array(columns[name], SCORED.field(name).type))

    # Engine vs trainer on the same tokens and weights: a large gap means the sync or the engine is broken. Only
    # policy tokens: the engine never sampled a multi-turn episode's environment tokens (holes).
    sampled = np.concatenate([np.asarray(m, bool) for m in policy_mask(rollout)] or [[]]).astype(bool)
    engine_lp = np.concatenate([np.asarray(x, np.float64) for x in rollout["engine_logprobs"].to_pylist()]
                               or [[]])[sampled]
    old_lp = np.concatenate([np.asarray(x, np.float64) for x in columns["old_logprobs"]] or [[]])[sampled]
    metrics = {
        "rollout/reward_mean": float(np.mean(rewards)),
        "rollout/reward_std": float(np.std(rewards)),
        **{f"rollout/reward_{source}_mean": float(np.mean(values)) for source, values in by_source.items()},
        "rollout/logprob_diff_mean": float(np.mean(np.exp(np.abs(engine_lp - old_lp)))) if old_lp.size else 1.0,
        "rollout/logprob_abs_diff_max": float(np.max(np.abs(engine_lp - old_lp))) if old_lp.size else 0.0,
        "rollout/staleness": staleness(config, iteration),
    }
    if metrics["rollout/staleness"] == 0:  # engine and trainer at one version (else: gated at its sync)
        check_logprob_gap(config, s.store, iteration, rollout, metrics)
    return Output(table, metrics)


score_task = score.task
