"""Report stage: what operators see after each iteration — in the Prefect UI a table of every committed iteration
(reward, KL, losses, stage seconds), a sample of this iteration's rollouts (prompt, response, reward, advantage) and
the run's progress; in the experiment tracker the iteration's metrics (stages/tracking.py) — all read back from the
committed markers and Parquet, so a resumed run reports the same.

Artifacts are keyed by run (`{run}-iterations`, `{run}-rollouts`, `{run}-progress`): each iteration adds a version.
The table's rows stay in the run's context (stages/context.py) from one report to the next: each iteration's markers
are read once, when it is reported (a process's first report reads every earlier committed iteration), rather than
every marker of the run at every report. close_run drops them with the run's tracker, so each flow run starts again
from storage.
Run alone: see flows/ppo.py (it needs a Prefect API). Tests: tests/stages/test_report.py,
tests/flows/test_deployment.py
"""

import re

from prefect import task
from prefect.cache_policies import NO_CACHE

from stages.common import iteration_summary, logger, store_of
from stages.context import run_context

COLUMNS = {  # artifact column → metric of iteration_summary
    "reward": "rollout/reward_mean", "kl": "rollout/kl", "response_len": "rollout/response_len",
    "policy_loss": "ppo/policy_loss", "value_loss": "critic/value_loss", "grad_norm": "ppo/grad_norm",
    "eval_reward": "eval/reward_mean", "eval_pass_rate": "eval/pass_rate",
    "generate_s": "time/generate_s", "score_s": "time/score_s", "advantages_s": "time/advantages_s",
    "update_s": "time/update_s", "sync_s": "time/sync_s",
}



def _table_row(summary: dict) -> dict:
    return {"iteration": summary["iteration"], **{c: round(summary[m], 4) for c, m in COLUMNS.items()
                                                  if isinstance(summary.get(m), (int, float))}}


def _short(text: str, limit: int = 160) -> str:
    text = text.replace("\n", "⏎")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def report(config, run_uri: str, iteration: int, samples: int = 8) -> dict:
    """Report the committed `iteration`: its metrics to the run's tracker, then the three artifacts; returns its
    `iteration_summary`."""
    from prefect.artifacts import create_progress_artifact, create_table_artifact

    from stages.tracking import run_tracker, track_iteration

    store = store_of(config, run_uri)
    key = re.sub(r"[^a-z0-9-]+", "-", store.run_id.lower()).strip("-")
    summary = track_iteration(config, run_uri, iteration, tracker=run_tracker(config, run_uri))
    rows = run_context(run_uri).report_rows
    for n in range(1, iteration):
        if n not in rows and store.stage_marker(n, "sync") is not None:
            rows[n] = _table_row(iteration_summary(store, n))
    rows[iteration] = _table_row(summary)
    table = [rows[n] for n in sorted(rows) if n <= iteration]
    create_table_artifact(table, key=f"{key}-iterations",
                          description=f"run {store.run_id}: one row per committed iteration ({run_uri})")

    exp = store.read_stage(iteration, "advantages").select(
        ["sample_id", "prompt", "response", "reward", "advantages", "finish_reason"]).to_pylist()
    exp.sort(key=lambda r: r["reward"])
    picked = exp[: samples // 2] + exp[len(exp) - (samples - samples // 2):] if len(exp) > samples else exp
    create_table_artifact([{
        "sample": r["sample_id"], "prompt": _short(r["prompt"]), "response": _short(r["response"]),
        "reward": round(r["reward"], 4),
        "advantage": round(sum(r["advantages"]) / max(len(r["advantages"]), 1), 4), "finish": r["finish_reason"],
    } for r in picked], key=f"{key}-rollouts",
        description=f"run {store.run_id} iteration {iteration}: the {samples // 2} lowest- and highest-reward samples")
    progress = 100.0 * len(table) / config.iterations
    create_progress_artifact(progress, key=f"{key}-progress",
                             description=f"run {store.run_id}: {len(table)}/{config.iterations} iterations committed")
    logger().info("iteration %d: reward %.3f  kl %.4f", iteration, summary.get("rollout/reward_mean", float("nan")),
                  summary.get("rollout/kl", float("nan")))
    return summary


@task(name="report", task_run_name="report-{iteration}", cache_policy=NO_CACHE)
def report_task(config, run_uri: str, iteration: int) -> dict:
    return report(config, run_uri, iteration)
