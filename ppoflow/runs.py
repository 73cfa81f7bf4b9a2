"""Watch and inspect runs from what they committed to storage: list the runs, show one run's iterations (and plot its
reward and KL curves), print sample rollouts of an iteration.

    ppoflow runs list [--root ROOT]
    ppoflow runs show RUN [--root ROOT]                   iteration table; writes {run}/plots/curves.png
    ppoflow rollouts RUN --iter N [--k 5] [--order best|worst|random|all] [--seed 0] [--root ROOT]
    ppoflow lineage show NAME [--root ROOT]               runs of a retraining lineage, gate scores, what serves

ROOT is the `storage.root` the runs were trained with (default `runs`; any fsspec URI, credentials from the
environment). Everything is read through storage.run.RunStore — commit markers, the run manifest, committed Parquet —
so a half-written stage is never shown, and the commands are safe to run while the run trains. The only write is the
plot, beside the run. Tests: tests/test_runs_cli.py
"""

import json
import os
import random

from rich import box
from rich.console import Console
from rich.table import Table

from stages.common import iteration_summary
from stages.curves import curves_png
from storage.run import RunStore, find_run, run_uri

ITERATION_COLUMNS = [  # (header, metric of iteration_summary, format)
    ("iter", "iteration", "{}"),
    ("reward", "rollout/reward_mean", "{:.3f}"),
    ("kl", "rollout/kl", "{:.4f}"),
    ("eval_pass", "eval/pass_rate", "{:.3f}"),  # iteration 0: the starting policy
    ("pg_loss", "ppo/policy_loss", "{:.4f}"),
    ("approx_kl", "ppo/approx_kl", "{:.5f}"),
    ("clipfrac", "ppo/clipfrac", "{:.3f}"),
    ("v_loss", "critic/value_loss", "{:.4f}"),
    ("resp_len", "rollout/response_len", "{:.1f}"),
    ("gen_s", "time/generate_s", "{:.1f}"),
    ("score_s", "time/score_s", "{:.1f}"),
    ("adv_s", "time/advantages_s", "{:.2f}"),
    ("upd_s", "time/update_s", "{:.1f}"),
    ("sync_s", "time/sync_s", "{:.2f}"),
]


class RunNotFound(LookupError):
    """The run, or the iteration asked for, is not in storage (the message says what is)."""


