"""What one run keeps in this process between its tasks, from open_run to close_run: one `RunContext` per run URI.

Prefect tasks pass only small JSON values, so what a run must hold across them in its driver process (the run's lock
and its heartbeat, the handles that keep its actors alive, the experiment tracker its reports keep open, the rows of
its iteration table, the forwarding of its actors' log lines to its flow run) lives here, keyed by the run URI, and
nowhere else. Two runs in one process (a worker serving two deployments, a notebook) each get their own; `release`
at close_run drops everything the run held, so a later flow run of the same run starts again from storage.

Run alone: nothing to run; tests/flows/test_two_runs.py runs two training flows in one process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunContext:
    uri: str
    lock: Any = None  # storage.lock.RunLock held while this process writes the run (stages/setup.py)
    workers: dict[str, Any] = field(default_factory=dict)  # role → actor handle: Ray kills a non-detached actor
    # once no handle to it is left, so the run's handles live as long as the run does
    tracker: Any = None  # stages.tracking.Tracker the reports keep open
    prewarm: threading.Thread | None = None  # importing what the first report needs (stages/report.py prewarm)
    config_logged: bool = False  # the run's config went to its tracker once in this process
    report_rows: dict[int, dict] = field(default_factory=dict)  # iteration → its row of the iterations table
    stop_log_forwarding: Callable[[], None] | None = None  # undoes the forwarding of actor lines to the flow run
    trainers: threading.RLock = field(default_factory=threading.RLock)  # held by a stage while it relies on the
    # trainers' state: with algo.max_staleness ≥ 1 a generate stage runs beside them and moves the policy only under
    # it (to sync an engine it recovers: stages/pipeline.py)


_RUNS: dict[str, RunContext] = {}
_GUARD = threading.Lock()  # reports run in a thread beside the next iteration


def run_context(run_uri: str, create: bool = True) -> RunContext | None:
    """The run's context in this process, created on first use (None when absent and `create` is false)."""
    with _GUARD:
        if (ctx := _RUNS.get(run_uri)) is None and create:
            ctx = _RUNS[run_uri] = RunContext(run_uri)
        return ctx


def release(run_uri: str) -> RunContext | None:
    """Forget the run in this process; returns its context (for the caller to close what it holds), or None."""
    with _GUARD:
        return _RUNS.pop(run_uri, None)


def active_runs() -> list[str]:
    """Run URIs with a context in this process (tests check that close_run leaves none behind)."""
    with _GUARD:
        return sorted(_RUNS)
