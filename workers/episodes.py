"""Multi-turn episodes: the policy and an environment (tools, a simulated user, a game) take turns, token in and token
out, on the run's engines.

An episode starts from the token ids of its first observation (the prompt its environment's `reset` gave, encoded by
the stage) and alternates:
- a policy turn: the engine continues from the exact ids of the episode so far (nothing sampled is decoded and
  encoded again, so the trainer scores the very tokens the engine drew) and its tokens are appended as real tokens,
  mask 1, with their engine logprobs;
- an environment turn: `env.step(turn text)` answers `(observation | None, reward_increment, done, info)`; the
  observation's tokens are appended as holes, mask 0 (logprob 0): the policy did not sample them, so no loss,
  estimator or logprob gate counts them. A string observation is appended as its tokens; a chat message (`{"role":
  "tool", "content": ...}`, or a list of them) through the chat template, as the text the template puts between the
  policy's turn and the next generation prompt (`observation_text`).
The episode ends when the environment says done, after rollout.max_turns policy turns, or when rollout.max_total_tokens
response tokens (or the engine's context) leave no room for another turn.

Seeds: turn 0 of an episode samples with the seed the single-turn generate stage gives its sample (a prompt's n
episodes share one request, as single-turn samples do); turn t with that seed plus t × TURN_SEED_STRIDE. Requests
carry their seeds, so an episode's samples depend on nothing else in its batch.

Concurrency: environment steps run in a thread pool (`workers`), so a slow tool call holds up its own episode only;
the engine gets one batch per round of the episodes ready for their next turn. With `lockstep` a round waits for
every episode's step instead: the batches are then the same in every run, which the engines' numerics need for
bit-identical reruns (the HF engine's logprobs move in the last bits with the batch's padding); a slow tool then
delays the round.

Run alone: nothing to run; tests/workers/test_episodes.py drives it with a scripted engine and with the HF engine.
"""

from __future__ import annotations

import functools
import importlib
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

TURN_SEED_STRIDE = 10_000_019
"""Seed of turn t = the episode's turn-0 seed + t × this (mod 2^31 - 1): a prime above any iteration's sample count,
so the turns of one episode never draw a random stream that another sample of the iteration draws."""


class EnvError(RuntimeError):
    """An environment raised or answered something that is not `(observation, reward, done, info)`."""


def load_env_class(spec: str) -> type:
    """The class `module:Class` of rollout.env; EnvError naming the field when it cannot be imported."""
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise EnvError(f"rollout.env: cannot import {spec!r} ({err})") from None


