"""Evaluate stage: the policy of iteration n (0 = the starting policy) answers the held-out prompts (eval.prompts),
greedy by default; responses, rewards and pass flags are committed under `iter-{n}/eval/` with metrics
`eval/reward_mean` and `eval/pass_rate`. It runs before the first iteration and after every eval.every-th one.

Every engine is brought to policy version n first, so the same stage evaluates any committed iteration of a run; the
requests are spread over the engines like the generate stage's. With rollout.env each answer is an episode with that
environment (a tool task is evaluated with its tools), its last policy turn scored.
Run alone: see flows/ppo.py; tests: tests/flows/test_ppo_flow.py
"""

import copy
import functools
import json

from stages.common import Output, StageRun, stage


def due(config, iteration: int) -> bool:
    """Whether the flow evaluates after `iteration` (0: before the first)."""
    ev = config.eval
    return ev.prompts is not None and (iteration % ev.every == 0 or iteration == config.iterations)


def eval_requests(config, rows: list[dict], n_samples: int, temperature: float) -> list[dict]:
    """Engine requests for held-out prompt rows: `n_samples` answers each, greedy at temperature 0, seeded per prompt
    (the same seeds whichever policy answers, so two policies are compared on the same draws)."""
    from stages.generate import _tokenizer, encode_prompt

    data, gen = config.data, config.generation
    tok = _tokenizer(config.model.path)
    return [{
        "prompt_ids": encode_prompt(tok, r[data.prompt_key], data.apply_chat_template, data.max_prompt_tokens,
                                    data.input_template)[0],
        "n": n_samples, "temperature": temperature, "top_p": 1.0 if temperature == 0 else gen.top_p,
        "top_k": -1 if temperature == 0 else gen.top_k, "max_new_tokens": gen.max_new_tokens,
        "stop": gen.stop or None, "seed": (config.seed * 1_000_003 + i * n_samples) % (2**31 - 1),
    } for i, r in enumerate(rows)]


def scored_answers(config, rows: list[dict], results: list[list[dict]], version: int, reward_fn: str | None,
                   pass_threshold: float, id_prefix: str) -> tuple[list[dict], dict]:
    """The engine's answers to `rows` as EVAL rows, each rewarded by the rule function `reward_fn` and passed when
    its reward is at least `pass_threshold`, and their metrics (eval/reward_mean, eval/pass_rate, ...)."""
    import numpy as np
    import pyarrow as pa

    from stages.score import compute_rewards
    from storage.prompts import prompt_text
    from storage.schema import ROLLOUT

    data = config.data
    out = [{"sample_id": f"{id_prefix}-p{i}-s{k}", "prompt_index": i, "sample_index": k,
            "prompt": prompt_text(r[data.prompt_key]), "response": s["text"], "response_len": len(s["response_ids"]),
            "finish_reason": s["finish_reason"], "policy_version": version,
            "metadata": json.dumps({c: v for c, v in r.items() if c != data.prompt_key}, default=str),
            "turns": s.get("turns")}  # a multi-turn episode's turns (rollout.env); None for one response
           for i, (r, samples) in enumerate(zip(rows, results)) for k, s in enumerate(samples)]
    # the reward function sees eval samples exactly as it sees rollouts
    columns = ("sample_id", "prompt", "response", "metadata")
    rewards = compute_rewards(reward_fn, pa.Table.from_pylist(
        out, schema=pa.schema([ROLLOUT.field(c) for c in columns])), label_key=data.label_key)
    for o, reward in zip(out, rewards):
        o.update(reward=reward, passed=reward >= pass_threshold)
    metrics = {"eval/reward_mean": float(np.mean(rewards)),
               "eval/pass_rate": float(np.mean([o["passed"] for o in out])),
               "eval/response_len": float(np.mean([o["response_len"] for o in out])),
               "eval/prompts": len(rows)}
    return out, metrics


@stage("eval", schema="eval", task_name="evaluate", trainers=True)
def evaluate(s: StageRun) -> Output:
    import pyarrow as pa

    from stages.generate import _tokenizer, encode_prompt, read_prompt_rows
    from storage.schema import EVAL
    from workers.engine_pool import check_serving
    from workers.episodes import episode_metrics, play

    config, iteration, ev = s.config, s.iteration, s.config.eval
    pool = s.engines()
    pool.bring_to(iteration)
    check_serving(pool.handles, iteration)
    pool.wake()
    rows = read_prompt_rows(config, "eval.prompts")[: ev.max_prompts]
    requests = eval_requests(config, rows, ev.n_samples, ev.temperature)
    sample = functools.partial(pool.generate, version=iteration, stage="eval", iteration=iteration)
    if config.rollout.env is None:
        results = sample(requests)
    else:  # the same environment as the rollouts (a tool task is judged with its tools)
        data, tok = config.data, _tokenizer(config.model.path)
        # Copies: the rows are shared with other stages (stages/generate.py prompt_set); an environment may change them.
        results, _ = play(requests, copy.deepcopy(rows), sample, tok, functools.partial(
            encode_prompt, tok, chat=data.apply_chat_template, max_tokens=data.max_prompt_tokens,
            input_template=data.input_template), config.rollout, prompt_key=data.prompt_key,
            chat=data.apply_chat_template, max_model_len=config.generation.max_model_len)
    out, metrics = scored_answers(config, rows, results, iteration, config.reward.fn, ev.pass_threshold,
                                  f"eval{iteration}")
    if config.rollout.env is not None:
        metrics.update(episode_metrics(out, "eval"))
    return Output(pa.Table.from_pylist(out, schema=EVAL), metrics, {"policy_version": iteration})


evaluate_task = evaluate.task
