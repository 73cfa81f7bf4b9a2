"""Scaling sweep (issue 10, item 5): iteration time as the batch and the response length grow, and where it goes.

For each point of the grid (prompts per iteration x max new tokens; 8 samples per prompt) one `ppoflow train`
process runs the quickstart config (PPO with GAE and a critic, the tiny model) for --iterations iterations with no
evaluation; per iteration, from the commit markers (bench/overhead.py): each stage's seconds, the orchestration
overhead (span between commits minus the stages) and its share. The first iteration (warm-up) is left out of the
means. Random-ish responses run to the length limit only when the policy is bad: the response length column is the
mean actually sampled, and the length limit bounds it.

Run:  .venv/bin/python bench/scaling.py [--prompts 16 32 64 128] [--max-new-tokens 8 32] [--iterations 3]
          [--backend vllm|hf] [--set key=value ...]
Results: bench/RESULTS.md ("Scaling").
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("generate", "score", "advantages", "update", "sync")


def run_point(root: str, prompts: int, new_tokens: int, args) -> dict:
    from overhead import iteration_times

    from stages.common import iteration_summary
    from storage.run import RunStore, run_uri

    run_id = f"p{prompts}-t{new_tokens}"
    sets = [f"iterations={args.iterations}", "eval.prompts=null", f"storage.root={root}",
            f"generation.backend={args.backend}", f"data.prompts_per_iteration={prompts}",
            f"generation.max_new_tokens={new_tokens}", f"generation.max_model_len={64 + new_tokens}",
            # 4 optimizer steps per iteration at every batch size, as in the quickstart
            f"policy.mini_batch_size={prompts * 2}", f"critic.mini_batch_size={prompts * 2}",
            f"policy.micro_batch_size={min(prompts * 2, 64)}", f"critic.micro_batch_size={min(prompts * 2, 64)}",
            *args.set]
    t0 = time.perf_counter()
    proc = subprocess.run([str(REPO / ".venv/bin/ppoflow"), "train", "--config", "configs/quickstart.yaml",
                           "--run-id", run_id, *(a for s in sets for a in ("--set", s))], cwd=REPO,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{run_id} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    store = RunStore(run_uri(root, run_id))
    times = [t for n in range(2, args.iterations + 1) if (t := iteration_times(store, n)) is not None]
    mean = {k: sum(t[k] for t in times) / len(times) for k in ("span", "stages", *STAGES)}
    resp = [iteration_summary(store, n).get("rollout/response_len") for n in range(2, args.iterations + 1)]
    return {"prompts": prompts, "samples": prompts * 8, "new_tokens": new_tokens, "resp_len": sum(resp) / len(resp),
            **mean, "overhead": mean["span"] - mean["stages"], "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--max-new-tokens", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--backend", default="vllm", choices=["vllm", "hf"])
    parser.add_argument("--set", action="append", default=[], help="extra config override (repeatable)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    rows = []
    with tempfile.TemporaryDirectory(prefix="scaling-") as root:
        for new_tokens in args.max_new_tokens:
            for prompts in args.prompts:
                rows.append(run_point(root, prompts, new_tokens, args))
                r = rows[-1]
                print(f"done p={prompts} t={new_tokens}: {r['span']:.2f} s/iteration", flush=True)
    head = ["samples", "max_new", "resp_len", "s/iter", *(f"{s[:5]}_s" for s in STAGES), "ovh_s", "ovh_%",
            "samples/s"]
    print("\n" + " ".join(f"{h:>9}" for h in head))
    for r in rows:
        cells = [f"{r['samples']:>9d}", f"{r['new_tokens']:>9d}", f"{r['resp_len']:>9.1f}", f"{r['span']:>9.2f}",
                 *(f"{r[s]:>9.2f}" for s in STAGES), f"{r['overhead']:>9.2f}",
                 f"{100 * r['overhead'] / r['span']:>9.1f}", f"{r['samples'] / r['span']:>9.0f}"]
        print(" ".join(cells))


if __name__ == "__main__":
    main()
