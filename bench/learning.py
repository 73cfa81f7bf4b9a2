"""Learning benchmark: does the quickstart raise the held-out evaluation pass rate, over several seeds?

Runs `ppoflow train` once per (variant, seed) as its own process (each with its own local Ray and Prefect), at most
--parallel at a time, then reads every run's committed eval markers and prints one row per run: the greedy
`eval/pass_rate` before training (iteration 0) and after every eval.every-th iteration, the gain of the last
evaluation over the first, and the wall time of the whole process (worker start-up included).

A variant is a name and a list of `--set` overrides; `--variant name:key=value,key=value` adds one (repeatable);
without any, the quickstart runs as shipped. `--set` applies to every run.

Run (repo root, after `make setup`):
    .venv/bin/python bench/learning.py --seeds 0 1 2
    .venv/bin/python bench/learning.py --seeds 0 --parallel 2 --variant lr2e-4:policy.lr=2e-4 --variant base:
Results: bench/RESULTS.md ("Learning on the CPU quickstart task").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variant", action="append", default=[], help="name:key=value,key=value (repeatable)")
    p.add_argument("--set", action="append", default=[], help="override for every run (repeatable)")
    p.add_argument("--root", default="runs/bench-learning", help="storage root of the runs")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time")
    p.add_argument("--json", default=None, help="also write the rows here")
    return p.parse_args(argv)


def variants(specs: list[str]) -> list[tuple[str, list[str]]]:
    out = []
    for spec in specs or ["quickstart:"]:
        name, _, sets = spec.partition(":")
        out.append((name, [s for s in sets.split(",") if s]))
    return out


def train(config: str, run_id: str, sets: list[str], log: Path) -> float:
    cmd = [sys.executable, "-m", "ppoflow.cli", "train", "--config", config, "--run-id", run_id]
    for s in sets:
        cmd += ["--set", s]
    # Each run gets its own Prefect home: parallel runs sharing one SQLite database lock each other out.
    env = {**os.environ, "PREFECT_HOME": str(log.with_suffix(".prefect"))}
    started = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if rc != 0:
        print(f"{run_id}: exit {rc}, see {log}", file=sys.stderr)
    return time.perf_counter() - started


def evals(root: str, run_id: str) -> dict[int, float]:
    from storage.run import RunStore, run_uri

    store = RunStore(run_uri(root, run_id))
    out = {}
    for n in [0, *store.iterations()]:
        marker = store.stage_marker(n, "eval")
        if marker is not None:
            out[n] = marker["metrics"]["eval/pass_rate"]
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    root = str(Path(args.root).resolve())
    Path(root).mkdir(parents=True, exist_ok=True)
    jobs = [(name, seed, [*args.set, *sets, f"seed={seed}", f"storage.root={root}"])
            for name, sets in variants(args.variant) for seed in args.seeds]
    stamp = time.strftime("%Y%m%d-%H%M%S")

    def run(job):
        name, seed, sets = job
        run_id = f"{name}-s{seed}-{stamp}"
        wall = train(args.config, run_id, sets, Path(root) / f"{run_id}.log")
        row = {"variant": name, "seed": seed, "run_id": run_id, "wall_s": round(wall, 1),
               "eval": evals(root, run_id)}
        print(f"done: {json.dumps(row)}", flush=True)  # a run at a time, in case the whole sweep is cut short
        return row

    with ThreadPoolExecutor(args.parallel) as pool:
        rows = list(pool.map(run, jobs))

    points = sorted({n for r in rows for n in r["eval"]})
    print(f"{'variant':>16} {'seed':>4} " + " ".join(f"{'it' + str(n):>6}" for n in points)
          + f" {'gain':>7} {'wall_s':>7}")
    for r in rows:
        ev = r["eval"]
        gain = ev[max(ev)] - ev[0] if 0 in ev and len(ev) > 1 else float("nan")
        print(f"{r['variant']:>16} {r['seed']:>4} " + " ".join(f"{ev[n]:6.3f}" if n in ev else f"{'-':>6}"
                                                               for n in points) + f" {gain:+7.3f} {r['wall_s']:7.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)
    sys.exit(main())
