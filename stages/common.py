"""What every stage shares: skip a committed stage, commit an output, locate actors, and named fault points."""

import time

from storage.faults import fault_point  # noqa: F401  (stages import it from here)
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


def trainer_group(config, run_uri: str, role: str) -> list:
    """Every rank's actor of the `policy` or `critic` group (`num_ranks` of them), rank 0 first."""
    from workers.cluster import get_group

    return get_group(run_uri, role, config.ray.namespace, getattr(config, role).num_ranks)


def on_all_ranks(group: list, method: str, *args) -> list:
    """Call a trainer method on every rank of a group, in the same order from this one caller (each method is
    collective: the ranks meet inside it). ObjectRefs in rank order; rank 0's result is the group's."""
    return [getattr(rank, method).remote(*args) for rank in group]


def threads_each(config, trainer, working: int) -> int | None:
    """Torch threads for one of `working` models computing at once (a stage's policy, reference, critic, reward
    model), `trainer` its config section: on CPU they share the cores, so each takes its share of its num_threads,
    at least one; None (its num_threads) on GPUs or when it works alone. Measured on 2 cores: scoring the 6M model
    with policy and reference at one thread each took 4.5-5.3 s, at two each (PASSIVE) 6.9-7.0 s (bench/RESULTS.md).
    """
    if config.policy.num_gpus > 0 or working <= 1:
        return None
    return max(1, trainer.num_threads // working)


def engines(config, run_uri: str) -> list:
    """The run's generation engines, in index order (generation.num_engines of them)."""
    from workers.engines import get_engines

    return get_engines(run_uri, config.ray.namespace, config.generation.num_engines)


CHUNKS_PER_ENGINE = 4
"""With several engines a batch is cut into about this many chunks per engine: enough for a fast engine to take over
a slow one's share, few enough that each chunk is still a large batch for vLLM."""


def engine_chunk_size(config, n_requests: int) -> int | None:
    """The dispatcher's chunk size for this backend: None (CHUNKS_PER_ENGINE chunks per engine) for vLLM, whose
    continuous batching keeps a stream of chunks busy; one chunk per engine for the HF engine, which decodes a chunk
    as one padded batch, a kernel launch per token whatever its size (on an H200, 4 chunks of 32 rows per engine
    sampled at half the tokens/s of one chunk of 128 rows)."""
    if config.generation.backend == "vllm":
        return None
    return max(1, -(-n_requests // config.generation.num_engines))


def generate_on_engines(engines: list, requests: list[dict], chunk_size: int | None = None,
                        timeout_s: float | None = None, version: int | None = None,
                        on_engine_lost=None) -> list[list[dict]]:
    """Results of `requests` (engine.generate's contract) in request order, from several engines: chunks of
    `chunk_size` requests (default: all of them for one engine, else about CHUNKS_PER_ENGINE chunks per engine), each
    sent to the engine with the fewest outstanding requests.

    Each engine holds at most two chunks at a time (one running, one waiting, so it never idles between them); the
    others wait here and go to whichever engine finishes first (ray.wait). Requests carry their own seeds, so
    a request's samples do not depend on which engine serves it. `timeout_s` bounds each wait (TimeoutError).

    `version`, the policy the samples must come from, travels with every chunk: an engine serving another refuses
    the chunk (EngineVersionError) rather than sample from the wrong weights. A chunk lost with its engine (it died:
    RayActorError) or refused that way is handed to `on_engine_lost(i, error)`, which must bring engine i back to
    `version` or raise (stages.sync.engine_recovery); the chunk is then sent again, and since its seeds decide its
    samples the call returns what an undisturbed one would. Without the callback those errors propagate. Deaths are
    bounded by Ray's restarts (generation.max_engine_restarts): past them the callback raises."""
    import ray
    from ray.exceptions import RayActorError

    from workers.engine import EngineVersionError

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
            ref = engines[i].generate.remote(chunk) if version is None else engines[i].generate.remote(chunk, version)
            in_flight[ref] = (i, start, len(chunk))
            outstanding[i] += len(chunk)
            chunks_held[i] += 1
        done, _ = ray.wait(list(in_flight), num_returns=1, timeout=timeout_s)
        if not done:
            raise TimeoutError(f"generate: no engine returned a chunk within {timeout_s} s "
                               f"({sum(outstanding)} requests outstanding)")
        i, start, length = in_flight.pop(done[0])
        outstanding[i] -= length
        chunks_held[i] -= 1
        try:
            results[start:start + length] = ray.get(done[0])
        except (RayActorError, EngineVersionError) as err:
            if on_engine_lost is None:
                raise
            on_engine_lost(i, err)  # blocks; the other engines keep sampling what they hold
            pending.append((start, requests[start:start + length]))  # the next chunk sent
    return results


def checkpoint_uri(store: RunStore, version: int) -> str | None:
    """Where policy `version` is stored; None for version 0, the base model."""
    return store.checkpoint_uri(version) if version > 0 else None


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


def stage_errors(fn):
    """Decorates a stage's task function so that a failed stage's state message in Prefect is the error's own text.

    An exception raised inside a Ray actor reaches the driver as a RayTaskError whose text is the remote traceback
    (ANSI colours and all), and Prefect puts `{type}: {text}` in the task's state message. The actor's exception is
    raised instead (its message names the field or sample), chained to the RayTaskError so that the task's log keeps
    the remote traceback."""
    import functools

    @functools.wraps(fn)
    def run(*args, **kwargs):
        from ray.exceptions import RayTaskError

        try:
            return fn(*args, **kwargs)
        except RayTaskError as err:
            cause = err
            while isinstance(cause, RayTaskError) and isinstance(cause.cause, Exception):
                cause = cause.cause  # an actor that called another actor: the innermost error
            if cause is err:
                raise
            raise cause from err

    return run
