"""Where an iteration's time goes, read back from a committed run: stage compute, orchestration overhead, Parquet.

For each iteration n of the run (from its commit markers):
  span      wall time from the last commit of iteration n-1 (its sync, or its evaluation) to the last of n;
  stages    the stages' own seconds as their markers record them (generate, score, advantages, update, sync and the
            evaluation when one ran), measured from stage start up to, not including, the Parquet write and marker;
  overhead  span - stages: Prefect task and flow-run bookkeeping, the report task (artifacts and tracker), lock
            heartbeats and the Parquet writes and reads themselves; split into
    between   from the last commit of n-1 to the start of n's generate (generate's commit minus its seconds): the report
              of n-1, the end of its subflow and the start of n's, the generate task's start;
    within    the rest: the task transitions between the stages of n and their commits.
Then the Parquet cost on the same data: every stage table of the run is read back through `storage/` and written
again through `RunStore.write_stage` into a temporary run (what a stage commit does) and, for comparison, with plain
`pyarrow.parquet` into a temporary file; per iteration, persistence = the five stage writes + the three reads the next
stages make (score reads generate, advantages reads score, update reads advantages).

Run:  .venv/bin/python bench/overhead.py RUN_DIR [--skip 1]     (e.g. runs/my-run)
Results: bench/RESULTS.md ("Orchestration overhead and Parquet persistence").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("generate", "score", "advantages", "update", "sync")
READ_BY_NEXT = ("generate", "score", "advantages")


def _at(marker: dict) -> float:
    return datetime.fromisoformat(marker["committed_at"]).timestamp()


def iteration_times(store, n: int) -> dict | None:
    markers = {s: store.stage_marker(n, s) for s in (*STAGES, "eval")}
    before = [m for m in (store.stage_marker(n - 1, s) for s in (*STAGES, "eval")) if m is not None]
    if any(markers[s] is None for s in STAGES) or not before:
        return None
    last = max(_at(m) for m in before)
    span = max(_at(m) for m in markers.values() if m) - last
    between = _at(markers["generate"]) - markers["generate"]["seconds"] - last
    stage_s = {s: m["seconds"] for s, m in markers.items() if m is not None}
    return {"iteration": n, "span": span, "stages": sum(stage_s.values()), "between": between, **stage_s}


def parquet_costs(store, n: int, scratch) -> dict:
    import pyarrow.parquet as pq

    from storage.schema import SCHEMAS

    out = {"ours_write": 0.0, "ours_read": 0.0, "plain_write": 0.0, "plain_read": 0.0, "bytes": 0, "rows": 0}
    for stage in STAGES:
        marker = store.stage_marker(n, stage)
        t0 = time.perf_counter()
        table = store.read_stage(n, stage)
        read_s = time.perf_counter() - t0
        if stage in READ_BY_NEXT:
            out["ours_read"] += read_s
        t0 = time.perf_counter()
        scratch.write_stage(n, stage, table, marker["schema"], SCHEMAS[marker["schema"]])
        out["ours_write"] += time.perf_counter() - t0
        path = Path(scratch.path) / f"plain-{n}-{stage}.parquet"
        t0 = time.perf_counter()
        pq.write_table(table, path)
        out["plain_write"] += time.perf_counter() - t0
        if stage in READ_BY_NEXT:
            t0 = time.perf_counter()
            pq.read_table(path)
            out["plain_read"] += time.perf_counter() - t0
        out["bytes"] += sum(f["bytes"] for f in marker["files"])
        out["rows"] += marker["rows"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a run folder or URI ({root}/{run_id})")
    p.add_argument("--skip", type=int, default=1, help="leading iterations left out of the means (warm-up)")
    args = p.parse_args(argv)

    from storage.run import RunStore, run_uri

    store = RunStore(args.run)
    rows = [r for n in store.iterations() if n > 0 and (r := iteration_times(store, n)) is not None]
    with tempfile.TemporaryDirectory() as tmp:
        scratch = RunStore(run_uri(tmp, "scratch"))
        for r in rows:
            r.update(parquet_costs(store, r["iteration"], scratch))

    print(f"{'iter':>4} {'span_s':>7} {'stages_s':>8} {'overhead_s':>10} {'ovh_%':>6} {'between_s':>9} "
          f"{'parquet_s':>9} {'pq_%':>5}  " + " ".join(f"{s[:5]:>6}" for s in (*STAGES, "eval")))
    for r in rows:
        pq_s = r["ours_write"] + r["ours_read"]
        print(f"{r['iteration']:>4} {r['span']:7.2f} {r['stages']:8.2f} {r['span'] - r['stages']:10.2f} "
              f"{100 * (r['span'] - r['stages']) / r['span']:6.1f} {r['between']:9.2f} {pq_s:9.3f} "
              f"{100 * pq_s / r['span']:5.2f}  " + " ".join(f"{r.get(s, 0.0):6.2f}" for s in (*STAGES, "eval")))
    kept = rows[args.skip:]
    span, stages = sum(r["span"] for r in kept), sum(r["stages"] for r in kept)
    between = sum(r["between"] for r in kept)
    ours = sum(r["ours_write"] + r["ours_read"] for r in kept)
    mb, nrows = sum(r["bytes"] for r in kept) / 1e6, sum(r["rows"] for r in kept)
    k = len(kept)
    print(f"\n{k} iterations (first {args.skip} left out): mean span {span / k:.2f} s, stages {stages / k:.2f} s, "
          f"overhead {(span - stages) / k:.2f} s = {100 * (span - stages) / span:.1f}% of the iteration (between "
          f"iterations {between / k:.2f} s, within {(span - stages - between) / k:.2f} s); Parquet persistence "
          f"{ours / k:.3f} s = {100 * ours / span:.2f}%")
    w, pw = sum(r["ours_write"] for r in kept), sum(r["plain_write"] for r in kept)
    rd, prd = sum(r["ours_read"] for r in kept), sum(r["plain_read"] for r in kept)
    read_mb = sum(sum(f["bytes"] for f in store.stage_marker(r["iteration"], s)["files"])
                  for r in kept for s in READ_BY_NEXT) / 1e6
    print(f"Parquet through storage/: write {mb / w:.1f} MB/s, {nrows / w:.0f} rows/s; read {read_mb / rd:.1f} MB/s"
          f"  |  plain pyarrow: write {mb / pw:.1f} MB/s, read {read_mb / prd:.1f} MB/s"
          f"  ({mb:.1f} MB, {nrows} rows written)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
