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


def engines(config, run_uri: str) -> list:
    """The run's generation engines, in index order (generation.num_engines of them)."""
    from workers.engines import get_engines

    return get_engines(run_uri, config.ray.namespace, config.generation.num_engines)


CHUNKS_PER_ENGINE = 4
"""With several engines a batch is cut into about this many chunks per engine: enough for a fast engine to take over
a slow one's share, few enough that each chunk is still a large batch for vLLM."""


def generate_on_engines(engines: list, requests: list[dict], chunk_size: int | None = None,
                        timeout_s: float | None = None) -> list[list[dict]]:
    """Results of `requests` (engine.generate's contract) in request order, from several engines: chunks of
    `chunk_size` requests (default: all of them for one engine, else about CHUNKS_PER_ENGINE chunks per engine), each
    sent to the engine with the fewest outstanding requests.

    Each engine holds at most two chunks at a time (one running, one waiting, so it never idles between them); the
    others wait here and go to whichever engine finishes first (ray.wait). Requests carry their own seeds, so
    a request's samples do not depend on which engine serves it. `timeout_s` bounds each wait (TimeoutError)."""
    import ray

    if not requests:
        return []
    if chunk_size is None:
        per = len(requests) if len(engines) == 1 else -(-len(requests) // (len(engines) * CHUNKS_PER_ENGINE))
        chunk_size = max(1, per)
    pending = [(start, requests[start:start + chunk_size]) for start in range(0, len(requests), chunk_size)]
    pending.reverse()  # pop() takes the first chunk
    outstanding = [0] * len(engines)  # requests sent to engine i and not yet returned
    chunks_held = [0] * len(engines)
    in_flight: dict = {}  # ObjectRef -> (engine index, start, chunk length)
    results: list = [None] * len(requests)
    while pending or in_flight:
        while pending:
            free = [i for i in range(len(engines)) if chunks_held[i] < 2]
            if not free:
                break
            i = min(free, key=lambda e: (outstanding[e], e))
            start, chunk = pending.pop()
            in_flight[engines[i].generate.remote(chunk)] = (i, start, len(chunk))
            outstanding[i] += len(chunk)
            chunks_held[i] += 1
        done, _ = ray.wait(list(in_flight), num_returns=1, timeout=timeout_s)
        if not done:
            raise TimeoutError(f"generate: no engine returned a chunk within {timeout_s} s "
                               f"({sum(outstanding)} requests outstanding)")
        i, start, length = in_flight.pop(done[0])
        results[start:start + length] = ray.get(done[0])
        outstanding[i] -= length
        chunks_held[i] -= 1
    return results


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
