"""The stage skeleton every stage module uses, and what stages share: the run's storage and logger, its engines and
trainer groups, and one row per iteration read back from the commit markers.

A stage is a function `body(s: StageRun) -> Output` under `@stage(name, schema=...)`, which makes it the plain
function `fn(config, run_uri, iteration) -> marker` that tests call and its Prefect task `fn.task`:

    skip if committed (record a `skipped` event, return the stored marker)
    → fault point `{name}.start` → body → `{name}.before_commit` → commit (Parquet, then the marker, written last)
    → `after_commit` hook (update: checkpoint rotation) → `{name}.after_commit`

Named fault points (storage/faults.py) are how tests/flows/test_fault_harness.py kills a run at each of them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from storage.faults import fault_point
from storage.run import RunStore


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


@dataclass
class StageRun:
    """One execution of a stage: the run config, the run, its storage and the iteration."""

    config: Any  # stages.config.RunConfig
    run_uri: str
    store: RunStore
    iteration: int

    def engines(self):
        """The run's generation engines (workers/engine_pool.py), reporting to this stage's logger."""
        from workers.engine_pool import EnginePool

        return EnginePool(self.config, self.run_uri, self.store, log=logger().warning)

    def trainers(self):
        """The run's trainer groups (workers/trainers.py)."""
        from workers.trainers import TrainerPool

        return TrainerPool(self.config, self.run_uri, self.store)

    def group(self, role: str) -> list:
        """Every rank's actor of the `policy` or `critic` group (`num_ranks` of them), rank 0 first."""
        from workers.cluster import get_group

        return get_group(self.run_uri, role, self.config.ray.namespace, getattr(self.config, role).num_ranks)

    def actor(self, role: str):
        """The run's single actor of `role` (`reference`, `reward`)."""
        from workers.cluster import get_actor

        return get_actor(self.run_uri, role, self.config.ray.namespace)


@dataclass
class Output:
    """What a stage body computed: the table to commit (`schema` names its Arrow schema in storage/schema.py), the
    marker's metrics, and extra marker fields (policy_version, state, checkpoint, ...)."""

    table: Any  # pyarrow.Table
    metrics: dict
    fields: dict = field(default_factory=dict)


def commit(store: RunStore, config, iteration: int, stage: str, table, schema_name: str, started: float,
           metrics: dict, **fields) -> dict:
    """Write the stage's table and marker (config hash, metrics, seconds) and record the execution."""
    from stages.context import run_context
    from storage.schema import SCHEMAS

    seconds = time.perf_counter() - started
    if (ctx := run_context(store.uri, create=False)) is not None and ctx.lock is not None:
        ctx.lock.heartbeat()  # raises if another process took the run over: two writers must never mix
    marker = store.write_stage(iteration, stage, table, schema_name, SCHEMAS[schema_name],
                               rows_per_part=config.storage.rows_per_part, config_hash=config.config_hash(),
                               metrics=metrics, seconds=round(seconds, 4), **fields)
    store.record_event(stage=stage, iteration=iteration, action="ran", seconds=round(seconds, 4))
    return marker


def stage(name: str, *, schema: str, on_skip: Callable | None = None, after_commit: Callable | None = None,
          task_name: str | None = None, trainers: bool = False, **task_options):
    """Make `body(s: StageRun) -> Output` the stage `name` (see the module docstring): returns the plain function
    `fn(config, run_uri, iteration) -> marker`, with its Prefect task as `fn.task` (`task_name`, default `name`;
    task runs named `{task_name}-{n}`; no Prefect cache: the markers decide what is done; a failure inside an actor
    is raised as the actor's own error, `stage_errors`). `on_skip(s)` runs when the stage was committed already;
    `after_commit(s, marker)` after its commit; `trainers`: the body relies on the trainers' state from its first
    call to its last, and runs under the run's trainer lock (stages/context.py); `task_options` go to Prefect's
    @task (e.g. retry_condition_fn)."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    def wrap(body: Callable[[StageRun], Output]) -> Callable:
        def run(config, run_uri: str, iteration: int) -> dict:
            s = StageRun(config, run_uri, store_of(config, run_uri), iteration)
            if (done := s.store.stage_marker(iteration, name)) is not None:
                s.store.record_event(stage=name, iteration=iteration, action="skipped")
                if on_skip is not None:
                    on_skip(s)
                return done
            started = time.perf_counter()
            fault_point(f"{name}.start", iteration)
            with trainers_lock(run_uri) if trainers else contextlib.nullcontext():
                out = body(s)
            fault_point(f"{name}.before_commit", iteration)
            marker = commit(s.store, config, iteration, name, out.table, schema, started, out.metrics, **out.fields)
            if after_commit is not None:
                after_commit(s, marker)
            fault_point(f"{name}.after_commit", iteration)
            return marker

        # Not functools.wraps: Prefect reads the parameters from the signature, and __wrapped__ would make it
        # read body's.
        run.__name__, run.__qualname__, run.__module__ = body.__name__, body.__qualname__, body.__module__
        run.__doc__ = body.__doc__
        shown = task_name or name
        run.task = task(name=shown, task_run_name=f"{shown}-{{iteration}}", cache_policy=NO_CACHE,
                        **task_options)(stage_errors(run))
        return run

    return wrap


def trainers_lock(run_uri: str):
    """The run's trainer lock (stages/context.py RunContext.trainers), or a no-op outside a run opened in this
    process (a stage called alone, as tests do: nothing runs beside it)."""
    from stages.context import run_context

    ctx = run_context(run_uri, create=False)
    return ctx.trainers if ctx is not None else contextlib.nullcontext()


def iteration_summary(store: RunStore, iteration: int) -> dict:
    """One row per iteration from the committed markers: every stage's metrics and `time/{stage}_s`."""
    from storage.run import STAGES

    row = {"iteration": iteration}
    for name in (*STAGES, "eval"):
        marker = store.stage_marker(iteration, name)
        if marker is not None:
            row.update(marker.get("metrics", {}))
            row[f"time/{name}_s"] = marker.get("seconds")
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
