"""Multiplying two 4-digit numbers with a `calc` tool: the multi-turn task of the CPU tool-use benchmark.

A prompt asks "What is 4821*7356?" and the answer is the decimal product, "35463276". No 1.1M-parameter model
multiplies 4-digit numbers in its head; with the tool (ppoflow/envs/tools.py, `rollout.env:
ppoflow.envs.tools:ToolEnv`) an episode needs two copies, which a small model can learn:

    user       What is 4821*7356?
    assistant  <calc>4821*7356</calc>          (copies the question)
    tool       35463276                        (environment tokens: holes in the response)
    assistant  35463276                        (copies the tool's answer: the episode's response)

Both factors are drawn from 3163..9999, so every product has 8 digits (3163² = 10,004,569): the answer always sits at
the same offset from the tool's output, which keeps the copy easy for a 4-layer model. The SFT of
`ppoflow.tiny_model.make_tiny_model(..., tools=True)` shows the tool episode on part of its examples and a direct
answer on the rest, so the starting policy calls the tool some of the time; RL can learn to call it always.

Reward (referenced as `ppoflow.tasks.calc:reward`), on the episode's last policy turn: 1.0 for exactly the product,
0.1 for a bare integer that is not, 0.0 for anything else (a tool call left unanswered included):
`ppoflow.tasks.arith`'s rule.

Run alone (writes train.jsonl and eval.jsonl, disjoint):
  python -m ppoflow.tasks.calc data/calc --n-train 2048 --n-eval 256 --seed 0
"""

from __future__ import annotations

import argparse
import random

from ppoflow.tasks import arith

LOW, HIGH = 3163, 9999
"""Both factors are drawn from LOW..HIGH: every product then has 8 digits."""


def make_prompts(n: int, seed: int) -> list[dict]:
    """`n` distinct questions `{"prompt": "What is a*b?", "answer": str(a * b)}`, the same for the same `seed`."""
    rng, seen, rows = random.Random(seed), set(), []
    while len(rows) < n:
        a, b = rng.randint(LOW, HIGH), rng.randint(LOW, HIGH)
        if (a, b) not in seen:
            seen.add((a, b))
            rows.append({"prompt": f"What is {a}*{b}?", "answer": str(a * b)})
    return rows


def tool_call(row: dict) -> str:
    """The first policy turn of a tool episode for `row`: the question's product as a `calc` call."""
    return f"<calc>{row['prompt'].removeprefix('What is ').removesuffix('?')}</calc>"


def write_prompts(out_dir: str, *, n_train: int = 2048, n_eval: int = 256, seed: int = 0) -> dict[str, str]:
    """Write `train.jsonl` and `eval.jsonl` into `out_dir` (one draw, so no question is in both)."""
    return arith.write_splits(out_dir, make_prompts(n_train + n_eval, seed), n_train)


def reward(prompts: list[str], responses: list[str], metadata: list[dict],
           labels: list | None = None) -> list[float]:
    """`ppoflow.tasks.arith.reward`'s rule on the episode's answer (its last policy turn, the `response` column)."""
    return arith.reward(prompts, responses, metadata, labels)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write the 4-digit multiplication task's train/eval prompt files.")
    parser.add_argument("out_dir")
    parser.add_argument("--n-train", type=int, default=2048)
    parser.add_argument("--n-eval", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for split, path in write_prompts(args.out_dir, n_train=args.n_train, n_eval=args.n_eval, seed=args.seed).items():
        print(f"{split}: {path}")
