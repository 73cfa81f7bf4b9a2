"""Multi-turn episodes (workers/episodes.py): token in / token out, holes, turns, seeds, limits and concurrency, with a
scripted engine (what it answers is fixed by the test), then on the real HF engine (tiny random model, in process).

Run alone:  .venv/bin/pytest -q tests/workers/test_episodes.py
"""

import threading
import time

import pytest

from ppoflow.envs.base import Env
from ppoflow.envs.tools import ToolEnv
from workers.config import RolloutConfig
from workers.episodes import TURN_SEED_STRIDE, Episode, EnvError, observation_text, play, run_episodes

SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 24, "stop": None}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


class ScriptedEngine:
    """engine.generate's contract; sample k of a request answers `script(request, k)` (a text, or token ids) with
    logprob -0.5 per token, plus eos. Records every batch of requests."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.batches = tokenizer, script, []
        self.lock = threading.Lock()

    def __call__(self, requests):
        with self.lock:
            self.batches.append([dict(r) for r in requests])
        out = []
        for r in requests:
            samples = []
            for k in range(r["n"]):
                answer = self.script(r, k)
                ids = (answer if isinstance(answer, list)
                       else self.tokenizer.encode(answer, add_special_tokens=False))[: r["max_new_tokens"] - 1]
                ids = ids + [self.tokenizer.eos_token_id]
                samples.append({"response_ids": ids, "logprobs": [-0.5] * len(ids), "finish_reason": "stop",
                                "text": self.tokenizer.decode(ids, skip_special_tokens=True)})
            out.append(samples)
        return out


def _prompt(tokenizer, text="What is 12*3?"):
    """The chat-templated prompt's ids, as the generate stage encodes them (stages/generate.py encode_prompt)."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def _episodes(tokenizer, env_factory, groups=1, n=1, seed=100):
    return [Episode(env_factory(), g, k, seed + 1000 * g + k, dict(SAMPLING), _prompt(tokenizer))
            for g in range(groups) for k in range(n)]


def _run(episodes, engine, tokenizer, **kwargs):
    limits = {"max_turns": 4, "max_total_tokens": 96, "max_model_len": 256, "chat": True, **kwargs}
    return run_episodes(episodes, engine, tokenizer, **limits)


def test_a_tool_episode_is_stored_token_for_token(tokenizer):
    """The calc episode: the call, the tool's message as holes, the answer; the second turn's request continues
    from the exact ids sampled, even where they are not how the tokenizer would encode their text."""
    eos = tokenizer.eos_token_id
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    # The call, then " is" sampled as " ", "i", "s": the tokenizer encodes that text as the one token " is".
    odd_call = encode("<calc>12*3</calc>") + encode(" ") + encode("i") + encode("s")
    assert tokenizer.decode(odd_call) == "<calc>12*3</calc> is" and encode(tokenizer.decode(odd_call)) != odd_call
    engine = ScriptedEngine(tokenizer, lambda r, k: odd_call if len(engine.batches) == 1 else "36")
    [ep] = _episodes(tokenizer, lambda: ToolEnv(tools=["calc"]))
    stats = _run([ep], engine, tokenizer)

    tool_ids = encode(observation_text(tokenizer, [{"role": "tool", "content": "36"}], turn_closed=True))
    assert ep.ids == odd_call + [eos] + tool_ids + encode("36") + [eos]
    assert ep.mask == [1] * (len(odd_call) + 1) + [0] * len(tool_ids) + [1] * 3
    assert ep.turn_index == [0] * (len(odd_call) + 1) + [1] * len(tool_ids) + [2] * 3
    assert ep.logprobs == [-0.5] * (len(odd_call) + 1) + [0.0] * len(tool_ids) + [-0.5] * 3
    # Token in, token out: turn 2 continues from the sampled ids themselves, not a re-encoding of their text.
    second = engine.batches[1][0]
    assert second["prompt_ids"] == ep.prompt_ids + odd_call + [eos] + tool_ids
    assert tokenizer.decode(tool_ids) == "\n<|im_start|>tool\n36<|im_end|>\n<|im_start|>assistant\n"
    assert [(t["role"], t["text"], t["tool"], t["tokens"]) for t in ep.turns] == [
        ("assistant", "<calc>12*3</calc> is", "calc", len(odd_call) + 1), ("tool", "36", "calc", len(tool_ids)),
        ("assistant", "36", None, 3)]
    assert ep.final_text == "36" and ep.finish_reason == "stop" and stats["batches"] == 2


