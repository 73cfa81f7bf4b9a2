"""Two-number addition: the synthetic, verifiable task of the CPU quickstart.

A prompt asks "What is 23+45?" and the answer is the decimal sum, "68". Both operands are drawn from 0..99, so there are
10,000 distinct questions with sums up to 198. With the chat template of `ppoflow.tiny_model` a templated prompt is
about 20 tokens and an answer 1-3 digit tokens plus `<|im_end|>`, so rollouts are short and cheap. Two-digit carries
make the task hard enough that a one-minute SFT of the tiny model only partly solves it, which leaves RL room to improve.

Rows are `{"prompt": "What is 23+45?", "answer": "68"}`; `prompt` is the raw user message (the chat template is
applied by whoever generates) and every other column reaches `reward` as that row's `metadata`.

Reward, a rule in [0, 1] (referenced from configs as `ppoflow.tasks.arith:reward`):
  1.0  the response, with surrounding whitespace stripped, is exactly the sum ("68");
  0.1  it is a bare ASCII integer but the wrong one ("67", "068"): the right format, the wrong value;
  0.0  anything else: empty, extra words, garbage, or an answer that runs on instead of stopping at `<|im_end|>`.
The small format credit separates "almost an answer" from garbage so that a policy that drifts away from the format
still gets a gradient back to it; it is too small to be worth more than a correct sum.

Run alone (writes train.jsonl and eval.jsonl, disjoint, and prints a few rows):
  python -m ppoflow.tasks.arith data/arith --n-train 2048 --n-eval 256 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

MAX_OPERAND = 99
"""Operands are drawn uniformly from 0..MAX_OPERAND (both ends included)."""

N_QUESTIONS = (MAX_OPERAND + 1) ** 2
"""How many distinct questions exist; `make_prompts` samples without replacement from them."""

CORRECT_REWARD = 1.0
FORMAT_REWARD = 0.1

_INTEGER = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() would also accept "²" or Arabic-Indic digits


def make_prompts(n: int, seed: int) -> list[dict]:
    """`n` distinct addition questions, `{"prompt": "What is a+b?", "answer": "a+b as decimal"}`, fixed by `seed`."""
    if not 0 <= n <= N_QUESTIONS:
        raise ValueError(f"make_prompts: n={n} must be between 0 and {N_QUESTIONS} (the number of distinct questions)")
    rng = random.Random(seed)
    rows = []
    for code in rng.sample(range(N_QUESTIONS), n):
        a, b = divmod(code, MAX_OPERAND + 1)
        rows.append({"prompt": f"What is {a}+{b}?", "answer": str(a + b)})
    return rows


def write_prompts(out_dir: str, *, n_train: int = 2048, n_eval: int = 256, seed: int = 0) -> dict[str, str]:
    """Write `train.jsonl` and `eval.jsonl` (one row per line) into `out_dir`; no question is in both.

    Both splits come from one draw without replacement, so they are disjoint by construction.
    Returns `{"train": path, "eval": path}`.
    """
    rows = make_prompts(n_train + n_eval, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, split_rows in (("train", rows[:n_train]), ("eval", rows[n_train:])):
        path = out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in split_rows))
        paths[split] = str(path)
    return paths


def reward(prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
    """Score each decoded response against `metadata[i]["answer"]`; see the module docstring for the rule."""
    if not len(prompts) == len(responses) == len(metadata):
        raise ValueError(
            f"arith.reward: got {len(prompts)} prompts, {len(responses)} responses and {len(metadata)} metadata rows; "
            "they must be aligned one to one"
        )
    scores = []
    for i, (response, meta) in enumerate(zip(responses, metadata)):
        if "answer" not in meta:
            raise KeyError(
                f"arith.reward: metadata row {i} has no 'answer' (columns: {sorted(meta)}); "
                "the prompt file must come from ppoflow.tasks.arith.write_prompts"
            )
        text = response.strip() if isinstance(response, str) else ""
        if text == str(meta["answer"]):
            scores.append(CORRECT_REWARD)
        elif _INTEGER.fullmatch(text):
            scores.append(FORMAT_REWARD)
        else:
            scores.append(0.0)
    return scores


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write the addition task's train/eval prompt files.")
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
