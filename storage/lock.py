"""The run lock: one writer per run. A second process that tries to write the same run is refused, clearly.

The lock is a JSON file `{run}/_LOCK.json` naming its owner (host, pid, process start time, token). It is taken over
only when the owner is provably gone: same host and that pid no longer runs the same process (a SIGKILLed run leaves
its lock behind, and resuming it must work), or the owner's heartbeat is older than `stale_after_s` (another host).
Object stores have no exclusive create, so taking the lock writes, then reads back and checks the token: the
last writer wins and every other contender sees someone else's token and backs off.

Run alone to show a run's lock:  python -m storage.lock RUN_URI
"""

import json
import os
import socket
import sys
import threading
import time
import uuid

import fsspec
import psutil

from storage.run import write_json


class RunLocked(RuntimeError):
    pass


def _process_start(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


class RunLock:
    def __init__(self, run_uri: str, storage_options: dict | None = None, stale_after_s: float = 3600.0):
        self.fs, run_path = fsspec.core.url_to_fs(run_uri, **(storage_options or {}))
        self.path = f"{run_path.rstrip('/')}/_LOCK.json"
        self.uri = f"{run_uri.rstrip('/')}/_LOCK.json"
        self.stale_after_s = stale_after_s
        self.token = uuid.uuid4().hex
        self.lost: Exception | None = None  # set by the keep-alive thread when the lock was taken over
        self._stop = threading.Event()
        pid = os.getpid()
        self.owner = {
            "token": self.token,
            "host": socket.gethostname(),
            "pid": pid,
            "process_start": _process_start(pid),
            "acquired_at": time.time(),
            "heartbeat": time.time(),
        }

    def read(self) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            return {}  # torn write of a dead owner: treat as stale

    def is_stale(self, holder: dict) -> bool:
        """Whether `holder` (a lock record) may be taken over: same host and its process is gone, or no heartbeat
        for stale_after_s from another host."""
        if not holder:
            return True
        if holder.get("host") == self.owner["host"]:
            start = _process_start(holder.get("pid", -1))
            return start is None or abs(start - (holder.get("process_start") or 0)) > 1.0
        return time.time() - holder.get("heartbeat", 0) > self.stale_after_s

    def acquire(self) -> "RunLock":
        holder = self.read()
        if holder is not None and holder.get("token") != self.token and not self.is_stale(holder):
            raise RunLocked(
                f"run is locked by pid {holder.get('pid')} on {holder.get('host')} since "
                f"{time.ctime(holder.get('acquired_at', 0))} ({self.uri}). Wait for that run to finish or stop it; "
                f"if it is dead on another host, delete {self.uri} by hand."
            )
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        self._write()
        if (self.read() or {}).get("token") != self.token:
            raise RunLocked(f"another process took the lock {self.uri} at the same moment; retry later")
        return self

    def heartbeat(self) -> None:
        """Refresh the heartbeat; raises if the lock was taken over meanwhile (we must stop writing)."""
        if self.lost is not None:
            raise self.lost
        holder = self.read()
        if (holder or {}).get("token") != self.token:
            raise RunLocked(f"lost the run lock {self.uri} to {holder}; stopping so two writers never mix")
        self.owner["heartbeat"] = time.time()
        self._write()

    def _write(self) -> None:
        # A reader must never see a half-written lock: it would count as stale and be taken over.
        write_json(self.fs, self.path, self.owner)

    def keep_alive(self, interval_s: float | None = None) -> "RunLock":
        """Heartbeat from a daemon thread (every stale_after_s / 6 by default), so a stage that runs for hours never
        looks stale to another host. A lost lock is kept in `lost`; `heartbeat()` before each commit raises it."""

        def beat() -> None:
            while not self._stop.wait(interval_s or self.stale_after_s / 6):
                try:
                    self.heartbeat()
                except RunLocked as err:
                    self.lost = err
                    return
                except Exception:  # a storage hiccup: the next beat retries, the lock is far from stale
                    pass

        threading.Thread(target=beat, name=f"lock-heartbeat {self.uri}", daemon=True).start()
        return self

    def release(self) -> None:
        self._stop.set()
        if (self.read() or {}).get("token") == self.token:
            self.fs.rm(self.path)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


if __name__ == "__main__":
    print(json.dumps(RunLock(sys.argv[1]).read(), indent=1))
