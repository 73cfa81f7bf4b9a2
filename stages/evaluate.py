"""Evaluate stage: the policy of iteration n (0 = the starting policy) answers the held-out prompts (eval.prompts),
greedy by default; responses, rewards and pass flags are committed under `iter-{n}/eval/` with metrics
`eval/reward_mean` and `eval/pass_rate`. It runs before the first iteration and after every eval.every-th one.

Every engine is brought to policy version n first, so the same stage evaluates any committed iteration of a run; the
requests are spread over the engines like the generate stage's.
Run alone: see flows/ppo.py; tests: tests/flows/test_ppo_flow.py
"""

import json
import time

from prefect import task
from prefect.cache_policies import NO_CACHE

from stages.common import commit, engine_chunk_size, engines, generate_on_engines, skip_if_committed, store_of


def due(config, iteration: int) -> bool:
    """Whether the flow evaluates after `iteration` (0: before the first)."""
    ev = config.eval
    return ev.prompts is not None and (iteration % ev.every == 0 or iteration == config.iterations)


def evaluate(config, run_uri: str, iteration: int) -> dict:
    import numpy as np
    import pyarrow as pa
    import ray

    from stages.generate import _tokenizer, encode_prompt, read_prompt_rows, served_version
    from stages.score import compute_rewards
    from stages.sync import bring_engine_to, engine_recovery
    from storage.prompts import prompt_text
    from storage.schema import EVAL, ROLLOUT

    store = store_of(config, run_uri)
    if (done := skip_if_committed(store, iteration, "eval")) is not None:
        return done
    started = time.perf_counter()
    ev, data, gen = config.eval, config.data, config.generation
    handles = engines(config, run_uri)
    bring_engine_to(config, store, run_uri, iteration)
    served_version(handles, iteration)
    if gen.enable_sleep_mode:
        ray.get([e.wake_up.remote(["weights", "kv_cache"]) for e in handles])
    rows = read_prompt_rows(config, "eval.prompts")[: ev.max_prompts]
    tok = _tokenizer(config.model.path)
    requests = [{
        "prompt_ids": encode_prompt(tok, r[data.prompt_key], data.apply_chat_template, data.max_prompt_tokens,
                                    data.input_template)[0],
        "n": ev.n_samples, "temperature": ev.temperature, "top_p": 1.0 if ev.temperature == 0 else gen.top_p,
        "top_k": -1 if ev.temperature == 0 else gen.top_k, "max_new_tokens": gen.max_new_tokens,
        "stop": gen.stop or None, "seed": (config.seed * 1_000_003 + i * ev.n_samples) % (2**31 - 1),
    } for i, r in enumerate(rows)]
    results = generate_on_engines(handles, requests, chunk_size=engine_chunk_size(config, len(requests)),
                                  version=iteration,
                                  on_engine_lost=engine_recovery(config, store, run_uri, iteration, "eval", iteration))

    out = [{"sample_id": f"eval{iteration}-p{i}-s{k}", "prompt_index": i, "sample_index": k,
            "prompt": prompt_text(r[data.prompt_key]), "response": s["text"], "response_len": len(s["response_ids"]),
            "finish_reason": s["finish_reason"], "policy_version": iteration,
            "metadata": json.dumps({c: v for c, v in r.items() if c != data.prompt_key}, default=str)}
           for i, (r, samples) in enumerate(zip(rows, results)) for k, s in enumerate(samples)]
    # the reward function sees eval samples exactly as it sees rollouts
    columns = ("sample_id", "prompt", "response", "metadata")
    rewards = compute_rewards(config.reward.fn, pa.Table.from_pylist(
        out, schema=pa.schema([ROLLOUT.field(c) for c in columns])), label_key=data.label_key)
    for o, reward in zip(out, rewards):
        o.update(reward=reward, passed=reward >= ev.pass_threshold)
    metrics = {"eval/reward_mean": float(np.mean(rewards)),
               "eval/pass_rate": float(np.mean([o["passed"] for o in out])),
               "eval/response_len": float(np.mean([o["response_len"] for o in out])),
               "eval/prompts": len(rows)}
    return commit(store, config, iteration, "eval", pa.Table.from_pylist(out, schema=EVAL), "eval", started,
                  metrics, policy_version=iteration)


@task(name="evaluate", task_run_name="evaluate-{iteration}", cache_policy=NO_CACHE)
def evaluate_task(config, run_uri: str, iteration: int) -> dict:
    return evaluate(config, run_uri, iteration)
