"""Report stage: what operators see after each iteration — four artifacts on the flow run's page in the Prefect UI,
the iteration's metrics in the experiment tracker (stages/tracking.py) — all read back from the committed markers and
Parquet, so a resumed run reports the same.

    {run}-iterations  table: one row per committed iteration — reward, KL, eval pass rate, losses, seconds of every
                      stage; row 0 is the starting policy's evaluation
    {run}-rollouts    table: the highest- and lowest-reward samples of the latest iteration
    {run}-overview    markdown: the reward / KL / eval pass-rate curves (a PNG inside the markdown as a data: URI,
                      which Prefect's UI renders) and where the run's storage and tracking live
    {run}-progress    progress: committed iterations out of `iterations`

A flow run creates each artifact at its first report and updates it in place at the next ones: Prefect lists every
artifact a flow run created, and a version per iteration would bury the latest under thirty others. The next flow run
of the run (a resume) adds a version of each key. The curves are redrawn every `eval.every` iterations (where the pass
rate gains a point), at the last iteration and at a flow run's first report: drawing is the report's costliest part,
and it competes with the next iteration for the CPU. The modules a report imports (matplotlib, the tracker's) are
imported by `prewarm` while the actors start, not by the first report beside iteration 2. An artifact that would be
missing or empty fails the report (ReportError), naming it.

The table's rows stay in the run's context (stages/context.py) from one report to the next: each iteration's markers
are read once, when it is reported (a process's first report reads every earlier committed iteration), rather than
every marker of the run at every report. close_run drops them with the run's tracker, so each flow run starts again
from storage.
Run alone: see flows/ppo.py (it needs a Prefect API). Tests: tests/stages/test_report.py,
tests/flows/test_deployment.py (the artifacts in the UI, in a browser)
"""

import base64
import importlib
import json
import math
import re
import threading

from prefect import task
from prefect.cache_policies import NO_CACHE

from stages.common import iteration_summary, logger, store_of
from stages.context import run_context

COLUMNS = {  # artifact column → metric of iteration_summary; the UI shows them in this order, the first ones in view
    "reward": "rollout/reward_mean", "kl": "rollout/kl", "eval_pass_rate": "eval/pass_rate",
    "generate_s": "time/generate_s", "score_s": "time/score_s", "advantages_s": "time/advantages_s",
    "update_s": "time/update_s", "sync_s": "time/sync_s", "eval_s": "time/eval_s",
    "reward_std": "rollout/reward_std", "eval_reward": "eval/reward_mean", "response_len": "rollout/response_len",
    "policy_loss": "ppo/policy_loss", "value_loss": "critic/value_loss", "grad_norm": "ppo/grad_norm",
}
ARTIFACTS = ("iterations", "rollouts", "overview", "progress")
"""Artifact names: the keys are `{run}-{name}`."""


class ReportError(RuntimeError):
    """An artifact of the report would be missing or empty (a bug in the report, not in the run)."""


def _table_row(summary: dict) -> dict:
    # Every row holds every column (None where the iteration has no such metric): the UI takes its columns from them.
    return {"iteration": summary["iteration"], **{
        c: round(v, 4) if isinstance(v := summary.get(m), (int, float)) and math.isfinite(v) else None
        for c, m in COLUMNS.items()}}


