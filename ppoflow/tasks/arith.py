"""Doubling: the synthetic, verifiable arithmetic task of the CPU quickstart.

A prompt asks "What is 2*4827?" and the answer is the decimal product, "9654". The number is drawn from 0..9999, so
there are 10,000 distinct questions. With the chat template of `ppoflow.tiny_model` a templated prompt is at most 18
tokens and an answer at most 5 digit tokens plus `<|im_end|>`, so rollouts are short and cheap.

Why doubling and not two-number addition ("23+45")? Measured with the 1.1M-parameter tiny model: addition needs the
100-entry (a+b) mod 10 table, which such a model picks up in a sudden jump anywhere from ~200 to more than 1,400 SFT
steps depending on the seed (in most of ~30 runs it had not come by step 450), far outside a one-minute SFT. Each
digit of a doubled number depends only on that digit and on whether the next one is >= 5 (the carry), which the same
model learns gradually and reliably: exact match rises from 0 to 30-50% within 60-160 steps for each of 8 seeds and
keeps rising with more training. An SFT stopped part-way therefore leaves a policy that is right on some questions and
a digit or two off on many others: room for RL to improve.

Rows are `{"prompt": "What is 2*4827?", "answer": "9654"}`; `prompt` is the raw user message (the chat template is
applied by whoever generates) and every other column reaches `reward` as that row's `metadata`. The same task in
another layout (OpenRLHF's `input`/`label`, verl's chat list and `reward_model.ground_truth`) is scored through
data.label_key: `reward` takes the labels then.

Reward, a rule in [0, 1] (referenced from configs as `ppoflow.tasks.arith:reward`):
  1.0  the response, with surrounding whitespace stripped, is exactly the answer ("9654");
  0.1  it is a bare ASCII integer but the wrong one ("9644", "09654"): the right format, the wrong value;
  0.0  anything else: empty, words or signs around the number ("9654.", "-9654", "It is 9654"), garbage.
The small format credit separates "almost an answer" from garbage so that a policy drifting away from the format still
gets a gradient back to it; it is worth far less than a correct answer, so it cannot be farmed instead.

Run alone (writes train.jsonl and eval.jsonl, disjoint, and prints a few rows):
  python -m ppoflow.tasks.arith data/arith --n-train 2048 --n-eval 256 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

MAX_NUMBER = 9999
"""The number to double is drawn uniformly from 0..MAX_NUMBER (both ends included)."""

N_QUESTIONS = MAX_NUMBER + 1
"""How many distinct questions exist; `make_prompts` samples without replacement from them."""

CORRECT_REWARD = 1.0
FORMAT_REWARD = 0.1

_INTEGER = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() would also accept "²" or Arabic-Indic digits


def make_prompts(n: int, seed: int) -> list[dict]:
    """`n` distinct questions `{"prompt": "What is 2*x?", "answer": str(2 * x)}`, the same for the same `seed`."""
    if not 0 <= n <= N_QUESTIONS:
        raise ValueError(f"make_prompts: n={n} must be between 0 and {N_QUESTIONS} (the number of distinct questions)")
    numbers = random.Random(seed).sample(range(N_QUESTIONS), n)
    return [{"prompt": f"What is 2*{x}?", "answer": str(2 * x)} for x in numbers]


def write_prompts(out_dir: str, *, n_train: int = 2048, n_eval: int = 256, seed: int = 0) -> dict[str, str]:
    """Write `train.jsonl` and `eval.jsonl` (one JSON row per line) into `out_dir`; no question is in both.

    Both splits come from one draw without replacement, so they are disjoint by construction.
    Returns `{"train": path, "eval": path}`.
    """
    return write_splits(out_dir, make_prompts(n_train + n_eval, seed), n_train)


def write_splits(out_dir: str, rows: list[dict], n_train: int) -> dict[str, str]:
    """`rows[:n_train]` as `train.jsonl`, the rest as `eval.jsonl` (one JSON row per line) in `out_dir`; returns
    `{"train": path, "eval": path}` (this task's and ppoflow.tasks.calc's prompt files)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, split_rows in (("train", rows[:n_train]), ("eval", rows[n_train:])):
        path = out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in split_rows))
        paths[split] = str(path)
    return paths


def reward(prompts: list[str], responses: list[str], metadata: list[dict],
           labels: list | None = None) -> list[float]:
    """Score each decoded response against its reference answer: `labels[i]` when the run sets data.label_key
    (e.g. `label` of OpenRLHF-style rows, `reward_model.ground_truth` of verl-style ones), else
    `metadata[i]["answer"]` (the rows write_prompts makes); the rule is in the module docstring."""
    if not len(prompts) == len(responses) == len(metadata) == len(labels if labels is not None else metadata):
        raise ValueError(
            f"arith.reward: got {len(prompts)} prompts, {len(responses)} responses, {len(metadata)} metadata rows"
            f"{f' and {len(labels)} labels' if labels is not None else ''}; they must be aligned one to one"
        )
    scores = []
    for i, (response, meta) in enumerate(zip(responses, metadata)):
        if labels is not None:
            answer = labels[i]
        elif "answer" in meta:
            answer = meta["answer"]
        else:
            raise KeyError(
                f"arith.reward: metadata row {i} has no 'answer' (columns: {sorted(meta)}); the prompt file must come "
                "from ppoflow.tasks.arith.write_prompts, or name the answer's column in data.label_key"
            )
        text = response.strip() if isinstance(response, str) else ""
        if text == str(answer):
            scores.append(CORRECT_REWARD)
        elif _INTEGER.fullmatch(text):
            scores.append(FORMAT_REWARD)
        else:
            scores.append(0.0)
    return scores


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write the doubling task's train/eval prompt files.")
    parser.add_argument("out_dir")
    parser.add_argument("--n-train", type=int, default=2048)
    parser.add_argument("--n-eval", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    written = write_prompts(args.out_dir, n_train=args.n_train, n_eval=args.n_eval, seed=args.seed)
    for split, path in written.items():
        print(f"{split}: {path}")
    for row in make_prompts(3, args.seed):
        print(json.dumps(row))
