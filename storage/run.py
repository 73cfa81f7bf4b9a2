"""One run's folder: layout, stage commits, the run manifest and event records, on any fsspec filesystem.

Layout (every path below the run URI `{root}/{run_id}`; runs started before that layout live in
`{root}/runs/{run_id}` and are found there, see `find_run`):

    run.json                                  run manifest: config, config hash, seeds, package versions
    _LOCK.json                                held by the one process writing the run (storage.lock)
    iter-000001/generate/part-00000.parquet   stage output ...
    iter-000001/generate/_SUCCESS.json        ... committed by its marker, written last
    iter-000001/{score,advantages,update,sync}/...
    checkpoints/iter-000001/{policy,critic,hf}/  DeepSpeed state + HF export (every checkpoint.every iterations)
    checkpoints/iter-000001/_PART-*.json      one per part (policy-rank0, critic-rank0, hf, ...), once its files are
                                              whole
    checkpoints/iter-000001/_SUCCESS.json     the checkpoint is complete: its update committed, every part whole
    checkpoints/iter-000001/_PINNED.json      kept by rotation whatever its age (a lineage's final policy)
    events/*.json                             one record per stage execution (ran / skipped), for operators and tests
    logs/{actor}.log, logs/driver.log         what the actors and the driver printed (`ppoflow train`; local runs)

A stage folder without a readable marker is never trusted: it is wiped and rewritten. A committed stage is never
overwritten. Run alone to list a run's committed stages:  python -m storage.run RUN_URI
"""

import json
import os
import socket
import sys
import time
import uuid
from datetime import datetime, timezone

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from storage.faults import fault_point
from storage.schema import fingerprint

MARKER = "_SUCCESS.json"
PINNED = "_PINNED.json"  # in a checkpoint folder: rotation never deletes it
PART_MARKER = "_PART-{part}.json"  # in a checkpoint folder: one part (a rank's state, the HF export) is whole
STAGES = ("generate", "score", "advantages", "update", "sync")


class StageAlreadyCommitted(RuntimeError):
    pass


class CorruptStage(RuntimeError):
    pass


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


LEGACY_FOLDER = "runs"
"""Runs started before runs moved to `{root}/{run_id}` live in `{root}/runs/{run_id}` (a storage root `runs`, the
default, gave `runs/runs/{run_id}`)."""


def run_uri(root: str, run_id: str) -> str:
    """`{root}/{run_id}`; a local root becomes an absolute path so every process agrees on it."""
    fs, path = fsspec.core.url_to_fs(root)
    if "file" in fs.protocol:
        root = path
    return f"{root.rstrip('/')}/{run_id}"


def find_run(root: str, run_id: str, storage_options: dict | None = None) -> tuple[str, bool]:
    """(URI, legacy) of run `run_id`: `{root}/{run_id}`, or the old layout's `{root}/runs/{run_id}` when a run was
    started there (it holds run.json) and the new place holds none, so existing runs resume and show where they
    are; `legacy` says which. A new run gets the new place."""
    uri = run_uri(root, run_id)
    old = run_uri(f"{root.rstrip('/')}/{LEGACY_FOLDER}", run_id)
    fs, _ = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if not fs.exists(f"{fs._strip_protocol(uri)}/run.json") and fs.exists(f"{fs._strip_protocol(old)}/run.json"):
        return old, True
    return uri, False


def log_dir(run_uri: str) -> str:
    """Local folder of a run's log files (what each actor and the driver printed): `{run}/logs` for a local run,
    `./logs/{run_id}` in the working directory for a run in an object store (log files are appended line by line,
    which object stores cannot do)."""
    import os

    fs, path = fsspec.core.url_to_fs(run_uri)
    if "file" in fs.protocol:
        return f"{path.rstrip('/')}/logs"
    return os.path.abspath(os.path.join("logs", run_uri.rstrip("/").rsplit("/", 1)[-1]))


def write_json(fs, path: str, obj: dict) -> None:
    """Write a small JSON file so that a reader sees the old content or the new, never half of it."""
    data = json.dumps(obj, indent=1, sort_keys=True).encode()
    if "file" in fs.protocol:
        # A local write is not atomic: write beside, then rename.
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    else:
        # An object store PUT is atomic already; renames there are copies.
        fs.pipe_file(path, data)


