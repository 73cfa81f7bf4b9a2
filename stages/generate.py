"""Generate stage: draw this iteration's prompts, sample n responses each from the engine, commit the rollout table.

The prompt batch is a pure function of (seed, iteration), so a resumed run draws the same prompts without storing a
data position. Each prompt's sampling seed is fixed too, so generation does not depend on batching.

Tests: tests/stages/test_generate.py; end to end: tests/flows/test_ppo_flow.py
"""

import functools
import json
import time

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from stages.common import actor, commit, fault_point, skip_if_committed, store_of


def batch_indices(n_prompts: int, per_iteration: int, iteration: int, seed: int, shuffle: bool) -> list[int]:
    """Prompt rows of `iteration` (1-based): consecutive slices of a per-pass shuffled order, wrapping over passes."""
    start = (iteration - 1) * per_iteration
    out, orders = [], {}
    for pos in range(start, start + per_iteration):
        epoch, k = divmod(pos, n_prompts)
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([seed, epoch]).permutation(n_prompts) if shuffle else None
        out.append(int(orders[epoch][k]) if shuffle else k)
    return out


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def encode_prompt(tokenizer, text: str, chat: bool, max_tokens: int) -> tuple[list[int], bool]:
    """Token ids fed to the engine; over-long prompts keep their last tokens (the generation prompt survives)."""
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=not chat)["input_ids"]
    return (ids[-max_tokens:], True) if len(ids) > max_tokens else (ids, False)


def generate(config, run_uri: str, iteration: int) -> dict:
    import pyarrow as pa
    import ray

    from stages.sync import bring_engine_to
    from storage.prompts import read_prompts
    from storage.schema import ROLLOUT

    store = store_of(config, run_uri)
    if (done := skip_if_committed(store, iteration, "generate")) is not None:
        return done
    started = time.perf_counter()
    fault_point("generate.start", iteration)
    engine = actor(config, run_uri, "engine")
    # The rollout must come from the policy committed by the previous iteration, whatever the engine held.
    bring_engine_to(config, store, run_uri, iteration - 1)

    data, gen = config.data, config.generation
    rows = read_prompts(data.prompts, data.prompt_key, config.storage.storage_options)
    picked = batch_indices(len(rows), data.prompts_per_iteration, iteration, config.seed, data.shuffle)
    tok = _tokenizer(config.model.path)
    requests, prompts = [], []
    for group_id, index in enumerate(picked):
        ids, truncated = encode_prompt(tok, rows[index][data.prompt_key], data.apply_chat_template,
                                       data.max_prompt_tokens)
        prompts.append((index, ids, truncated))
        requests.append({
            "prompt_ids": ids, "n": gen.n_samples_per_prompt, "temperature": gen.temperature, "top_p": gen.top_p,
            "top_k": gen.top_k, "max_new_tokens": gen.max_new_tokens, "stop": gen.stop or None,
            # The engine draws sample i of a request with seed + i: space requests n apart so no two samples of
            # the iteration share a random stream.
            "seed": (config.seed * 1_000_003 + iteration * 100_003 + group_id * gen.n_samples_per_prompt)
            % (2**31 - 1),
        })

    before = ray.get(engine.stats.remote())
    t_gen = time.perf_counter()
    results = ray.get(engine.generate.remote(requests))
    gen_seconds = time.perf_counter() - t_gen
    after = ray.get(engine.stats.remote())
    version = ray.get(engine.version.remote())

    out = []
    for group_id, ((index, ids, truncated), samples) in enumerate(zip(prompts, results)):
        meta = {k: v for k, v in rows[index].items() if k != data.prompt_key}
        for k, s in enumerate(samples):
            out.append({
                "sample_id": f"it{iteration}-p{index}-s{k}", "iteration": iteration, "prompt_index": index,
                "group_id": group_id, "sample_index": k, "prompt": rows[index][data.prompt_key], "prompt_ids": ids,
                "prompt_truncated": truncated, "response": s["text"], "response_ids": s["response_ids"],
                "engine_logprobs": s["logprobs"], "finish_reason": s["finish_reason"], "policy_version": version,
                "metadata": json.dumps(meta, default=str),
            })
    fault_point("generate.before_commit", iteration)
    lengths = [len(r["response_ids"]) for r in out]
    metrics = {
        "rollout/response_len": float(np.mean(lengths)),
        "rollout/finish_length_frac": float(np.mean([r["finish_reason"] == "length" for r in out])),
        "rollout/prompt_truncated_frac": float(np.mean([p[2] for p in prompts])),
        "perf/gen_tokens_per_s": sum(lengths) / max(gen_seconds, 1e-9),
    }
    return commit(store, config, iteration, "generate", pa.Table.from_pylist(out, schema=ROLLOUT), "rollout",
                  started, metrics, policy_version=version, engine_requests=after["requests"] - before["requests"])


@task(name="generate", cache_policy=NO_CACHE)
def generate_task(config, run_uri: str, iteration: int) -> dict:
    return generate(config, run_uri, iteration)
