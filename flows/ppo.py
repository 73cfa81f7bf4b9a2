"""The PPO training flow: one Prefect flow run per training run, one subflow per iteration, one task per stage.

Every stage commits its output to storage; a stage already committed is skipped, so re-running the flow with the
same run id (a crash, `prefect flow-run retry`, `ppoflow train --run-id`) continues where the run stopped.

With algo.max_staleness = S ≥ 1 the iterations overlap: iteration n submits the generate task of n+S, which samples
from policy n−1 on the engines while score, advantages and update of n run on the trainers, and waits for it before
its sync (stages/pipeline.py says why this schedule, and what a resume does).

Run alone:  python -m flows.ppo configs/quickstart.yaml   (or `ppoflow train --config configs/quickstart.yaml`)
"""

import functools
import sys

from prefect import flow
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect.utilities.annotations import quote

from stages.advantages import advantages_task
from stages.config import RunConfig, load_config
from stages.evaluate import due, evaluate_task
from stages.generate import generate_task
from stages.report import report_task
from stages.score import score_task
from stages.setup import close_run_task, open_run_task, start_workers_task
from stages.sync import sync_task
from stages.update import update_task


@functools.cache
def _retried(task, retries: int, delay_s: float):
    """`task` with flow.retries, made once per process: `with_options` copies the task, a few ms of every stage call
    on a busy 2-core machine."""
    return task.with_options(retries=retries, retry_delay_seconds=delay_s)


@flow(name="ppo-iteration", flow_run_name="iteration-{iteration}")
def ppo_iteration(config: RunConfig, run_uri: str, iteration: int) -> dict:
    """One iteration's stages, each committed before the next starts; returns sync's manifest. ppo_train runs it as
    a subflow or inline (`flow.iteration_subflows`) and reports it while the next iteration runs. With
    algo.max_staleness = S ≥ 1 its rollout was generated before it (ppo_train, or iteration n−S), and it generates
    the rollout of n+S beside its score, advantages and update."""
    retry = (config.flow.retries, config.flow.retry_delay_s)
    # Prefect walks every argument of a task call for futures to wait on; the run config holds none, and the walk
    # through its fields cost a few ms of driver CPU per stage call. quote() skips it; the task gets the config itself.
    conf = quote(config)
    ahead, rollout = iteration + config.algo.max_staleness, None
    if ahead == iteration:
        _retried(generate_task, *retry)(conf, run_uri, iteration)
    elif ahead <= config.iterations:
        rollout = _retried(generate_task, *retry).submit(conf, run_uri, ahead)
    try:
        _retried(score_task, *retry)(conf, run_uri, iteration)
        _retried(advantages_task, *retry)(conf, run_uri, iteration)
        _retried(update_task, *retry)(conf, run_uri, iteration)
    finally:
        if rollout is not None:  # committed even when the trainers' stages fail: a resume takes it as it is
            rollout.wait()
    if rollout is not None:
        rollout.result()  # its failure, if any; the engines take new weights only between rollouts
    manifest = _retried(sync_task, *retry)(conf, run_uri, iteration)
    if due(config, iteration):
        _retried(evaluate_task, *retry)(conf, run_uri, iteration)
    return manifest


@flow(name="ppo-train")
def ppo_train(config: RunConfig | None = None, config_path: str | None = None, overrides: list[str] | None = None,
              run_id: str | None = None) -> dict:
    """Train (or resume) a run. Give `config`, or `config_path` plus dotted `overrides` (`algo.gamma=0.99`);
    `run_id` resumes or names the run.

    Args:
        config: The whole run config (stages/config.py RunConfig); `overrides` apply on top of it.
        config_path: YAML run config, relative to the working directory (deployments: the repository).
        overrides: Dotted `key=value` overrides, values parsed as YAML (`algo.gamma=0.99`, `iterations=5`).
        run_id: Run to resume, or name of a new run; None names it after the flow run.
    """
    base = config.model_dump(mode="json") if config is not None else None
    extra = [f"run_id={run_id}"] if run_id else []
    config = load_config(config_path, list(overrides or []) + extra, base=base)

    run = open_run_task(config)
    report = None  # the report of the last iteration, running in a thread while the next iteration runs
    try:
        start_workers_task(config, run["run_uri"])
        if due(config, 0):  # the starting policy's score: the baseline every later evaluation compares with
            evaluate_task(config, run["run_uri"], 0)
        if (last := run["first_iteration"] - 1) > 0:  # a crash may have come between the last sync and these
            if due(config, last):
                evaluate_task(config, run["run_uri"], last)
            report_task(config, run["run_uri"], last)  # re-reporting is harmless
        # Inline, an iteration's tasks run in this flow run: a subflow costs ~0.3 s of Prefect API calls per
        # iteration. A subflow gets no heartbeat of its own: this flow run's already tells that the process lives,
        # and Prefect joins a flow's heartbeat thread (asleep in 1 s steps) as the flow ends, ~0.5 s per iteration.
        # (bench/RESULTS.md, "Orchestration overhead").
        iterate = ppo_iteration if config.flow.iteration_subflows else ppo_iteration.fn
        first, stale = run["first_iteration"], config.algo.max_staleness
        if stale and first <= config.iterations:
            # Pipelined (S ≥ 1): the rollouts of iterations first..first+S-1, generated before the overlap starts
            # (committed already when a run resumes), then the engines at policy first-1 for generate first+S: the
            # committed sync of first-1, skipped, brings them there.
            retry = (config.flow.retries, config.flow.retry_delay_s)
            for n in range(first, min(first + stale, config.iterations + 1)):
                _retried(generate_task, *retry)(config, run["run_uri"], n)
            if first > 1:
                _retried(sync_task, *retry)(config, run["run_uri"], first - 1)
        with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            for iteration in range(first, config.iterations + 1):
                iterate(config, run["run_uri"], iteration)
                # The report only reads what the iteration committed: it runs beside the next iteration (its
                # artifacts and tracker calls took ~0.15 s of every iteration). One at a time, in order; a failed
                # report fails the run here, after the iteration it would have delayed.
                if report is not None:
                    report.result()
                report = report_task.submit(quote(config), run["run_uri"], iteration)  # quote: see ppo_iteration
            if report is not None:
                report.result()
    finally:
        if report is not None:
            report.wait()  # the tracker must not be closed under a report still writing to it
        close_run_task(config, run["run_uri"])
    return run


if __name__ == "__main__":
    print(ppo_train(config_path=sys.argv[1], overrides=sys.argv[2:]))