class RunStore:
    """Reads and writes one run's folder. Cheap to construct; holds no open files."""

    def __init__(self, uri: str, storage_options: dict | None = None):
        self.uri = uri.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))
        self.local = "file" in self.fs.protocol

    @property
    def run_id(self) -> str:
        return self.uri.rsplit("/", 1)[-1]

    def _path(self, uri: str) -> str:
        return self.fs._strip_protocol(uri)

    # ---- layout -------------------------------------------------------------------------------------------
    def stage_uri(self, iteration: int, stage: str) -> str:
        return f"{self.uri}/iter-{iteration:06d}/{stage}"

    def checkpoint_uri(self, iteration: int) -> str:
        return f"{self.uri}/checkpoints/iter-{iteration:06d}"

    def policy_checkpoint(self, version: int) -> str | None:
        """Where policy `version` is stored (the checkpoint of iteration `version`); None for version 0, the base
        model, which the trainers rebuild from model.path."""
        return self.checkpoint_uri(version) if version > 0 else None

    # ---- markers ------------------------------------------------------------------------------------------
    def marker(self, uri: str) -> dict | None:
        """The commit marker of a stage folder, or None when absent or unreadable (a torn write)."""
        try:
            with self.fs.open(f"{self._path(uri)}/{MARKER}", "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None

    def stage_marker(self, iteration: int, stage: str) -> dict | None:
        return self.marker(self.stage_uri(iteration, stage))

    def _write_json(self, path: str, obj: dict) -> None:
        write_json(self.fs, path, obj)

    def write_stage(
        self,
        iteration: int,
        stage: str,
        table: pa.Table,
        schema_name: str,
        schema: pa.Schema,
        rows_per_part: int = 1 << 16,
        **marker_fields,
    ) -> dict:
        """Write `table` as Parquet parts, then the marker. Returns the marker (a small JSON-able dict)."""
        uri = self.stage_uri(iteration, stage)
        if self.marker(uri) is not None:
            raise StageAlreadyCommitted(f"{uri} is already committed; refusing to overwrite it")
        path = self._path(uri)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)  # leftovers of an attempt that never committed
        self.fs.makedirs(path, exist_ok=True)
        if not table.schema.equals(schema):
            # A column the schema gained after an earlier stage of this run was committed (the multi-turn columns of a
            # rollout written before them) is written as nulls, which every such column reads as its trivial value.
            for f in schema:
                if f.name not in table.column_names:
                    table = table.append_column(f, pa.nulls(table.num_rows, f.type))
            table = table.select(schema.names).cast(schema)
        files = []
        for i, start in enumerate(range(0, max(table.num_rows, 1), rows_per_part)):
            part = table.slice(start, rows_per_part)
            name = f"part-{i:05d}.parquet"
            pq.write_table(part, f"{path}/{name}", filesystem=self.fs)
            files.append({"name": name, "rows": part.num_rows, "bytes": self.fs.size(f"{path}/{name}")})
            if i == 0 and table.num_rows > rows_per_part:
                fault_point(f"{stage}.mid_write", iteration)  # one part file written, more to come
        fault_point(f"{stage}.before_marker", iteration)  # every part file written, no marker
        marker = {
            "stage": stage,
            "iteration": iteration,
            "uri": uri,
            "rows": table.num_rows,
            "files": files,
            "schema": schema_name,
            "schema_fingerprint": fingerprint(schema),
            "committed_at": now_iso(),
            **marker_fields,
        }
        self._write_json(f"{path}/{MARKER}", marker)
        return marker

    def read_stage(self, iteration: int, stage: str) -> pa.Table:
        """The committed table of a stage; only the files its marker lists, each checked against its size."""
        uri = self.stage_uri(iteration, stage)
        marker = self.marker(uri)
        if marker is None:
            raise CorruptStage(f"{uri} has no commit marker; run the stage (or resume the run) first")
        path = self._path(uri)
        tables = []
        for f in marker["files"]:
            fpath = f"{path}/{f['name']}"
            if not self.fs.exists(fpath) or self.fs.size(fpath) != f["bytes"]:
                raise CorruptStage(f"{fpath} is missing or its size differs from the commit marker")
            tables.append(pq.read_table(fpath, filesystem=self.fs))
        return pa.concat_tables(tables)

    def committed_stages(self, iteration: int) -> list[str]:
        return [s for s in STAGES if self.stage_marker(iteration, s) is not None]

    def iterations(self) -> list[int]:
        """Iteration numbers that have a folder (committed or not), ascending."""
        try:
            names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False)]
        except FileNotFoundError:
            return []
        return sorted(int(n[5:]) for n in names if n.startswith("iter-") and n[5:].isdigit())

    def latest_committed(self, stage: str) -> int:
        """Largest iteration whose `stage` is committed; 0 when none."""
        done = [n for n in self.iterations() if self.stage_marker(n, stage) is not None]
        return max(done, default=0)

    # ---- checkpoints --------------------------------------------------------------------------------------
    def clear_uncommitted_checkpoint(self, iteration: int) -> str:
        """Remove leftovers in checkpoint `iteration` before it is written; the update marker commits it."""
        if self.stage_marker(iteration, "update") is not None:
            raise StageAlreadyCommitted(f"checkpoint of iteration {iteration} is committed; refusing to overwrite")
        uri = self.checkpoint_uri(iteration)
        if self.fs.exists(self._path(uri)):
            self.fs.rm(self._path(uri), recursive=True)
        return uri

    def checkpoint_complete(self, iteration: int) -> bool:
        """Whether checkpoint `iteration` is whole and may be loaded: its `_SUCCESS.json` exists, or (written here,
        now) every part its committed update marker names is there. A checkpoint cut short by a crash (a part
        missing) or one whose update never committed is not; older runs' checkpoints (listed in full by their update
        marker, written before the marker) are."""
        path = self._path(self.checkpoint_uri(iteration))
        if self.fs.exists(f"{path}/{MARKER}"):
            return True
        update = self.stage_marker(iteration, "update")
        ckpt = (update or {}).get("checkpoint")
        if not ckpt:
            return False
        if "files" in ckpt:  # written before checkpoints had parts: the update marker committed it
            return True
        files: dict[str, int] = {}
        for part in ckpt["parts"]:
            try:
                with self.fs.open(f"{path}/{PART_MARKER.format(part=part)}", "rb") as f:
                    files.update(json.loads(f.read())["files"])
            except (FileNotFoundError, json.JSONDecodeError):
                return False
        self._write_json(f"{path}/{MARKER}", {"iteration": iteration, "parts": ckpt["parts"], "files": files,
                                              "committed_at": now_iso()})
        return True

    def latest_checkpoint(self, at_most: int) -> int:
        """The newest complete checkpoint holding the trainers' state of an iteration ≤ `at_most`; 0 (the base
        model) when there is none."""
        for n in sorted((n for n in self.iterations() if n <= at_most), reverse=True):
            ckpt = (self.stage_marker(n, "update") or {}).get("checkpoint") or {}
            if ckpt.get("state", "files" in ckpt) and self.checkpoint_complete(n):
                return n
        return 0

    def hf_export_ready(self, iteration: int, part: str = "hf") -> bool:
        """Whether the HF export of iteration `iteration` is whole (what the `storage` weight sync loads): `hf`, or
        `merged` (a LoRA policy's full weights; its `hf` holds the adapter)."""
        update = self.stage_marker(iteration, "update")
        ckpt = (update or {}).get("checkpoint") or {}
        if "files" in ckpt:  # a checkpoint written inline, before part markers: the update marker lists its files
            return part == "hf"
        # The part marker is written last, after every file of the export (also before the update commits).
        return self.fs.exists(f"{self._path(self.checkpoint_uri(iteration))}/{PART_MARKER.format(part=part)}")

    def checkpoint_files(self, iteration: int) -> list[dict]:
        """Relative name and size of every file of a checkpoint folder."""
        base = self._path(self.checkpoint_uri(iteration))
        out = []
        for p, info in sorted(self.fs.find(base, detail=True).items()):
            out.append({"name": p[len(base) + 1 :], "bytes": info["size"]})
        return out

    def pin_checkpoint(self, iteration: int, reason: str) -> None:
        """Exempt checkpoint `iteration` from rotation: later runs start from it (a lineage's final policy)."""
        self._write_json(f"{self._path(self.checkpoint_uri(iteration))}/{PINNED}", {"reason": reason, "at": now_iso()})

    def rotate_checkpoints(self, keep: int) -> list[int]:
        """Delete the complete checkpoints older than the newest `keep` complete ones, unless pinned, and the
        leftovers of checkpoints that will never complete (older than the newest complete one, not complete);
        returns the iterations deleted.

        Checkpoints still being written (newer than the newest complete one) are left alone, and the newest complete
        checkpoint holding the trainers' state, which a resume replays from, is never deleted (an HF-only export
        does not replace it). A rotation cut short leaves an older folder in
        part, which the next rotation finishes. Each deletion is recorded as an event."""
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        folders = [n for n in self.iterations() if self.fs.exists(self._path(self.checkpoint_uri(n)))]
        complete = [n for n in folders if self.checkpoint_complete(n)]
        newest = max(complete, default=0)
        doomed = set(complete[:-keep]) | {n for n in folders if n < newest and n not in complete}
        doomed.discard(self.latest_checkpoint(newest))  # the trainers' state a resume starts from
        deleted = []
        for n in sorted(doomed):
            path = self._path(self.checkpoint_uri(n))
            if self.fs.exists(f"{path}/{PINNED}"):
                continue
            self.fs.rm(path, recursive=True)
            self.record_event(stage="update", iteration=n, action="checkpoint_deleted")
            deleted.append(n)
        return deleted

    # ---- manifest and events ------------------------------------------------------------------------------
    def read_manifest(self) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(f"{self.path}/run.json"))
        except FileNotFoundError:
            return None

    def write_manifest(self, manifest: dict) -> None:
        if self.fs.exists(f"{self.path}/run.json"):
            raise StageAlreadyCommitted(f"{self.uri}/run.json exists; a run manifest is written once")
        self.fs.makedirs(self.path, exist_ok=True)
        self._write_json(f"{self.path}/run.json", manifest)

    def record_event(self, **event) -> None:
        """One small JSON file per stage execution; object stores can't append, so no shared log file."""
        event = {"at": now_iso(), "host": socket.gethostname(), "pid": os.getpid(), **event}
        name = f"{time.time_ns()}-{uuid.uuid4().hex[:6]}.json"
        self.fs.makedirs(f"{self.path}/events", exist_ok=True)
        self.fs.pipe_file(f"{self.path}/events/{name}", json.dumps(event).encode())

    def events(self) -> list[dict]:
        try:
            paths = sorted(self.fs.ls(f"{self.path}/events", detail=False))
        except FileNotFoundError:
            return []
        return [json.loads(self.fs.cat_file(p)) for p in paths]

    # ---- listing runs, files beside the run (plots) -------------------------------------------------------
    @classmethod
    def list_runs(cls, root: str, storage_options: dict | None = None) -> list["RunStore"]:
        """Every run under `root`, by name: each folder `{root}/{run_id}` holding a run.json or a _LOCK.json (a run
        being opened), and those of the old layout (`{root}/runs/{run_id}`) that the new one does not shadow; []
        when there is none."""
        fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
        base = path.rstrip("/")
        found: dict[str, str] = {}
        for pattern, parent in ((f"{base}/{LEGACY_FOLDER}/*/", f"{root.rstrip('/')}/{LEGACY_FOLDER}"),
                                (f"{base}/*/", root)):
            for name in ("run.json", "_LOCK.json"):
                for p in fs.glob(pattern + name):
                    run_id = p.rsplit("/", 2)[-2]
                    found[run_id] = run_uri(parent, run_id)  # the new layout, globbed last, wins
        return [cls(found[name], storage_options) for name in sorted(found)]

    def write_file(self, relative_path: str, data: bytes) -> str:
        """Write a derived file (a plot, a report) at `{run}/{relative_path}`, replacing it; returns its URI.

        Derived files are rewritten whenever asked for, so they carry no commit marker; the run's own layout (stages,
        checkpoints, manifest, lock, events) is refused so that nothing committed can be overwritten this way."""
        parts = relative_path.split("/")
        if relative_path.startswith("/") or ".." in parts or parts[0].startswith("iter-") or parts[0] in (
                "checkpoints", "events", "run.json", "_LOCK.json"):
            raise ValueError(f"{self.uri}: {relative_path!r} is not a free path inside the run (stage folders, "
                             "checkpoints, events, run.json and _LOCK.json belong to the run itself)")
        path = f"{self.path}/{relative_path}"
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(path, data)
        return f"{self.uri}/{relative_path}"

    def read_file(self, relative_path: str) -> bytes:
        """The bytes of `{run}/{relative_path}`; FileNotFoundError when absent."""
        return self.fs.cat_file(f"{self.path}/{relative_path}")


if __name__ == "__main__":
    store = RunStore(sys.argv[1])
    for n in store.iterations():
        print(f"iter {n}: {', '.join(store.committed_stages(n)) or '(nothing committed)'}")
