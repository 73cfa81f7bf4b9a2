"""Score stage: rule rewards, reference logprobs, old policy logprobs and critic values for every rollout sample.

The policy must hold the weights that generated the rollout (version iteration-1): it is reloaded from the committed
checkpoint if it holds anything else. Reference, policy and critic work concurrently on one shared Arrow table in
Ray's object store.

Tests: tests/stages/test_score.py; end to end: tests/flows/test_ppo_flow.py
"""

import importlib
import json
import math
import time

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from stages.common import actor, checkpoint_uri, commit, fault_point, skip_if_committed, store_of


class RewardError(ValueError):
    pass


def load_reward_fn(path: str):
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise RewardError(f"reward.fn: cannot import {path!r} ({err})") from None


def compute_rewards(fn_path: str, rollout) -> list[float]:
    """Call the reward function on the whole batch and check what it returns, naming the first bad sample."""
    fn = load_reward_fn(fn_path)
    metadata = [json.loads(m) for m in rollout["metadata"].to_pylist()]
    rewards = list(fn(rollout["prompt"].to_pylist(), rollout["response"].to_pylist(), metadata))
    ids = rollout["sample_id"].to_pylist()
    if len(rewards) != len(ids):
        raise RewardError(f"reward.fn {fn_path} returned {len(rewards)} values for {len(ids)} samples")
    for sample_id, r in zip(ids, rewards):
        if not isinstance(r, (int, float)) or not math.isfinite(r):
            raise RewardError(f"reward.fn {fn_path} returned {r!r} for sample {sample_id}; expected a finite number")
    return [float(r) for r in rewards]


def score(config, run_uri: str, iteration: int) -> dict:
    import pyarrow as pa
    import ray

    from storage.schema import SCORED

    store = store_of(config, run_uri)
    if (done := skip_if_committed(store, iteration, "score")) is not None:
        return done
    started = time.perf_counter()
    fault_point("score.start", iteration)
    rollout = store.read_stage(iteration, "generate")
    tokens = ray.put(rollout.select(["prompt_ids", "response_ids"]))
    version, ckpt, opts = iteration - 1, checkpoint_uri(store, iteration - 1), config.storage.storage_options

    policy = actor(config, run_uri, "policy")
    ray.get(policy.ensure_version.remote(version, ckpt, opts))
    pending = {"old_logprobs": policy.logprobs.remote(tokens),
               "ref_logprobs": actor(config, run_uri, "reference").logprobs.remote(tokens)}
    if config.uses_critic:
        critic = actor(config, run_uri, "critic")
        ray.get(critic.ensure_version.remote(version, ckpt, opts))
        pending["values"] = critic.values.remote(tokens)
    rewards = compute_rewards(config.reward.fn, rollout)  # runs here while the actors work
    if config.algo.overlong_buffer is not None:
        import torch

        from algorithms.dapo import overlong_penalty

        lengths = torch.tensor([len(r) for r in rollout["response_ids"].to_pylist()])
        penalty = overlong_penalty(lengths, config.generation.max_new_tokens, config.algo.overlong_buffer,
                                   config.algo.overlong_penalty)
        rewards = [r + p for r, p in zip(rewards, penalty.tolist())]
    columns = dict(zip(pending, ray.get(list(pending.values()))))
    columns.setdefault("values", [None] * rollout.num_rows)

    table = rollout
    table = table.append_column("reward", pa.array(rewards, pa.float32()))
    for name in ("old_logprobs", "ref_logprobs", "values"):
        table = table.append_column(name, pa.array(columns[name], SCORED.field(name).type))

    # Engine vs trainer on the same tokens and weights: a large gap means the sync or the engine is broken.
    engine_lp = np.concatenate([np.asarray(x, np.float64) for x in rollout["engine_logprobs"].to_pylist()] or [[]])
    old_lp = np.concatenate([np.asarray(x, np.float64) for x in columns["old_logprobs"]] or [[]])
    fault_point("score.before_commit", iteration)
    metrics = {
        "rollout/reward_mean": float(np.mean(rewards)),
        "rollout/reward_std": float(np.std(rewards)),
        "rollout/logprob_diff_mean": float(np.mean(np.exp(np.abs(engine_lp - old_lp)))) if old_lp.size else 1.0,
        "rollout/logprob_abs_diff_max": float(np.max(np.abs(engine_lp - old_lp))) if old_lp.size else 0.0,
    }
    return commit(store, config, iteration, "score", table, "scored", started, metrics)


@task(name="score", cache_policy=NO_CACHE)
def score_task(config, run_uri: str, iteration: int) -> dict:
    return score(config, run_uri, iteration)
