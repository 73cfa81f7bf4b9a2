"""Report stage: what operators see in the Prefect UI after each iteration — a table of every committed iteration
(reward, KL, losses, stage seconds), a sample of this iteration's rollouts (prompt, response, reward, advantage) and
the run's progress — all read back from the committed markers and Parquet, so a resumed run reports the same.

Artifacts are keyed by run (`{run}-iterations`, `{run}-rollouts`, `{run}-progress`): each iteration adds a version.
Run alone:  see flows/ppo.py (it needs a Prefect API); tests: tests/flows/test_deployment.py
"""

import re

from prefect import task
from prefect.cache_policies import NO_CACHE

from stages.common import iteration_summary, store_of

COLUMNS = {  # artifact column → metric of iteration_summary
    "reward": "rollout/reward_mean", "kl": "rollout/kl", "response_len": "rollout/response_len",
    "policy_loss": "ppo/policy_loss", "value_loss": "critic/value_loss", "grad_norm": "ppo/grad_norm",
    "eval_reward": "eval/reward_mean", "eval_pass_rate": "eval/pass_rate",
    "generate_s": "time/generate_s", "score_s": "time/score_s", "advantages_s": "time/advantages_s",
    "update_s": "time/update_s", "sync_s": "time/sync_s",
}


def _short(text: str, limit: int = 160) -> str:
    text = text.replace("\n", "⏎")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def report(config, run_uri: str, iteration: int, samples: int = 8) -> dict:
    from prefect.artifacts import create_progress_artifact, create_table_artifact

    store = store_of(config, run_uri)
    key = re.sub(r"[^a-z0-9-]+", "-", store.run_id.lower()).strip("-")
    done = [n for n in range(1, iteration + 1) if store.stage_marker(n, "sync") is not None]
    table = []
    for n in done:
        row = iteration_summary(store, n)
        table.append({"iteration": n, **{c: round(row[m], 4) for c, m in COLUMNS.items()
                                         if isinstance(row.get(m), (int, float))}})
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
    progress = 100.0 * len(done) / config.iterations
    create_progress_artifact(progress, key=f"{key}-progress",
                             description=f"run {store.run_id}: {len(done)}/{config.iterations} iterations committed")
    return {"iterations": len(done), "progress": progress}


@task(name="report", cache_policy=NO_CACHE)
def report_task(config, run_uri: str, iteration: int) -> dict:
    return report(config, run_uri, iteration)
