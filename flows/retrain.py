"""Scheduled retraining flow: each trigger trains the next run of a lineage on the prompt files that arrived since the
previous run, warm-started from the lineage's promoted policy (see stages/lineage.py), then, with `retrain.gate`,
evaluates it against that promoted policy and promotes it only if it wins (stages/gate.py); or exits saying there is
nothing new.

Deployed by prefect.yaml as `ppo-retrain/retrain` with a cron schedule (inactive until an operator resumes it).
Run alone:  python -m flows.retrain LINEAGE PROMPTS_DIR configs/quickstart.yaml [dotted.key=value ...]
"""

import sys

from prefect import flow

from flows.ppo import ppo_train
from stages.common import logger
from stages.gate import gate_task
from stages.lineage import finish_retrain_task, plan_retrain_task


@flow(name="ppo-retrain")
def ppo_retrain(lineage: str, prompts_dir: str, config_path: str, overrides: list[str] | None = None) -> dict:
    """Train the next run of `lineage` on new files in `prompts_dir`, with the config file plus dotted overrides."""
    plan = plan_retrain_task(lineage, prompts_dir, config_path, overrides)
    logger().info(plan["message"])
    if plan["action"] == "nothing_new":
        return plan
    sets = [*(overrides or []), *plan["overrides"]]
    if plan["action"] == "gate":  # trained by an earlier trigger that ended before its gate decided
        record = gate_task(lineage, plan["run_uri"], config_path, sets)
        return {**plan, "final_policy": record["final_policy"], "promotion": record["promotion"],
                "gate": record["gate"]}
    run = ppo_train(config_path=config_path, overrides=sets)
    record = finish_retrain_task(lineage, run["run_uri"], config_path, overrides)
    if record["promotion"] is None:  # retrain.gate is set: the candidate must beat the promoted policy
        record = gate_task(lineage, run["run_uri"], config_path, sets)
        logger().info("lineage %s: %s %s (%s %.4f vs %.4f of the promoted policy)", lineage, record["run_id"],
                      record["promotion"], record["gate"]["metric"], record["gate"]["candidate"],
                      record["gate"]["promoted"])
    return {**plan, "run_uri": run["run_uri"], "final_policy": record["final_policy"],
            "promotion": record["promotion"], "gate": record.get("gate")}


if __name__ == "__main__":
    print(ppo_retrain(*sys.argv[1:4], overrides=sys.argv[4:])["message"])