def _console() -> Console:
    # Prompts and responses are model text: "[b]" in them must print as is, not as rich markup.
    console = Console(markup=False, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 200  # piped into a file or grep: don't fold every table into rich's default 80 columns
    return console


def _root(root: str | None) -> str:
    from storage.config import StorageConfig

    return root or StorageConfig().root


def _open(run_id: str, root: str | None) -> RunStore:
    root = _root(root)
    store = RunStore(find_run(root, run_id)[0])
    if store.read_manifest() is None and not store.iterations():
        known = ", ".join(s.run_id for s in RunStore.list_runs(root)) or "none"
        raise RunNotFound(f"no run {run_id!r} under {root} (runs there: {known}); pass --root to look elsewhere")
    return store


def _status(store: RunStore) -> dict:
    """What `runs list` and `runs show` say about a run: manifest facts, committed iterations and its state."""
    from storage.lock import RunLock

    manifest = store.read_manifest() or {}
    config = manifest.get("config", {})
    synced = [n for n in store.iterations() if store.stage_marker(n, "sync") is not None]
    target = config.get("iterations")
    lock = RunLock(store.uri)
    holder = lock.read()
    if holder is not None and not lock.is_stale(holder):
        state = "in progress"
    elif target is not None and len(synced) >= target:
        state = "complete"
    else:
        state = "stopped"
    return {"created": manifest.get("created_at"), "estimator": config.get("algo", {}).get("estimator"),
            "synced": synced, "target": target, "state": state}


def list_runs(root: str | None = None) -> int:
    """One row per run under `root` (`{root}/{run_id}`, and `{root}/runs/{run_id}` of the old layout), oldest
    first."""
    root = _root(root)
    console = _console()
    runs = [(store, _status(store)) for store in RunStore.list_runs(root)]
    if not runs:
        console.print(f"no runs under {root}")
        return 0
    runs.sort(key=lambda r: (r[1]["created"] or "", r[0].run_id))  # ISO UTC timestamps sort as text
    # Titles and captions are printed as lines of their own: rich would wrap them to the table's width.
    console.print(f"runs under {root}")
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("run", no_wrap=True)
    table.add_column("created (UTC)", no_wrap=True)
    table.add_column("estimator")
    table.add_column("iterations", justify="right")
    table.add_column("last reward", justify="right")
    table.add_column("state", no_wrap=True)
    for store, st in runs:
        last = iteration_summary(store, st["synced"][-1]).get("rollout/reward_mean") if st["synced"] else None
        table.add_row(store.run_id, (st["created"] or "-")[:19].replace("T", " "), st["estimator"] or "-",
                      f"{len(st['synced'])}/{st['target'] if st['target'] is not None else '?'}",
                      f"{last:.3f}" if last is not None else "-", st["state"])
    console.print(table)
    return 0


def show_run(run_id: str, root: str | None = None) -> int:
    """The run's iteration table from the commit markers, and its reward / KL curves as `{run}/plots/curves.png`."""
    store = _open(run_id, root)
    console = _console()
    st = _status(store)
    rows = [iteration_summary(store, n) for n in store.iterations()]
    console.print(f"run {store.run_id}  ({store.uri})")
    table = Table(box=box.SIMPLE_HEAD)
    for header, _, _ in ITERATION_COLUMNS:
        table.add_column(header, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(*(fmt.format(row[key]) if row.get(key) is not None else "-" for _, key, fmt in ITERATION_COLUMNS))
    partial = [f"iteration {r['iteration']}: {', '.join(store.committed_stages(r['iteration'])) or 'nothing'}"
               for r in rows if r["iteration"] not in st["synced"] and r["iteration"] > 0]
    console.print(table)
    console.print(f"{st['estimator'] or '?'} · {len(st['synced'])}/{st['target'] or '?'} iterations committed · "
                  f"{st['state']}" + (f" · partly committed: {'; '.join(partial)}" if partial else ""))

    png = curves_png(rows, f"run {store.run_id}")
    if png is None:
        console.print("no scored iteration yet: nothing to plot")
        return 0
    console.print(f"curves: {store.write_file('plots/curves.png', png)}")
    return 0


def _turn_line(turn: dict) -> str:
    """`assistant: <calc>2*3</calc>`, `tool [calc]: 6`, `tool [python] (error): ...`."""
    observed = turn["tool"] if turn["tool"] and turn["role"] != "assistant" else None
    return (f"{turn['role']}{f' [{observed}]' if observed else ''}{' (error)' if turn['error'] else ''}: "
            f"{turn['text']}")


def show_rollouts(run_id: str, iteration: int, k: int = 5, order: str = "random", seed: int = 0,
                  root: str | None = None) -> int:
    """k samples of one iteration from its experience table (the scored table when advantages isn't committed); a
    multi-turn episode's response shown turn by turn."""
    store = _open(run_id, root)
    committed = store.committed_stages(iteration)
    stage = next((s for s in ("advantages", "score") if s in committed), None)
    if stage is None:
        scored = [n for n in store.iterations() if store.stage_marker(n, "score") is not None]
        raise RunNotFound(
            f"run {store.run_id} has no scored samples for iteration {iteration} (committed there: "
            f"{', '.join(committed) or 'nothing'}); iterations with samples: {', '.join(map(str, scored)) or 'none'}")
    import pyarrow.compute as pc

    table = store.read_stage(iteration, stage)
    n = table.num_rows
    if order == "all":
        idx = list(range(n))
    elif order == "random":
        idx = random.Random(seed).sample(range(n), min(k, n))
    else:  # sort_indices is stable: equal rewards keep their stored order
        idx = pc.sort_indices(table, [("reward", "descending" if order == "best" else "ascending")])[:k].to_pylist()
    columns = ["sample_id", "prompt", "response", "reward", "response_ids", "finish_reason"]
    columns += [c for c in ("turns", "advantages") if c in table.column_names]  # turns: multi-turn runs only
    picked = table.take(idx).select(columns).to_pylist()

    console = _console()
    console.print(f"run {store.run_id} · iteration {iteration} · {order} {len(picked)} of {n} samples "
                  f"({stage} stage)")
    out = Table(box=box.SIMPLE_HEAD, show_lines=True)
    out.add_column("sample", no_wrap=True)
    out.add_column("prompt")
    out.add_column("response")
    out.add_column("reward", justify="right", no_wrap=True)
    out.add_column("adv", justify="right", no_wrap=True)
    out.add_column("len", justify="right", no_wrap=True)
    out.add_column("finish", no_wrap=True)
    for r in picked:
        adv = r.get("advantages")
        prompt = r["prompt"]
        if prompt.startswith("[{"):  # a chat-message prompt, stored as its JSON: one `role: content` line per turn
            try:
                prompt = "\n".join(f"{m['role']}: {m['content']}" for m in json.loads(prompt))
            except (ValueError, KeyError, TypeError):
                pass
        response = r["response"]
        if r.get("turns"):  # a multi-turn episode: one `role: text` line (or block) per turn
            response = "\n".join(_turn_line(t) for t in r["turns"])
        out.add_row(r["sample_id"], prompt, response, f"{r['reward']:.3f}",
                    f"{sum(adv) / len(adv):+.3f}" if adv else "-", str(len(r["response_ids"])), r["finish_reason"])
    console.print(out)
    rewards = table.column("reward")
    console.print((f"iteration reward: mean {pc.mean(rewards).as_py():.3f}, min {pc.min(rewards).as_py():.3f}, "
                    f"max {pc.max(rewards).as_py():.3f}" if n else "the iteration committed no samples")
                   + (" · adv = mean advantage over the response tokens" if stage == "advantages"
                      else " · advantages not committed"))
    return 0


def show_lineage(name: str, root: str | None = None) -> int:
    """The runs of retraining lineage `name` (storage/lineage.py), oldest first: status, parent, the gate's scores
    (candidate vs the policy promoted when it was gated) and verdict, where its weights are; then what serves: the
    promoted run and a path a serving stack loads (an HF folder, or the base model plus a LoRA adapter)."""
    from storage.lineage import LineageStore

    root = _root(root)
    lineage = LineageStore(root, name)
    records = lineage.records()
    if not records:
        raise RunNotFound(f"no lineage {name!r} under {root} (no {lineage.uri}/*.json); pass --root to look elsewhere")
    console = _console()
    promoted = lineage.promoted()
    console.print(f"lineage {name} under {root}")
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("run", "status", "parent", "files", "gate", "candidate", "vs promoted", "promotion"):
        table.add_column(column, no_wrap=True)
    table.add_column("weights (under the root)", overflow="fold")
    under = run_uri(root, "")  # `{root}/`, absolute for a local root, as the records hold it
    for r in records:
        g = r.get("gate") or {}
        verdict = r.get("promotion", "promoted" if r["status"] == "complete" else None) or "-"
        if promoted is not None and r["run_id"] == promoted["run_id"]:
            verdict += " (serving)"
        table.add_row(r["run_id"], r["status"], r["parent"] or "base", str(len(r["prompt_files"])),
                      g.get("metric", "-"), f"{g['candidate']:.3f}" if g else "-",
                      f"{g['promoted']:.3f} ({g['promoted_run'] or 'base'})" if g else "-", verdict,
                      (r.get("final_policy") or "-").removeprefix(under))
    console.print(table)
    serving = lineage.serving()
    if promoted is None:
        console.print("serving: the base model (no run promoted yet)")
    elif serving is not None and serving["run_id"] == promoted["run_id"]:
        adapter = (f"; or base {serving['base_model']} + LoRA adapter {serving['adapter']}"
                   if serving.get("adapter") else "")
        console.print(f"serving: {serving['run_id']} (promoted {serving['promoted_at'][:19].replace('T', ' ')} UTC): "
                      f"HF folder {serving['weights']}{adapter}")
    else:  # promoted before the serving pointer existed
        console.print(f"serving: {promoted['run_id']}: HF folder {promoted['final_policy']}")
    rejected = [r["run_id"] for r in records if r.get("promotion") == "rejected"]
    if rejected:
        console.print(f"rejected (kept, never a parent): {', '.join(rejected)}")
    return 0
