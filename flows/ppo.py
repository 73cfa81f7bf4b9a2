"""The PPO training flow: one Prefect flow run per training run, one subflow per iteration, one task per stage.

Every stage commits its output to storage; a stage already committed is skipped, so re-running the flow with the
same run id (a crash, `prefect flow-run retry`, `ppoflow train --run-id`) continues where the run stopped.

Run alone:  python -m flows.ppo configs/quickstart.yaml   (or `ppoflow train --config configs/quickstart.yaml`)
"""

import sys

from prefect import flow, get_run_logger
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from stages.advantages import advantages_task
from stages.config import RunConfig, load_config
from stages.evaluate import due, evaluate_task
from stages.generate import generate_task
from stages.report import report_task
from stages.score import score_task
from stages.setup import close_run_task, open_run_task, start_workers_task
from stages.sync import sync_task
from stages.update import update_task


@flow(name="ppo-iteration", flow_run_name="iteration-{iteration}")
def ppo_iteration(config: RunConfig, run_uri: str, iteration: int) -> dict:
    retry = {"retries": config.flow.retries, "retry_delay_seconds": config.flow.retry_delay_s}
    generate_task.with_options(**retry)(config, run_uri, iteration)
    score_task.with_options(**retry)(config, run_uri, iteration)
    advantages_task.with_options(**retry)(config, run_uri, iteration)
    update_task.with_options(**retry)(config, run_uri, iteration)
    sync_task.with_options(**retry)(config, run_uri, iteration)
    if due(config, iteration):
        evaluate_task.with_options(**retry)(config, run_uri, iteration)
    row = report_task(config, run_uri, iteration)  # artifacts in the UI + the experiment tracker, from storage
    get_run_logger().info("iteration %d: reward %.3f  kl %.4f", iteration, row.get("rollout/reward_mean", float("nan")),
                          row.get("rollout/kl", float("nan")))
    return row


@flow(name="ppo-train")
def ppo_train(config: RunConfig | None = None, config_path: str | None = None, overrides: list[str] | None = None,
              run_id: str | None = None) -> dict:
    """Train (or resume) a run. Give `config`, or `config_path` plus dotted `overrides` (`algo.gamma=0.99`);
    `run_id` resumes or names the run."""
    base = config.model_dump(mode="json") if config is not None else None
    extra = [f"run_id={run_id}"] if run_id else []
    config = load_config(config_path, list(overrides or []) + extra, base=base)

    run = open_run_task(config)
    try:
        start_workers_task(config, run["run_uri"])
        if due(config, 0):  # the starting policy's score: the baseline every later evaluation compares with
            evaluate_task(config, run["run_uri"], 0)
        if (last := run["first_iteration"] - 1) > 0:  # a crash may have come between the last sync and these
            if due(config, last):
                evaluate_task(config, run["run_uri"], last)
            report_task(config, run["run_uri"], last)  # re-reporting is harmless
        # No heartbeat of their own for the iteration subflows: this flow run's heartbeat already tells that the
        # process lives, and Prefect joins a flow's heartbeat thread (asleep in 1 s steps) as the flow ends, which
        # cost each iteration 0.5 s on average (bench/RESULTS.md, "Orchestration overhead").
        with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            for iteration in range(run["first_iteration"], config.iterations + 1):
                ppo_iteration(config, run["run_uri"], iteration)
    finally:
        close_run_task(config, run["run_uri"])
    return run


if __name__ == "__main__":
    print(ppo_train(config_path=sys.argv[1], overrides=sys.argv[2:]))