def test_seeds_group_turn_zero_like_single_turn_requests(tokenizer):
    """Turn 0: a prompt's n episodes are one request of n samples with the first episode's seed (single-turn's
    request); turn t of episode k: its seed + t x TURN_SEED_STRIDE, one request per episode."""

    class Talk(Env):
        def step(self, action):
            return "ok", 0.0, False, {}

    engine = ScriptedEngine(tokenizer, lambda r, k: "hi")
    episodes = _episodes(tokenizer, Talk, groups=2, n=3, seed=100)
    _run(episodes, engine, tokenizer, max_turns=3, lockstep=True)
    first = engine.batches[0]
    assert [(r["n"], r["seed"]) for r in first] == [(3, 100), (3, 1100)]
    for t, batch in enumerate(engine.batches[1:], start=1):
        assert [r["seed"] for r in batch] == [(100 + 1000 * g + k + t * TURN_SEED_STRIDE) % (2**31 - 1)
                                              for g in range(2) for k in range(3)]
    assert all(ep.finish_reason == "max_turns" and ep.policy_turns == 3 for ep in episodes)
    assert [t["seed"] for t in episodes[4].turns if t["role"] == "assistant"] == [
        1101 + t * TURN_SEED_STRIDE for t in range(3)]


def test_reward_increments_and_limits(tokenizer):
    """A step's reward increment lands on the last token of the action that earned it; an episode ends at
    max_turns, at max_total_tokens (the observation that would not fit is kept in turns, without tokens) or when
    the environment says done."""

    class Graded(Env):
        def __init__(self, prompt_key="prompt", stop_after=99):
            super().__init__(prompt_key)
            self.turn, self.stop_after = 0, stop_after

        def step(self, action):
            self.turn += 1
            return "x" * 5, 0.25 * self.turn, self.turn >= self.stop_after, {"tool": "grader"}

    engine = ScriptedEngine(tokenizer, lambda r, k: "ab")
    [ep] = _episodes(tokenizer, lambda: Graded(stop_after=2))
    _run([ep], engine, tokenizer)
    policy_ends = [i for i in range(len(ep.ids)) if ep.mask[i] and (i + 1 == len(ep.ids) or not ep.mask[i + 1])]
    assert [ep.env_rewards[i] for i in policy_ends] == [0.25, 0.5]
    assert sum(ep.env_rewards) == 0.75 and ep.finish_reason == "stop"
    assert [t["reward"] for t in ep.turns] == [0.25, 0.0, 0.5, 0.0] and ep.turns[-1]["tokens"] == 0

    [ep] = _episodes(tokenizer, Graded)
    _run([ep], engine, tokenizer, max_total_tokens=20)
    assert ep.finish_reason == "length" and len(ep.ids) <= 20 and ep.turns[-1]["tokens"] == 0

    [ep] = _episodes(tokenizer, Graded)
    _run([ep], engine, tokenizer, max_turns=2)
    assert ep.finish_reason == "max_turns" and ep.policy_turns == 2


def test_a_slow_tool_holds_up_only_its_own_episode(tokenizer):
    """Episode 0's first step takes 3 s; the other episodes play all their turns meanwhile (without lockstep). With
    lockstep every turn waits for it."""
    class Slow(Env):
        def __init__(self, prompt_key="prompt"):
            super().__init__(prompt_key)
            self.turns = 0

        def step(self, action):
            self.turns += 1
            if self.slow and self.turns == 1:
                time.sleep(3.0)
            return "ok", 0.0, self.turns >= 3, {}

    def make(slow):
        env = Slow()
        env.slow = slow
        return env

    for lockstep in (False, True):
        engine = ScriptedEngine(tokenizer, lambda r, k: "hi")
        episodes = [Episode(make(k == 0), 0, k, 10 + k, dict(SAMPLING), _prompt(tokenizer)) for k in range(4)]
        started = time.perf_counter()
        _run(episodes, engine, tokenizer, lockstep=lockstep, step_wait_s=0.05)
        assert all(ep.policy_turns == 3 for ep in episodes)
        seconds = time.perf_counter() - started
        sizes = [sum(r["n"] for r in batch) for batch in engine.batches]
        if lockstep:
            assert sizes == [4, 4, 4] and seconds >= 3.0
        else:
            # The fast episodes' turns 1 and 2 went without episode 0, whose turns 1 and 2 came after its step.
            assert sizes == [4, 3, 3, 1, 1], sizes
        assert 3.0 <= seconds < 10.0


