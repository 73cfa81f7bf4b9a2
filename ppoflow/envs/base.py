"""The environment interface of multi-turn rollouts (`rollout.env: module:Class`) and the single-turn environment.

The generate and evaluate stages build one environment per episode, `Class(prompt_key=data.prompt_key,
**rollout.env_args)`, and drive it (workers/episodes.py):

    reset(row) -> first observation        the prompt row as read from data.prompts (every column); returns the
                                           prompt: a string or a list of chat messages, encoded as data.* says
    step(action_text) -> (observation | None, reward_increment, done, info)
                                           called with the text of each policy turn (decoded, special tokens
                                           skipped, a stop string cut); `observation` a string (appended as its
                                           tokens) or a chat message / list of messages (appended through the chat
                                           template, e.g. {"role": "tool", "content": "42"}); `reward_increment`
                                           lands on the last token of the action that earned it, on top of the
                                           reward sources' outcome reward on the last policy token; `info` may name
                                           the `tool` called and flag an `error` (both shown in the turns list)

Environments of different episodes run concurrently in threads: keep state on the instance. `step` must not raise on
bad actions (answer with an observation instead): an exception fails the stage.

Run alone: nothing to run; tests/envs/test_envs.py.
"""

from __future__ import annotations


class Env:
    """Base class: keeps `prompt_key` and gives the row's prompt back on reset; subclasses override `step`."""

    def __init__(self, prompt_key: str = "prompt"):
        self.prompt_key = prompt_key

    def reset(self, row: dict):
        return row[self.prompt_key]

    def step(self, action: str) -> tuple[str | dict | list[dict] | None, float, bool, dict]:
        raise NotImplementedError


class SingleTurnEnv(Env):
    """One policy turn and done: today's single-turn rollout, through the episode loop (`rollout.env: null` samples
    the same tokens without it; tests/workers/test_episodes.py compares the two)."""

    def step(self, action: str):
        return None, 0.0, True, {}
