"""The console of `ppoflow train`: a short header (the run, where it writes, what runs where), one line per committed
iteration (with the held-out pass rate when there is one) and a summary, while the chatter of the engines,
DeepSpeed, Ray and Prefect goes to log files in `{run}/logs/` (`./logs/{run_id}` for a run in an object store):

    engine-0.log, policy.log, critic.log, reference.log, ...   one per Ray actor (workers/logs.py)
    ray.log                                                     Ray's own notices (autoscaler, raylet)
    driver.log                                                  this process: Prefect's task log, Ray's driver,
                                                                Python warnings, whatever a library prints

The driver's own output is caught at the file descriptors (what C++ code and subprocesses print too) and stays in
driver.log until the process exits. `--verbose` prints everything on the console as before (the actor files are
written all the same). On a failure the failing actor's last lines are shown (found by the pid or actor name in the
error), else driver.log's. The iteration lines are read from the run's commit markers by the progress thread
(ppoflow/progress.py), so they need no hook in the flow, the stages or the actors.

Try it:  ppoflow train --config configs/quickstart.yaml [--verbose]
Tests: tests/test_console.py
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time

from storage.run import RunStore

COLUMNS = [  # (header, metric of iteration_summary, format); "-" where an iteration has no value
    ("iter", "iteration", "{:>4d}"),
    ("reward", "rollout/reward_mean", "{:>7.3f}"),
    ("kl", "rollout/kl", "{:>8.4f}"),
    ("pg_loss", "ppo/policy_loss", "{:>8.4f}"),
    ("v_loss", "critic/value_loss", "{:>8.4f}"),
    ("resp_len", "rollout/response_len", "{:>8.1f}"),
    ("eval", "eval/pass_rate", "{:>6.3f}"),
    ("stages_s", "time/stages_s", "{:>8.1f}"),
]


def table_header(critic: bool) -> str:
    return "  ".join(f"{h:>{len(fmt.format(0))}}" for h, key, fmt in COLUMNS if critic or key != "critic/value_loss")


def table_row(summary: dict, critic: bool) -> str:
    cells = []
    for _, key, fmt in COLUMNS:
        if key == "critic/value_loss" and not critic:
            continue
        value = summary.get(key)
        cells.append(fmt.format(value) if value is not None else f"{'-':>{len(fmt.format(0))}}")
    return "  ".join(cells)


def _duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes} min {s} s" if minutes else f"{seconds:.1f} s"


def header(config, run_id: str, uri: str, logs: str, committed: int | None, legacy: bool,
           verbose: bool = False) -> list[str]:
    """The run, where it writes and logs, what runs where, and the plan (5 lines)."""
    gen, ray = config.generation, config.ray
    state = ("new run" if committed is None
             else f"resuming: {committed} of {config.iterations} iterations committed")
    where = f"Ray cluster at {ray.address}" if ray.address else f"local Ray, {ray.num_cpus or os.cpu_count()} CPUs"

    def res(cpus: float, gpus: float) -> str:
        return f"{cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "")

    engines = (f"{gen.num_engines} {gen.backend} engine{'s' * (gen.num_engines > 1)} ({res(gen.num_cpus, gen.num_gpus)}"
               + (f", TP {gen.tensor_parallel_size}" if gen.tensor_parallel_size > 1 else "") + ")")
    trainers = []
    for role in ("policy", "critic") if config.uses_critic else ("policy",):
        t = getattr(config, role)
        trainers.append(f"{role}{f' ×{t.num_ranks}' if t.num_ranks > 1 else ''} (ZeRO-{t.zero_stage}, "
                        f"{res(t.num_cpus, t.num_gpus)})")
    trainers.append("reference" if config.policy.lora is None else
                    f"LoRA rank {config.policy.lora.rank} (reference: the adapter disabled)")
    if config.reward.model is not None:
        trainers.append(f"reward model ({res(config.reward.model.num_cpus, config.reward.model.num_gpus)})")
    ev = config.eval
    evaluation = ("" if ev.prompts is None else
                  f" · eval on {ev.max_prompts or 'all'} held-out prompts every {ev.every}")
    return [
        f"ppoflow train: run {run_id} ({state})",
        f"  writes   {uri}" + ("  (a run of the old layout: it stays there)" if legacy else ""),
        f"  logs     {logs}/  " + ("(one file per actor; printed here too)" if verbose
                                    else "(one file per actor, driver.log; --verbose prints them here)"),
        f"  workers  {where} · {engines} · DeepSpeed {config.model.dtype}: {', '.join(trainers)}",
        f"  plan     {config.algo.estimator} · {config.iterations} iterations × {config.data.prompts_per_iteration} "
        f"prompts × {gen.n_samples_per_prompt} samples{evaluation}",
    ]


class RunConsole:
    """What `ppoflow train` prints, and where everything else goes. A context manager around the flow call: on entry
    the driver's file descriptors 1 and 2 go to driver.log (unless `verbose`) and the actors' lines to their files;
    `out` / `err` are the console. `poll()` returns the iteration lines due since the last call."""

    def __init__(self, config, run_uri: str, verbose: bool = False):
        from storage.run import log_dir

        self.config, self.uri, self.verbose = config, run_uri, verbose
        self.store = RunStore(run_uri, config.storage.storage_options)
        self.log_dir = log_dir(run_uri)
        self.out, self.err = sys.stdout, sys.stderr
        self.driver_log: str | None = None
        self._pending: str | None = None  # driver.log in a temporary file until the run folder exists
        self._adopting = threading.Lock()  # the progress thread and a failure may both move it
        self._waiting = False
        self._failed = False
        self._next, self._header_done = 0, False
        self.actor_logs = None

    # ---- where the output goes ---------------------------------------------------------------------------------
    def __enter__(self) -> "RunConsole":
        from workers.logs import ActorLogs, quiet_ray_console

        # A run refused before it is opened (a lock, cluster storage, ...) must leave no folder: until open_run has
        # written run.json, driver.log is a temporary file and the actors' lines wait in memory.
        self._waiting = self.store.local and self.store.read_manifest() is None
        if not self.verbose:
            sys.stdout.flush()
            sys.stderr.flush()
            self.out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
            self.err = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
            if self._waiting:
                fd, self._pending = tempfile.mkstemp(prefix="ppoflow-driver-", suffix=".log")
                os.close(fd)
                target = self._pending
            else:
                os.makedirs(self.log_dir, exist_ok=True)
                target = self.driver_log = os.path.join(self.log_dir, "driver.log")
            self._redirect(target)
            quiet_ray_console()
        self.actor_logs = ActorLogs(self.log_dir, hold=self._waiting).attach()
        return self

    @staticmethod
    def _redirect(path: str) -> None:
        # Until the process exits: Ray and Prefect print while shutting down, after this context.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)

    def _adopt_run_folder(self) -> None:
        """Once the run exists: move driver.log from its temporary file into the run's logs folder, let the actors'
        lines reach their files."""
        with self._adopting:
            if self._waiting and self.store.read_manifest() is not None:
                if self._pending is not None:
                    self._adopt()
                self.actor_logs.release()
                self._waiting = False

    def _adopt(self) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        self.driver_log = os.path.join(self.log_dir, "driver.log")
        with open(self.driver_log, "ab") as dst, open(self._pending, "rb") as src:
            shutil.copyfileobj(src, dst)
            copied = src.tell()
        sys.stdout.flush()
        sys.stderr.flush()
        self._redirect(self.driver_log)
        with open(self.driver_log, "ab") as dst, open(self._pending, "rb") as src:
            src.seek(copied)  # what was written between the copy and the switch
            shutil.copyfileobj(src, dst)
        os.unlink(self._pending)
        self._pending = None

    def __exit__(self, *exc) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self._adopt_run_folder()
        if self.actor_logs is not None:
            self.actor_logs.detach()
        if self._pending is not None and not self._failed:  # refused before the run existed: the error said it all
            os.unlink(self._pending)

    def print(self, *lines: str) -> None:
        for line in lines:
            self.out.write(line + "\n")
        self.out.flush()

    # ---- the iteration lines -----------------------------------------------------------------------------------
    def poll(self) -> list[str]:
        """Lines of the iterations that completed since the last call, in order: an iteration is complete once its
        sync stage and, when due, its evaluation are committed; iteration 0 is the starting policy's evaluation."""
        from stages.common import iteration_summary
        from stages.evaluate import due
        from storage.run import STAGES

        self._adopt_run_folder()
        lines, config, store = [], self.config, self.store
        while self._next <= config.iterations:
            n = self._next
            if n == 0 and not due(config, 0):
                self._next = 1
                continue
            if n > 0 and store.stage_marker(n, "sync") is None:
                break
            if due(config, n) and store.stage_marker(n, "eval") is None:
                break
            row = iteration_summary(store, n)
            row["time/stages_s"] = sum(row.get(f"time/{s}_s") or 0.0 for s in (*STAGES, "eval")) or None
            if not self._header_done:
                lines.append(table_header(config.uses_critic))
                self._header_done = True
            lines.append(table_row(row, config.uses_critic))
            self._next += 1
        return lines

    def summary(self, seconds: float) -> list[str]:
        from stages.common import iteration_summary

        rows = [iteration_summary(self.store, n) for n in range(1, self.config.iterations + 1)
                if self.store.stage_marker(n, "sync") is not None]
        rewards = [r["rollout/reward_mean"] for r in rows if r.get("rollout/reward_mean") is not None]
        evals = [m["metrics"]["eval/pass_rate"] for n in range(self.config.iterations + 1)
                 if (m := self.store.stage_marker(n, "eval")) is not None and "eval/pass_rate" in m["metrics"]]
        parts = [f"{len(rows)}/{self.config.iterations} iterations committed in {_duration(seconds)}"]
        if rewards:
            parts.append(f"reward {rewards[0]:.3f} → {rewards[-1]:.3f}")
        if evals:
            parts.append(f"eval pass rate {evals[0]:.3f} → {evals[-1]:.3f}")
        root = self.config.storage.root
        flag = "" if root == "runs" else f" --root {root}"
        run_id = self.store.run_id
        last = len(rows) or 1
        return [" · ".join(parts),
                f"inspect: ppoflow runs show {run_id}{flag} · ppoflow rollouts {run_id} --iter {last}{flag}"]

    # ---- a failure ---------------------------------------------------------------------------------------------
    def failure(self, err: BaseException) -> list[str]:
        """What the console says of an unexpected error: the error, the failing actor's last lines (or the
        driver's), where the whole logs are. The traceback goes to driver.log."""
        import traceback

        self._failed = True
        text = "".join(traceback.format_exception(err))
        if not self.verbose:
            sys.stderr.write(text)  # driver.log: Prefect logged it already, but maybe not this process's part
            sys.stderr.flush()
        cause = getattr(err, "cause", None) or err  # a RayTaskError carries the actor's exception
        message = str(cause).strip().splitlines()
        lines = [f"ppoflow: run {self.store.run_id} failed: {type(cause).__name__}: "
                 f"{message[-1] if message else ''}"]
        time.sleep(1.0)  # an actor's last lines reach the driver up to ~1 s after its error
        self._adopt_run_folder()
        names = self.actor_logs.files_of(text) if self.actor_logs is not None else []
        for name in names[:2]:
            lines.append(f"last lines of {os.path.join(self.log_dir, name)}.log:")
            lines += [f"  | {line}" for line in self.actor_logs.tail(name, 15)]
        driver = self.driver_log or self._pending
        if not names and driver and os.path.exists(driver):
            with open(driver, encoding="utf-8", errors="replace") as f:
                tail = f.read().splitlines()[-15:]
            lines.append(f"last lines of {driver}:")
            lines += [f"  | {line}" for line in tail]
        if driver:
            lines.append(f"the traceback: {driver}; every actor's output: {self.log_dir}/")
        return lines
