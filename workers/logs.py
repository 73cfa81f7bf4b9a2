"""What the Ray workers print, written to one log file per actor in the driver: `{log_dir}/engine-0.log`,
`policy.log`, `critic.log`, `reference.log`, ... (the role in the actor's name), `tasks.log` (Ray tasks),
`ray.log` (Ray's own notices: autoscaler, raylet).

The lines arrive in the driver through Ray's log forwarding (`ray.init(log_to_driver=True)`, the hook in
workers/cluster.py `forward_worker_logs`) tagged with the worker's pid; the pid is looked up in Ray's actor table to
find the actor's name, so a subprocess an actor starts (vLLM's engine core) lands in the actor's file, and a
restarted engine appends to its predecessor's. `quiet_ray_console()` stops Ray from also printing them.

Run alone: see ppoflow/console.py (`ppoflow train` routes its actors' output here). Tests: tests/test_console.py
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque


class ActorLogs:
    """A `forward_worker_logs` handler writing each line to its actor's file under `log_dir`; remembers the last
    lines of every file (`tail`) and which pids wrote to which file (`files_of`).

    With `hold`, lines are kept in memory (at most `HELD` of them) until `release()` writes them and opens the
    files: a run refused before its folder exists (Ray's notices arrive as soon as Ray starts) must leave none."""

    HANDLER = "ppoflow-files"
    HELD = 10_000

    def __init__(self, log_dir: str, keep: int = 40, hold: bool = False):
        self.log_dir, self.keep = log_dir, keep  # made with the first file written
        self._held: deque | None = deque(maxlen=self.HELD) if hold else None
        self._files: dict[str, object] = {}
        self._tails: dict[str, deque] = {}
        self._names: dict[str, str] = {}  # pid -> file name (without .log)
        self._missed: dict[str, float] = {}  # pid -> when the actor table last did not know it
        self._lock = threading.Lock()

    def attach(self) -> "ActorLogs":
        from workers.cluster import forward_worker_logs

        self._stop = forward_worker_logs(None, self, name=self.HANDLER)  # every actor's: one run per `ppoflow train`
        return self

    def detach(self) -> None:
        getattr(self, "_stop", lambda: None)()
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()

    def release(self) -> None:
        """Write the held lines and every later one to the files."""
        with self._lock:
            held, self._held = self._held, None
            for name, line in held or ():
                self._write(name, line)

    def __call__(self, line: str, is_err: bool, source: str) -> None:
        # `source` is "<actor name, class or task name> pid=<pid>" (workers/cluster.py forward_worker_logs).
        label, _, pid = source.rpartition("pid=")
        with self._lock:
            name = self._file_name(label.strip(), pid)
            if name not in self._tails:
                self._tails[name] = deque(maxlen=self.keep)
            self._tails[name].append(line)
            if self._held is not None:
                self._held.append((name, line))
            else:
                self._write(name, line)

    def _write(self, name: str, line: str) -> None:
        f = self._files.get(name)
        if f is None:
            os.makedirs(self.log_dir, exist_ok=True)
            f = self._files[name] = open(os.path.join(self.log_dir, f"{name}.log"), "a", buffering=1,
                                         encoding="utf-8", errors="replace")
        f.write(line + "\n")

    def _file_name(self, label: str, pid: str) -> str:
        if pid in ("autoscaler", "raylet"):
            return "ray"
        if pid not in self._names and time.monotonic() - self._missed.get(pid, 0.0) > 1.0:
            self._names.update(self._actor_names())
            if pid not in self._names:
                self._missed[pid] = time.monotonic()  # a Ray task: asked again at most once a second
        # Not an actor of the table: a Ray task (`group_address-123`), by its name and pid.
        return self._names.get(pid) or f"{label or 'worker'}-{pid}"

    @staticmethod
    def _actor_names() -> dict[str, str]:
        """pid -> file name of every actor in Ray's actor table (it holds the pid from the actor's creation on)."""
        try:
            import ray._private.state

            table = ray._private.state.actors()
        except Exception:  # Ray shutting down, a private API that moved: lines still land, by pid
            return {}
        out = {}
        for actor in table.values():
            if actor.get("Pid"):
                # `{run}-{hash}:engine-0` -> engine-0; an unnamed actor (vLLM's TP workers) by class and pid
                name = (actor.get("Name") or "").rsplit(":", 1)[-1]
                out[str(actor["Pid"])] = name or f"{actor.get('ActorClassName', 'actor')}-{actor['Pid']}"
        return out

    def files_of(self, text: str) -> list[str]:
        """Names of the files whose actors `text` (an error message) mentions, by pid (`pid=123`, `pid: 123`) or by
        actor name (`...:policy`)."""
        import re

        with self._lock:
            found = []
            for pid in re.findall(r"pid[=:] ?(\d+)", text):
                if (name := self._names.get(pid)) is not None and name not in found:
                    found.append(name)
            for name in self._tails:
                if re.search(rf":{re.escape(name)}\b", text) and name not in found:
                    found.append(name)
            return found

    def tail(self, name: str, n: int = 20) -> list[str]:
        with self._lock:
            return list(self._tails.get(name, ()))[-n:]


def quiet_ray_console() -> None:
    """Ray prints every actor line on the driver's console too (log_to_driver); stop that, keeping the forwarding
    the log files are written from. A private switch of Ray's (the one its debugger uses); if it moves, the lines
    are printed again and nothing else changes."""
    try:
        import ray._private.worker as worker
    except ImportError:
        return
    worker._worker_logs_enabled = False