def test_environment_errors_name_the_episode(tokenizer):
    class Broken(Env):
        def step(self, action):
            raise KeyError("oops")

    with pytest.raises(EnvError, match=r"Broken.step raised KeyError.*prompt group 0, sample 0, turn 1"):
        _run(_episodes(tokenizer, Broken), ScriptedEngine(tokenizer, lambda r, k: "hi"), tokenizer)

    class Wrong(Env):
        def step(self, action):
            return "just an observation"

    with pytest.raises(EnvError, match=r"Wrong.step returned 'just an observation'; expected \(observation"):
        _run(_episodes(tokenizer, Wrong), ScriptedEngine(tokenizer, lambda r, k: "hi"), tokenizer)

    with pytest.raises(EnvError, match="data.apply_chat_template"):
        _run(_episodes(tokenizer, lambda: ToolEnv(tools=["calc"])),
             ScriptedEngine(tokenizer, lambda r, k: "<calc>1+1</calc>"), tokenizer, chat=False)


# ---- on the HF engine ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from workers.hf_engine import HFEngine

    return HFEngine(tiny_model_dir, seed=0, max_model_len=256, num_threads=1)


def _requests(tokenizer, n=3):
    prompts = [_prompt(tokenizer, f"What is 2*{x}?") for x in (17, 4821, 300)]
    return [{"prompt_ids": p, "n": n, "seed": 1000 + 7 * j, **SAMPLING, "max_new_tokens": 12}
            for j, p in enumerate(prompts)]


def _encode(tokenizer):
    return lambda prompt: (_prompt(tokenizer, prompt), False)


def test_single_turn_env_samples_what_the_engine_samples(engine, tokenizer):
    """SingleTurnEnv through the episode loop: the same requests reach the engine, so the same samples come back
    (multi-turn columns null but the one turn)."""
    requests = _requests(tokenizer)
    direct = engine.generate(requests)
    rows = [{"prompt": f"What is 2*{x}?"} for x in (17, 4821, 300)]
    results, _ = play(requests, rows, engine.generate, tokenizer, _encode(tokenizer),
                      RolloutConfig(env="ppoflow.envs.base:SingleTurnEnv"), prompt_key="prompt", chat=True,
                      max_model_len=256)
    for want, got in zip(direct, results, strict=True):
        for a, b in zip(want, got, strict=True):
            assert {k: b[k] for k in a} == a
            assert b["response_mask"] is None and b["turn_index"] is None and b["env_rewards"] is None
            assert [t["role"] for t in b["turns"]] == ["assistant"]


class Echo(Env):
    """Three policy turns, each answered by a short text observation."""

    def __init__(self, prompt_key="prompt"):
        super().__init__(prompt_key)
        self.turns = 0

    def step(self, action):
        self.turns += 1
        return f" [seen {len(action)}] ", 0.0, self.turns >= 3, {}


def test_stored_ids_are_what_the_engine_samples_from_them(engine, tokenizer):
    """Token in, token out on the real engine: each policy turn, sampled again from the stored ids before it with
    the turn's stored seed, gives the stored tokens and logprobs; holes hold the observation's tokens."""
    requests = _requests(tokenizer, n=2)
    rows = [{"prompt": f"What is 2*{x}?"} for x in (17, 4821, 300)]
    results, stats = play(requests, rows, engine.generate, tokenizer, _encode(tokenizer),
                          RolloutConfig(env=f"{__name__}:Echo", max_total_tokens=120), prompt_key="prompt",
                          chat=True, max_model_len=256)
    assert stats["batches"] >= 3
    checked = 0
    for sample in (s for samples in results for s in samples):
        mask = sample["response_mask"] or [1] * len(sample["response_ids"])
        for t, turn in enumerate(sample["turns"]):
            at = [i for i, index in enumerate(sample["turn_index"] or [0] * len(mask)) if index == t]
            if turn["role"] != "assistant":
                assert all(mask[i] == 0 for i in at) and len(at) == turn["tokens"]
                continue
            start = at[0]
            [[again]] = engine.generate([{**SAMPLING, "prompt_ids": sample["prompt_ids"] + sample["response_ids"][
                :start], "n": 1, "seed": turn["seed"], "max_new_tokens": len(at)}])
            assert again["response_ids"] == sample["response_ids"][start:start + len(at)]
            assert max(abs(a - b) for a, b in zip(again["logprobs"], sample["logprobs"][start:])) < 1e-5
            assert all(mask[i] == 1 for i in at)
            checked += 1
    assert checked >= 12
