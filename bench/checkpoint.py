"""What checkpoint cadence costs: seconds per iteration and the checkpoint's share of it for checkpoint.every K = 1,
2, 5, 10, on the CPU quickstart (measured, one run per K) and on the GPU bench (derived from a bench/gpu_ppo.py run).

Share = seconds of the iterations the update spent blocked on checkpoints (`perf/checkpoint_s`: the write itself, or
with checkpoint.background only the copy of the state to host memory) / seconds of the iterations (bench/overhead.py's
span between commits; the first iteration, which starts the workers, left out). K = 1 with background writes off is
the behaviour before checkpoint cadence existed, the baseline row.

CPU: the quickstart config (PPO with a critic, the tiny model, vLLM), --iterations each, evaluation off, one `ppoflow
train` run per K in this process's Prefect harness. GPU: one gpu_ppo.py run measures what a checkpoint blocks (with
--set checkpoint.every=1: every update writes one, in the background, the last one waited for); the share at K is
(blocked seconds per checkpoint / K) / seconds per iteration, since between checkpoints an iteration blocks on none.

Run:  .venv/bin/python bench/checkpoint.py --cpu [--iterations 10]
      .venv/bin/python bench/checkpoint.py --gpu-json $OUT/gpu_ppo.json   (after bench/gpu_ppo.py on the GPU host)
Results: bench/RESULTS.md ("Checkpoint cadence"), bench/results/checkpoint.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KS = (1, 2, 5, 10)


def cpu_runs(iterations: int, root: Path) -> list[dict]:
    """One quickstart run per K (and K=1 with writes in the foreground); per-iteration seconds and blocked share."""
    sys.path[:0] = [str(REPO), str(REPO / "bench")]
    from overhead import iteration_times
    from prefect.testing.utilities import prefect_test_harness

    from flows.ppo import ppo_train
    from stages.config import load_config
    from storage.run import RunStore

    cases = [(1, False), *((k, True) for k in KS)]
    rows = []
    with prefect_test_harness(server_startup_timeout=180):
        for k, background in cases:
            run_id = f"ckpt-k{k}-{'bg' if background else 'fg'}"
            config = load_config(str(REPO / "configs" / "quickstart.yaml"), [
                f"run_id={run_id}", f"iterations={iterations}", "eval.prompts=null", f"storage.root={root}",
                "tracking.logger=none", f"checkpoint.every={k}", f"checkpoint.background={str(background).lower()}"])
            store = RunStore(ppo_train(config=config)["run_uri"])
            spans = [t["span"] for n in range(2, iterations + 1) if (t := iteration_times(store, n)) is not None]
            blocked = [store.stage_marker(n, "update")["metrics"]["perf/checkpoint_s"]
                       for n in range(2, iterations + 1)]
            rows.append({"k": k, "background": background, "iter_s": round(statistics.mean(spans), 3),
                         "share": round(sum(blocked) / sum(spans), 4)})
            print(f"cpu K={k:>2} {'background' if background else 'foreground':>10}: {rows[-1]['iter_s']:.3f} s per "
                  f"iteration, checkpoint share {100 * rows[-1]['share']:.1f}%", flush=True)
    return rows


def gpu_shares(gpu_json: Path) -> list[dict]:
    """Shares at each K from one gpu_ppo.py run that checkpointed every iteration (background, last one waited)."""
    run = json.loads(gpu_json.read_text())
    its = [r for r in run["iterations"] if r.get("iteration_s") and r.get("checkpoint_s") is not None]
    background = [r for r in its if r["iteration"] < run["settings"]["iterations"]]
    last = [r for r in its if r["iteration"] == run["settings"]["iterations"]]
    # An iteration's seconds without its checkpoint: what every non-checkpoint iteration of a run with K > 1 takes.
    bare = statistics.mean(r["iteration_s"] - r["checkpoint_s"] for r in its)
    rows = []
    for label, sample in (("foreground", last), ("background", background)):
        if not sample:
            continue
        blocked = statistics.mean(r["checkpoint_s"] for r in sample)
        for k in KS:
            if label == "foreground" and k != 1:
                continue
            rows.append({"k": k, "background": label == "background", "blocked_s": round(blocked, 3),
                         "iter_s": round(bare + blocked / k, 3), "share": round(blocked / k / (bare + blocked / k), 4),
                         "derived": True})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="measure the quickstart at every K")
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--gpu-json", type=Path, default=None, help="a gpu_ppo.py JSON to derive the GPU shares from")
    p.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "checkpoint.json")
    args = p.parse_args(argv)
    out = json.loads(args.json.read_text()) if args.json.exists() else {}
    if args.cpu:
        rows = cpu_runs(args.iterations, Path(tempfile.mkdtemp(prefix="ppoflow-ckpt-bench-")))
        base = next(r for r in rows if r["k"] == 1 and not r["background"])
        best = min(rows, key=lambda r: r["iter_s"])
        out.update(cpu=rows, cpu_iter_s_k1=base["iter_s"], cpu_iter_s_best=best["iter_s"], cpu_best_k=best["k"])
    if args.gpu_json is not None:
        rows = gpu_shares(args.gpu_json)
        base = next(r for r in rows if r["k"] == 1 and not r["background"])
        ok = [r for r in rows if r["background"] and r["share"] <= 0.05]
        best = min(ok or rows, key=lambda r: r["k"])  # the smallest K (least replay) within the 5% target
        out.update(gpu=rows, gpu_ckpt_share_k1=base["share"], gpu_ckpt_share_best=best["share"], best_k=best["k"])
        for r in rows:
            print(f"gpu K={r['k']:>2} {'background' if r['background'] else 'foreground':>10}: {r['iter_s']:.2f} s "
                  f"per iteration, checkpoint share {100 * r['share']:.1f}% (blocked {r['blocked_s']} s a checkpoint)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
