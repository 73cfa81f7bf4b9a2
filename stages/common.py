"""What every stage shares: skip a committed stage, commit an output, locate actors, and named fault points."""

import os
import signal
import time

from storage.run import RunStore

LOCKS: dict = {}  # run URI → the RunLock this process holds while its flow writes the run (see stages/setup.py)


def logger():
    """The Prefect run logger inside a flow or task (its lines reach the UI), else the `ppoflow` logger."""
    import logging

    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("ppoflow")


def store_of(config, run_uri: str) -> RunStore:
    return RunStore(run_uri, config.storage.storage_options)


def skip_if_committed(store: RunStore, iteration: int, stage: str) -> dict | None:
    """The stored manifest of a committed stage (recording that it was skipped), else None."""
    marker = store.stage_marker(iteration, stage)
    if marker is not None:
        store.record_event(stage=stage, iteration=iteration, action="skipped")
    return marker


def commit(store: RunStore, config, iteration: int, stage: str, table, schema_name: str, started: float,
           metrics: dict, **fields) -> dict:
    """Write the stage's table and marker (config hash, metrics, seconds) and record the execution."""
    from storage.schema import SCHEMAS

    seconds = time.perf_counter() - started
    if (lock := LOCKS.get(store.uri)) is not None:
        lock.heartbeat()  # raises if another process took the run over: two writers must never mix
    marker = store.write_stage(iteration, stage, table, schema_name, SCHEMAS[schema_name],
                               rows_per_part=config.storage.rows_per_part, config_hash=config.config_hash(),
                               metrics=metrics, seconds=round(seconds, 4), **fields)
    store.record_event(stage=stage, iteration=iteration, action="ran", seconds=round(seconds, 4))
    return marker


def actor(config, run_uri: str, role: str):
    from workers.cluster import get_actor

    return get_actor(run_uri, role, config.ray.namespace)


def checkpoint_uri(store: RunStore, version: int) -> str | None:
    """Where policy `version` is stored; None for version 0, the base model."""
    return store.checkpoint_uri(version) if version > 0 else None


def fault_point(name: str, iteration: int) -> None:
    """Deterministic fault injection for tests: PPOFLOW_FAULTS="update.after_train@2=kill,score.start@1=raise".

    `kill` SIGKILLs this process (a crash: no cleanup, no finally); `raise` raises RuntimeError. With
    PPOFLOW_FAULTS_ONCE_DIR set, each point fires once (a flag file there remembers it), so a retried or resumed run
    that inherits the same environment gets past it."""
    spec = os.environ.get("PPOFLOW_FAULTS", "")
    once = os.environ.get("PPOFLOW_FAULTS_ONCE_DIR")
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, _, action = item.partition("=")
        if point == f"{name}@{iteration}":
            if once:
                flag = os.path.join(once, point)
                if os.path.exists(flag):
                    continue
                os.makedirs(once, exist_ok=True)
                open(flag, "w").close()
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault at {point}")


def iteration_summary(store: RunStore, iteration: int) -> dict:
    """One row per iteration from the committed markers: every stage's metrics and `time/{stage}_s`."""
    from storage.run import STAGES

    row = {"iteration": iteration}
    for stage in (*STAGES, "eval"):
        marker = store.stage_marker(iteration, stage)
        if marker is not None:
            row.update(marker.get("metrics", {}))
            row[f"time/{stage}_s"] = marker.get("seconds")
    return row