@functools.lru_cache(maxsize=8)
def _chat_glue(tokenizer) -> tuple[str, str]:
    """What the chat template writes after an assistant turn's content: (the turn's end token as text, the rest).

    Rendered once on a dummy conversation; e.g. ChatML gives ("<|im_end|>", "\\n")."""
    messages = [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    after = rendered[rendered.rindex("A") + 1:]
    eos = tokenizer.eos_token or ""
    return (eos, after[len(eos):]) if eos and after.startswith(eos) else ("", after)


def observation_text(tokenizer, messages: list[dict], turn_closed: bool) -> str:
    """The text the chat template puts between an assistant turn and the next generation prompt when `messages`
    (tool results, a user reply) follow it: the rest of the assistant turn's closing (its end token too when the
    policy's turn did not end with it, `turn_closed` false), the messages, and the generation prompt.

    Computed as render(dummy + messages, generation prompt) minus render(dummy), so any chat template works whose
    rendering of a conversation starts with the rendering of its beginning."""
    base = [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    before = tokenizer.apply_chat_template(base, tokenize=False)
    after = tokenizer.apply_chat_template(base + messages, tokenize=False, add_generation_prompt=True)
    if not after.startswith(before):
        raise EnvError("the chat template renders a conversation differently once messages follow it, so an "
                       "observation cannot be appended token in, token out; return observations as plain strings")
    end, rest = _chat_glue(tokenizer)
    return ("" if turn_closed else end) + rest + after[len(before):]


@dataclass
class Episode:
    """One episode in progress. `group` and `sample` say which request (prompt) and which of its n samples it is;
    `seed` is its turn-0 seed (the seed of the single-turn sample); `sampling` the request fields its turns share
    (temperature, top_p, top_k, max_new_tokens per turn, stop); `prompt_ids` its first observation, encoded."""

    env: Any
    group: int
    sample: int
    seed: int
    sampling: dict
    prompt_ids: list[int]
    prompt_truncated: bool = False
    ids: list[int] = field(default_factory=list)  # response ids so far: policy and environment tokens
    logprobs: list[float] = field(default_factory=list)  # engine logprob per token; 0.0 at environment tokens
    mask: list[int] = field(default_factory=list)  # 1 policy token, 0 environment token
    turn_index: list[int] = field(default_factory=list)  # index in `turns` of each token's turn
    env_rewards: list[float] = field(default_factory=list)  # env.step's reward on the last token of its action
    turns: list[dict] = field(default_factory=list)  # storage/schema.py TURN
    policy_turns: int = 0
    finish_reason: str | None = None
    final_text: str = ""


def _turn(role: str, text: str, tokens: int, latency_s: float, *, tool: str | None = None, reward: float = 0.0,
          seed: int | None = None, finish_reason: str | None = None, error: bool = False) -> dict:
    return {"role": role, "text": text, "tool": tool, "tokens": tokens, "latency_s": latency_s, "reward": reward,
            "seed": seed, "finish_reason": finish_reason, "error": error}


def run_episodes(episodes: list[Episode], sample: Callable[[list[dict]], list[list[dict]]], tokenizer, *,
                 max_turns: int, max_total_tokens: int, max_model_len: int, chat: bool, workers: int = 8,
                 lockstep: bool = False, step_wait_s: float = 0.1,
                 on_turn: Callable[[int], None] | None = None) -> dict:
    """Play `episodes` to their end; fills each Episode in place and returns timing stats.

    `sample(requests)` is the engines' generate (engine.generate's contract: requests in, n samples per request out).
    `chat`: observations that are chat messages go through the tokenizer's chat template (data.apply_chat_template).
    `on_turn(t)` is called before the first engine batch that holds a turn t (the generate stage's fault point).
    Returns {"engine_s", "env_s", "batches"}."""
    eos = tokenizer.eos_token_id
    stats = {"engine_s": 0.0, "env_s": 0.0, "batches": 0}
    reached = -1

    def requests_for(ready: list[Episode]) -> tuple[list[dict], list[list[Episode]]]:
        """One request per episode, except at turn 0, where a prompt's episodes with the same first observation
        and consecutive seeds share one request of n samples (sample k is drawn with seed + k): the single-turn
        stage's request, so a single-turn env reproduces its samples."""
        requests, owners = [], []
        for ep in ready:
            context = len(ep.prompt_ids) + len(ep.ids)
            limit = min(ep.sampling["max_new_tokens"], max_total_tokens - len(ep.ids), max_model_len - context)
            seed = (ep.seed + ep.policy_turns * TURN_SEED_STRIDE) % (2**31 - 1)
            last = owners[-1][-1] if owners else None
            if (ep.policy_turns == 0 and last is not None and last.policy_turns == 0 and last.group == ep.group
                    and last.prompt_ids == ep.prompt_ids and ep.seed == last.seed + 1):
                requests[-1]["n"] += 1
                owners[-1].append(ep)
                continue
            requests.append({**ep.sampling, "prompt_ids": ep.prompt_ids + ep.ids, "n": 1, "seed": seed,
                             "max_new_tokens": limit})
            owners.append([ep])
        return requests, owners

    def room(ep: Episode) -> int:
        """Tokens the policy may still add: the episode's budget and the engine's context."""
        return min(max_total_tokens - len(ep.ids), max_model_len - len(ep.prompt_ids) - len(ep.ids))

    def take_turn(ep: Episode, s: dict, seconds: float, seed: int) -> None:
        index = len(ep.turns)
        ep.ids += s["response_ids"]
        ep.logprobs += s["logprobs"]
        ep.mask += [1] * len(s["response_ids"])
        ep.turn_index += [index] * len(s["response_ids"])
        ep.env_rewards += [0.0] * len(s["response_ids"])
        ep.turns.append(_turn("assistant", s["text"], len(s["response_ids"]), seconds, seed=seed,
                              finish_reason=s["finish_reason"]))
        ep.policy_turns += 1
        ep.final_text = s["text"]

    def observe(ep: Episode, result, seconds: float) -> bool:
        """Apply env.step's answer; True when the episode goes on."""
        if not (isinstance(result, tuple) and len(result) == 4):
            raise EnvError(f"{type(ep.env).__name__}.step returned {result!r}; expected (observation, reward, done, "
                           "info)")
        obs, reward, done, info = result
        info = info or {}
        reward = float(reward or 0.0)
        if reward and ep.env_rewards:
            ep.env_rewards[-1] += reward  # on the last token of the action that earned it
        ep.turns[-1]["reward"] += reward
        ep.turns[-1]["tool"] = info.get("tool")  # the tool the turn called, if any
        if obs is None:  # no observation: the policy's next turn follows its last one directly
            ids, role, text = [], None, None
        elif isinstance(obs, str):
            role, text = "environment", obs
            ids = tokenizer(obs, add_special_tokens=False)["input_ids"]
        else:
            messages = [obs] if isinstance(obs, dict) else list(obs)
            if not chat:
                raise EnvError(f"{type(ep.env).__name__}.step returned chat messages, which become tokens only "
                               "through the chat template (data.apply_chat_template: true); return a string instead")
            role, text = messages[-1].get("role", "environment"), "\n".join(str(m.get("content", "")) for m in messages)
            closed = bool(ep.ids) and ep.ids[-1] == eos
            ids = tokenizer(observation_text(tokenizer, messages, closed), add_special_tokens=False)["input_ids"]
        fits = not done and ep.policy_turns < max_turns and room(ep) - len(ids) > 0
        if role is not None:  # an observation that ends the episode is kept in `turns`, without tokens
            ep.turns.append(_turn(role, text, len(ids) if fits else 0, seconds, tool=info.get("tool"),
                                  error=bool(info.get("error"))))
        if done or not fits:
            last_policy_turn = next(t for t in reversed(ep.turns) if t["role"] == "assistant")
            ep.finish_reason = (last_policy_turn["finish_reason"] if done else "max_turns"
                                if ep.policy_turns >= max_turns else "length")
            return False
        index = len(ep.turns) - 1
        ep.ids += ids
        ep.logprobs += [0.0] * len(ids)
        ep.mask += [0] * len(ids)
        ep.turn_index += [index] * len(ids)
        ep.env_rewards += [0.0] * len(ids)
        return True

    def step(ep: Episode):
        started = time.perf_counter()
        try:
            result = ep.env.step(ep.turns[-1]["text"])
        except Exception as err:
            raise EnvError(f"{type(ep.env).__name__}.step raised {type(err).__name__}: {err} (prompt group "
                           f"{ep.group}, sample {ep.sample}, turn {ep.policy_turns})") from err
        return result, time.perf_counter() - started

    ready = list(episodes)
    stepping: dict = {}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="env-step") as pool:
        while ready or stepping:
            if ready:
                ready.sort(key=lambda e: (e.group, e.sample))  # the same request order whatever finished first
                turn = max(e.policy_turns for e in ready)
                if on_turn is not None and turn > reached:
                    on_turn(turn)
                reached = max(reached, turn)
                requests, owners = requests_for(ready)
                started = time.perf_counter()
                results = sample(requests)
                seconds = time.perf_counter() - started
                stats["engine_s"] += seconds
                stats["batches"] += 1
                for request, group, samples in zip(requests, owners, results):
                    for k, (ep, s) in enumerate(zip(group, samples, strict=True)):
                        take_turn(ep, s, seconds, request["seed"] + k)
                        stepping[pool.submit(step, ep)] = ep
                ready = []
            if not stepping:
                break
            # Lockstep: every step of the round. Else the steps done within step_wait_s (at least one) join the next
            # engine batch, and slower ones a later batch.
            done, _ = wait(stepping, timeout=None if lockstep else step_wait_s)
            if not done:
                done, _ = wait(stepping, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=lambda f: (stepping[f].group, stepping[f].sample)):
                ep = stepping.pop(future)
                result, seconds = future.result()
                stats["env_s"] += seconds
                if observe(ep, result, seconds):
                    ready.append(ep)
    return stats


SAMPLING_KEYS = ("temperature", "top_p", "top_k", "max_new_tokens", "stop")


def play(requests: list[dict], rows: list[dict], sample: Callable[[list[dict]], list[list[dict]]], tokenizer,
         encode: Callable, rollout, *, prompt_key: str, chat: bool, max_model_len: int,
         on_turn: Callable[[int], None] | None = None) -> tuple[list[list[dict]], dict]:
    """The multi-turn counterpart of the engines' generate, for the stages: request j's n samples become n episodes
    of the environment rollout.env on prompt row `rows[j]`, episode k starting with seed `seed + k` (the seed of
    single-turn sample k). `encode(observation) -> (ids, truncated)` encodes a reset's observation as the stage
    encodes prompts; `rollout` is the RolloutConfig.

    Returns per request its n samples, engine.generate's dicts ("text": the last policy turn, "response_ids",
    "logprobs", "finish_reason") plus "prompt_ids", "prompt_truncated" and the multi-turn columns of
    storage/schema.py (`episode_columns`), and the stats of `run_episodes`."""
    env_cls = load_env_class(rollout.env)
    episodes = []
    for j, (request, row) in enumerate(zip(requests, rows, strict=True)):
        for k in range(request["n"]):
            env = env_cls(prompt_key=prompt_key, **rollout.env_args)
            try:
                ids, truncated = encode(env.reset(row))
            except Exception as err:
                raise EnvError(f"{rollout.env}: reset failed on prompt row {j} of the batch ({type(err).__name__}: "
                               f"{err})") from err
            episodes.append(Episode(env, j, k, request["seed"] + k, {key: request.get(key) for key in SAMPLING_KEYS},
                                    ids, truncated))
    stats = run_episodes(episodes, sample, tokenizer, max_turns=rollout.max_turns,
                         max_total_tokens=rollout.max_total_tokens, max_model_len=max_model_len, chat=chat,
                         workers=rollout.env_workers, lockstep=rollout.lockstep, step_wait_s=rollout.step_wait_s,
                         on_turn=on_turn)
    results: list[list[dict]] = [[] for _ in requests]
    for ep in episodes:
        results[ep.group].append({"text": ep.final_text, "response_ids": ep.ids, "logprobs": ep.logprobs,
                                  "finish_reason": ep.finish_reason, "prompt_ids": ep.prompt_ids,
                                  "prompt_truncated": ep.prompt_truncated, **episode_columns(ep)})
    return results, stats


EPISODE_COLUMNS = ("response_mask", "turn_index", "env_rewards", "turns")
"""The rollout's multi-turn columns (storage/schema.py); a single-turn sample holds null in each."""


def episode_columns(ep: Episode) -> dict:
    """The multi-turn rollout columns of a finished episode (storage/schema.py): the per-token arrays are null where
    they hold their trivial value (no hole: mask all 1; one turn: turn index all 0; no reward increment)."""
    # keys in EPISODE_COLUMNS' order
    return {"response_mask": None if all(ep.mask) else ep.mask,
            "turn_index": None if not any(ep.turn_index) else ep.turn_index,
            "env_rewards": ep.env_rewards if any(ep.env_rewards) else None,
            "turns": ep.turns}


def episode_metrics(samples: list[dict], prefix: str) -> dict:
    """Per-episode means over samples of `play`: policy turns, tool calls, tool errors, policy tokens."""
    import numpy as np

    turns = [s["turns"] for s in samples]
    return {f"{prefix}/turns": float(np.mean([sum(t["role"] == "assistant" for t in ts) for ts in turns])),
            f"{prefix}/tool_calls": float(np.mean([sum(t["tool"] is not None and t["role"] != "assistant"
                                                       for t in ts) for ts in turns])),
            f"{prefix}/tool_errors": float(np.mean([sum(t["error"] for t in ts) for ts in turns])),
            f"{prefix}/policy_tokens": float(np.mean([sum(t["tokens"] for t in ts if t["role"] == "assistant")
                                                      for ts in turns]))}
