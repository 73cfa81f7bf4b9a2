"""The run lock: one writer per run. A second process that tries to write the same run is refused, clearly.

The lock is a JSON file `{run}/_LOCK.json` naming its owner (host, pid, process start time, token). It is taken over
only when the owner is provably gone: same host and that pid no longer runs the same process (a SIGKILLed run leaves
its lock behind, and resuming it must work), or the owner's heartbeat is older than `stale_after_s` (another host).

How two processes racing for the lock are told apart depends on the filesystem:
- S3 (s3fs): conditional PUTs. A free lock is taken with `If-None-Match: *` (create only if absent), a stale one is
  replaced with `If-Match: <ETag read>` (only if nobody rewrote it since), and each heartbeat is such a replacement
  too. Of two racers exactly one succeeds; the other gets RunLocked, and a holder whose lock was taken over sees it
  at its next heartbeat. AWS S3 honours both headers (If-None-Match since 2024-08, If-Match since 2024-11), as do
  MinIO and moto; a store that ignores them degrades to the read-back check below. Release checks the token, then
  deletes: a takeover in between is possible only for a lock that had gone stale.
- Other filesystems (local disks, memory://): no compare-and-swap, so taking the lock writes (atomically: local
  writes go through a rename), then reads back and checks the token. The last writer wins and every other contender
  that reads back after it sees someone else's token and backs off; a contender that read back before the last
  write finds out at its next heartbeat.
Either way a process that lost the lock never commits: commit() beats (and so checks the token) before every marker.

Run alone to show a run's lock:  python -m storage.lock RUN_URI
"""

import errno
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


def _conditional_writes(fs) -> bool:
    """Whether `fs` has compare-and-swap PUTs (If-None-Match / If-Match): s3fs does."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "s3" in protocols


def _s3_get(fs, path: str) -> tuple[bytes, str]:
    """Body and ETag of one S3 object from one GET (a HEAD and a GET could see two different versions)."""
    from fsspec.asyn import sync

    async def get():
        bucket, key, _ = fs.split_path(path)
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        try:
            return await resp["Body"].read(), resp["ETag"]
        finally:
            resp["Body"].close()

    return sync(fs.loop, get)


def _lost_race(err: OSError) -> bool:
    """Whether a conditional PUT failed because the lock was created or rewritten since we read it."""
    if isinstance(err, (FileExistsError, FileNotFoundError)):
        return True
    code = (getattr(err.__cause__, "response", None) or {}).get("Error", {}).get("Code")
    return err.errno == errno.EBUSY or code in ("PreconditionFailed", "ConditionalRequestConflict")


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
        self.conditional = _conditional_writes(self.fs)
        self.token = uuid.uuid4().hex
        self.lost: Exception | None = None  # set by the keep-alive thread when the lock was taken over
        self._stop = threading.Event()
        self._beating = threading.Lock()  # the keep-alive thread and commit() both beat: one read-write at a time
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
        return self._read()[0]

    def _read(self) -> tuple[dict | None, str | None]:
        """The lock record (None when there is none) and, with conditional writes, the ETag it was read at."""
        try:
            data, etag = _s3_get(self.fs, self.path) if self.conditional else (self.fs.cat_file(self.path), None)
        except FileNotFoundError:
            return None, None
        try:
            return json.loads(data), etag
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}, etag  # torn write of a dead owner: treat as stale

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
        holder, etag = self._read()
        if holder is not None and holder.get("token") != self.token and not self.is_stale(holder):
            raise RunLocked(
                f"run is locked by pid {holder.get('pid')} on {holder.get('host')} since "
                f"{time.ctime(holder.get('acquired_at', 0))} ({self.uri}). Wait for that run to finish or stop it; "
                f"if it is dead on another host, delete {self.uri} by hand."
            )
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        if not self._write(etag, absent=holder is None) or (self.read() or {}).get("token") != self.token:
            raise RunLocked(f"another process took the lock {self.uri} at the same moment; retry later")
        return self

    def heartbeat(self) -> None:
        """Refresh the heartbeat; raises if the lock was taken over meanwhile (we must stop writing)."""
        if self.lost is not None:
            raise self.lost
        with self._beating:
            holder, etag = self._read()
            if (holder or {}).get("token") != self.token:
                raise RunLocked(f"lost the run lock {self.uri} to {holder}; stopping so two writers never mix")
            self.owner["heartbeat"] = time.time()
            if not self._write(etag, absent=False):
                raise RunLocked(f"lost the run lock {self.uri}: another process rewrote it between our read and "
                                "our heartbeat; stopping so two writers never mix")

    def _write(self, etag: str | None, absent: bool) -> bool:
        """Write our record; with conditional writes only if the lock is still `absent`, or still at `etag`.
        False when another process got there first."""
        if not self.conditional:
            # A reader must never see a half-written lock: it would count as stale and be taken over.
            write_json(self.fs, self.path, self.owner)
            return True
        data = json.dumps(self.owner, indent=1, sort_keys=True).encode()  # one PUT: never seen half-written
        try:
            if absent:
                self.fs.pipe_file(self.path, data, mode="create")
            else:
                self.fs.pipe_file(self.path, data, IfMatch=etag)
        except OSError as err:
            if _lost_race(err):
                return False
            raise
        return True

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
