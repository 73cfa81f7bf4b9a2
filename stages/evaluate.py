"""Evaluate stage: the policy of iteration n (0 = the starting policy) answers the held-out prompts (eval.prompts),
greedy by default; responses, rewards and pass flags are committed under `iter-{n}/eval/` with metrics
`eval/reward_mean` and `eval/pass_rate`. It runs before the first iteration and after every eval.every-th one.

Every engine is brought to policy version n first, so the same stage evaluates any committed iteration of a run; the
requests are spread over the engines like the generate stage's. With rollout.env each answer is an episode with that
environment (a tool task is evaluated with its tools), its last policy turn scored.
Run alone: see flows/ppo.py; tests: tests/flows/test_ppo_flow.py
"""

import functools
import json

from stages.common import Output, StageRun, stage


def due(config, iteration: int) -> bool:
    """Whether the flow evaluates after `iteration` (0: before the first)."""
    ev = config.eval
    return ev.prompts is not None and (iteration % ev.every == 0 or iteration == config.iterations)


@stage("eval", schema="eval", task_name="evaluate")
def evaluate(s: StageRun) -> Output:
    import numpy as np
    import pyarrow as pa

    from stages.generate import _tokenizer, encode_prompt, read_prompt_rows
    from stages.score import compute_rewards
    from storage.prompts import prompt_text
    from storage.schema import EVAL, ROLLOUT
    from workers.engine_pool import check_serving
    from workers.episodes import episode_metrics, play

    config, iteration = s.config, s.iteration
    ev, data, gen = config.eval, config.data, config.generation
    pool = s.engines()
    pool.bring_to(iteration)
    check_serving(pool.handles, iteration)
    pool.wake()
    rows = read_prompt_rows(config, "eval.prompts")[: ev.max_prompts]
    tok = _tokenizer(config.model.path)
    requests = [{
        "prompt_ids": encode_prompt(tok, r[data.prompt_key], data.apply_chat_template, data.max_prompt_tokens,
                                    data.input_template)[0],
        "n": ev.n_samples, "temperature": ev.temperature, "top_p": 1.0 if ev.temperature == 0 else gen.top_p,
        "top_k": -1 if ev.temperature == 0 else gen.top_k, "max_new_tokens": gen.max_new_tokens,
        "stop": gen.stop or None, "seed": (config.seed * 1_000_003 + i * ev.n_samples) % (2**31 - 1),
    } for i, r in enumerate(rows)]
    sample = functools.partial(pool.generate, version=iteration, stage="eval", iteration=iteration)
    if config.rollout.env is None:
        results = sample(requests)
    else:  # the same environment as the rollouts (a tool task is judged with its tools)
        results, _ = play(requests, rows, sample, tok, functools.partial(
            encode_prompt, tok, chat=data.apply_chat_template, max_tokens=data.max_prompt_tokens,
            input_template=data.input_template), config.rollout, prompt_key=data.prompt_key,
            chat=data.apply_chat_template, max_model_len=gen.max_model_len)

    out = [{"sample_id": f"eval{iteration}-p{i}-s{k}", "prompt_index": i, "sample_index": k,
            "prompt": prompt_text(r[data.prompt_key]), "response": s["text"], "response_len": len(s["response_ids"]),
            "finish_reason": s["finish_reason"], "policy_version": iteration,
            "metadata": json.dumps({c: v for c, v in r.items() if c != data.prompt_key}, default=str),
            "turns": s.get("turns")}
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
               "eval/prompts": len(rows), **(episode_metrics(out, "eval") if config.rollout.env is not None else {})}
    return Output(pa.Table.from_pylist(out, schema=EVAL), metrics, {"policy_version": iteration})


evaluate_task = evaluate.task