def _short(text: str, limit: int = 160) -> str:
    text = text.replace("\n", "⏎")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def build_artifacts(config, store, iteration: int, table: list[dict], tracking: str, draw: bool,
                    samples: int = 8) -> dict[str, dict]:
    """The report's artifacts for `iteration`, by name: `{"type", "data", "description"}` as Prefect's API takes them
    (a table is JSON text). `table` holds the iterations table's rows up to `iteration`; `tracking` says where the
    metrics go; `draw`: whether to draw the curves (else no overview: the flow run's last one stays)."""
    run = store.run_id
    out = {"iterations": {"type": "table", "data": json.dumps(table),
                          "description": f"run {run}: one row per committed iteration (0: the starting policy's "
                                         f"evaluation); seconds per stage"}}

    exp = store.read_stage(iteration, "advantages").select(
        ["sample_id", "prompt", "response", "reward", "advantages", "finish_reason"]).to_pylist()
    ranked = sorted(exp, key=lambda r: -r["reward"])  # stable: equal rewards keep their stored order
    n_best = min(samples - samples // 2, -(-len(ranked) // 2))
    n_worst = min(samples // 2, len(ranked) - n_best)
    picked = [("best", r) for r in ranked[:n_best]] + [("worst", r) for r in ranked[::-1][:n_worst]]
    out["rollouts"] = {"type": "table", "data": json.dumps([{
        "which": which, "reward": round(r["reward"], 4), "prompt": _short(r["prompt"]),
        "response": _short(r["response"]),
        "advantage": round(sum(r["advantages"]) / max(len(r["advantages"]), 1), 4), "finish": r["finish_reason"],
        "sample": r["sample_id"]} for which, r in picked]),
        "description": f"run {run} iteration {iteration}: its {n_best} highest- and {n_worst} lowest-reward samples "
                       f"of {len(exp)} (`ppoflow rollouts {run} --iter {iteration}` for more)"}

    if draw:
        from stages.curves import curves_png

        png = curves_png([{"iteration": r["iteration"], **{COLUMNS[c]: v for c, v in r.items() if c in COLUMNS}}
                          for r in table], f"run {run}")
        root = config.storage.root
        picture = (f"![reward, KL and held-out pass rate of run {run}](data:image/png;base64,"
                   f"{base64.b64encode(png).decode()})" if png else "")
        out["overview"] = {"type": "markdown", "description": f"run {run}: curves up to iteration {iteration}; "
                                                              "where its storage and tracking live",
                           "data": f"### run {run}: iteration {iteration} of {config.iterations}\n\n{picture}\n\n"
                                   f"- **storage**: `{store.uri}`\n- **tracking**: {tracking}\n"
                                   f"- **inspect**: `ppoflow runs show {run} --root {root}` · "
                                   f"`ppoflow rollouts {run} --iter {iteration} --order best --root {root}`\n"}

    done = sum(1 for r in table if r["iteration"] > 0)
    # Capped: a resumed run may lower `iterations` below what it has committed.
    out["progress"] = {"type": "progress", "data": round(min(100.0, 100.0 * done / config.iterations), 2),
                       "description": f"run {run}: {done}/{config.iterations} iterations committed"}
    return out


def check_artifacts(artifacts: dict[str, dict], drawn: bool) -> None:
    """Raise ReportError naming the first artifact that is missing or empty: a table without rows (or an iteration
    row without reward or KL), an overview without its picture, a progress without a number."""
    for name in ARTIFACTS:
        if name == "overview" and not drawn:
            continue
        art = artifacts.get(name)
        if art is None:
            raise ReportError(f"report: the {name} artifact is missing")
        data = art["data"]
        if art["type"] == "table":
            rows = json.loads(data)
            if not rows:
                raise ReportError(f"report: the {name} table has no rows")
            required = ("reward", "kl") if name == "iterations" else ("reward", "prompt", "response")
            for row in rows:
                if row.get("iteration", 1) > 0 and (gap := [c for c in required if row.get(c) is None]):
                    raise ReportError(f"report: a row of the {name} table has no {', '.join(gap)}: {row}")
        elif art["type"] == "markdown" and "(data:image/png;base64," not in data:
            raise ReportError(f"report: the {name} markdown has no curves picture")
        elif art["type"] == "progress" and not (isinstance(data, (int, float)) and 0 <= data <= 100):
            raise ReportError(f"report: the {name} artifact has no progress in [0, 100]: {data!r}")


def _publish(artifacts: dict[str, dict], prefix: str) -> None:
    """Create each artifact as `{prefix}-{name}` in this flow run, or update the one this flow run created before."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate, ArtifactUpdate
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.utilities.context import get_task_and_flow_run_ids

    task_run_id, flow_run_id = get_task_and_flow_run_ids()
    if flow_run_id is None:
        return  # nothing to attach them to (a report called outside a flow)
    client = get_client(sync_client=True)
    keys = [f"{prefix}-{name}" for name in artifacts]
    existing = {a.key: a.id for a in client.read_artifacts(artifact_filter=ArtifactFilter(
        key=ArtifactFilterKey(any_=keys), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))}
    for name, art in artifacts.items():
        key = f"{prefix}-{name}"
        if key in existing:
            client.update_artifact(existing[key], ArtifactUpdate(data=art["data"], description=art["description"]))
        else:
            client.create_artifact(ArtifactCreate(key=key, type=art["type"], data=art["data"],
                                                  description=art["description"], flow_run_id=flow_run_id,
                                                  task_run_id=task_run_id))


def prewarm(config) -> threading.Thread:
    """Start importing, in a thread, the modules the run's first report imports: matplotlib (the curves) and the
    tracker's (stages.tracking.IMPORTS). Imports only: nothing is opened or written, so what the run stores and
    publishes does not change. start_workers starts it while the driver waits for its actors, the first report
    would otherwise pay for it beside iteration 2 (on 2 cores the driver's orchestration waits for the GIL);
    close_run joins it. A module that fails to import is left for the report, which names it."""
    from stages.tracking import IMPORTS

    names = ("matplotlib.figure", "matplotlib.ticker", "matplotlib.backends.backend_agg",
             *IMPORTS.get(config.tracking.logger, ()))

    def run() -> None:
        for name in names:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - the report imports it again and raises its own, clearer error
                pass

    thread = threading.Thread(target=run, name="report-prewarm")
    thread.start()
    return thread


def report(config, run_uri: str, iteration: int, samples: int = 8) -> dict:
    """Report the committed `iteration`: its metrics to the run's tracker, then the artifacts; returns its
    `iteration_summary`."""
    from stages.tracking import run_tracker, track_iteration

    store = store_of(config, run_uri)
    tracker = run_tracker(config, run_uri)
    summary = track_iteration(config, run_uri, iteration, tracker=tracker)
    rows = run_context(run_uri).report_rows
    first = not rows  # this process's first report of the run: the earlier iterations come from storage
    if first and (baseline := iteration_summary(store, 0)).get("eval/pass_rate") is not None:
        rows[0] = _table_row(baseline)
    for n in range(1, iteration):
        if n not in rows and store.stage_marker(n, "sync") is not None:
            rows[n] = _table_row(iteration_summary(store, n))
    rows[iteration] = _table_row(summary)
    table = [rows[n] for n in sorted(rows) if n <= iteration]
    draw = first or iteration % config.eval.every == 0 or iteration == config.iterations
    artifacts = build_artifacts(config, store, iteration, table, tracker.where, draw, samples)
    check_artifacts(artifacts, drawn=draw)
    _publish(artifacts, re.sub(r"[^a-z0-9-]+", "-", store.run_id.lower()).strip("-"))
    logger().info("iteration %d: reward %.3f  kl %.4f", iteration, summary.get("rollout/reward_mean", float("nan")),
                  summary.get("rollout/kl", float("nan")))
    return summary


@task(name="report", task_run_name="report-{iteration}", cache_policy=NO_CACHE)
def report_task(config, run_uri: str, iteration: int) -> dict:
    return report(config, run_uri, iteration)
