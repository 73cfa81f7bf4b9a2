"""Storage on a real S3 API (moto's server on loopback): commits without renames, checkpoints, the run lock.

The commit tests of tests/storage/test_run.py also run on S3 (its `store` fixture); these are what is specific to an
object store: a marker is one PUT, other tools read what was committed, and the lock uses conditional PUTs.
"""

import json
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import pytest

from storage.checkpoint import local_dir_for_read, local_dir_for_write
from storage.lock import RunLock, RunLocked
from storage.run import MARKER, RunStore, run_uri, write_json
from storage.schema import METRICS

ROWS = [{"name": "ppo/policy_loss", "step": i, "value": float(i) / 3} for i in range(10)]


@pytest.fixture
def store(s3_bucket) -> RunStore:
    return RunStore(run_uri(s3_bucket.uri("runs-prefix"), "r1"), s3_bucket.storage_options)


def _keys(bucket, prefix: str) -> list[str]:
    return sorted(p[len(bucket.name) + 1:] for p in bucket.fs.find(f"{bucket.name}/{prefix}", refresh=True))


def test_marker_is_one_put_without_a_rename(store, s3_bucket, monkeypatch):
    def no_renames(*args, **kwargs):
        raise AssertionError("a rename on S3 is a copy + delete: a marker must be a single PUT")

    monkeypatch.setattr(store.fs, "mv", no_renames)
    monkeypatch.setattr(store.fs, "copy", no_renames)
    store.write_stage(1, "score", pa.Table.from_pylist(ROWS, schema=METRICS), "metrics", METRICS, rows_per_part=4)
    write_json(store.fs, f"{store.path}/extra.json", {"a": 1})
    assert _keys(s3_bucket, "runs-prefix") == [
        "runs-prefix/r1/extra.json", f"runs-prefix/r1/iter-000001/score/{MARKER}",
        *[f"runs-prefix/r1/iter-000001/score/part-{i:05d}.parquet" for i in range(3)]]  # no temporary objects


def test_committed_stage_reads_back_with_pyarrow_own_s3_client(store, s3_bucket):
    """What a stage commits is ordinary S3 objects: pyarrow's S3 client (not fsspec) reads them."""
    store.write_stage(2, "update", pa.Table.from_pylist(ROWS, schema=METRICS), "metrics", METRICS)
    s3 = pyarrow.fs.S3FileSystem(endpoint_override=s3_bucket.endpoint_url, region="us-east-1")  # keys: environment
    folder = f"{s3_bucket.name}/runs-prefix/r1/iter-000002/update"
    with s3.open_input_stream(f"{folder}/{MARKER}") as f:
        marker = json.loads(f.read())
    assert marker["rows"] == 10 and marker["uri"] == f"{s3_bucket.uri('runs-prefix')}/r1/iter-000002/update"
    table = pq.read_table(f"{folder}/part-00000.parquet", filesystem=s3)
    assert table.to_pylist() == ROWS


def test_checkpoint_upload_download_roundtrip(store, s3_bucket):
    files = {"policy/mp_rank_00_model_states.pt": b"model" * 100, "policy/latest": b"global_step1",
             "hf/model.safetensors": b"\x00" * 4096, "hf/config.json": b"{}"}
    store.clear_uncommitted_checkpoint(1)
    for role in ("policy", "hf"):  # as the trainer writes them: one local folder per role, uploaded at the end
        with local_dir_for_write(f"{store.checkpoint_uri(1)}/{role}", s3_bucket.storage_options) as d:
            assert not d.startswith(store.path)  # a local temporary folder, not the S3 key
            for name, data in files.items():
                if name.startswith(role + "/"):
                    (Path(d) / name.split("/", 1)[1]).write_bytes(data)
    listed = store.checkpoint_files(1)
    assert listed == sorted(({"name": n, "bytes": len(b)} for n, b in files.items()), key=lambda f: f["name"])
    store.write_stage(1, "update", pa.Table.from_pylist(ROWS, schema=METRICS), "metrics", METRICS,
                      checkpoint={"uri": store.checkpoint_uri(1), "files": listed})
    for role in ("policy", "hf"):
        with local_dir_for_read(f"{store.checkpoint_uri(1)}/{role}", s3_bucket.storage_options) as d:
            got = {f"{role}/{p.relative_to(d)}": p.read_bytes() for p in Path(d).rglob("*") if p.is_file()}
            assert got == {n: b for n, b in files.items() if n.startswith(role + "/")}
    assert store.rotate_checkpoints(1) == []  # the only committed checkpoint is the newest


def test_checkpoint_left_without_commit_is_cleared_before_rewrite(store, s3_bucket):
    with local_dir_for_write(f"{store.checkpoint_uri(3)}/policy", s3_bucket.storage_options) as d:
        (Path(d) / "half.pt").write_bytes(b"x")
    store.clear_uncommitted_checkpoint(3)
    assert _keys(s3_bucket, "runs-prefix/r1/checkpoints") == []


# ---- the run lock on S3: conditional PUTs (If-None-Match: *, If-Match: ETag) -----------------------------------------

def _lock_uri(s3_bucket) -> str:
    return run_uri(s3_bucket.uri("runs-prefix"), "r1")


def test_lock_uses_conditional_writes_and_refuses_a_second_writer(s3_bucket):
    uri = _lock_uri(s3_bucket)
    first = RunLock(uri, s3_bucket.storage_options)
    assert first.conditional
    first.acquire()
    with pytest.raises(RunLocked, match=r"locked by pid \d+ on .*_LOCK\.json"):
        RunLock(uri, s3_bucket.storage_options).acquire()
    first.heartbeat()
    assert first.read()["token"] == first.token
    first.release()
    assert first.read() is None
    RunLock(uri, s3_bucket.storage_options).acquire().release()  # free again


def test_lock_of_a_dead_process_is_taken_over(s3_bucket):
    uri = _lock_uri(s3_bucket)
    dead = RunLock(uri, s3_bucket.storage_options).acquire()
    record = dead.read()
    record.update(pid=2**22 + 1, process_start=1.0)  # same host, a pid that runs nothing: a SIGKILLed run
    s3_bucket.fs.pipe_file(dead.path, json.dumps(record).encode())
    lock = RunLock(uri, s3_bucket.storage_options).acquire()
    assert lock.read()["token"] == lock.token != dead.token
    with pytest.raises(RunLocked, match="lost the run lock"):
        dead.heartbeat()


def test_two_processes_creating_a_free_lock_at_once_one_wins(s3_bucket):
    uri = _lock_uri(s3_bucket)
    a, b = RunLock(uri, s3_bucket.storage_options), RunLock(uri, s3_bucket.storage_options)
    seen_free = a._read()  # a finds no lock ...
    assert seen_free == (None, None)
    b.acquire()  # ... b creates it before a writes
    a._read = lambda: seen_free  # a acts on what it read
    with pytest.raises(RunLocked, match="at the same moment"):
        a.acquire()
    assert b.read()["token"] == b.token  # If-None-Match: * kept b's lock; a wrote nothing
    b.heartbeat()


def test_two_processes_taking_over_a_stale_lock_at_once_one_wins(s3_bucket):
    uri = _lock_uri(s3_bucket)
    dead = RunLock(uri, s3_bucket.storage_options).acquire()
    s3_bucket.fs.pipe_file(dead.path, json.dumps({**dead.read(), "host": "gone-host", "heartbeat": 0}).encode())
    a, b = RunLock(uri, s3_bucket.storage_options), RunLock(uri, s3_bucket.storage_options)
    seen_stale = a._read()
    assert a.is_stale(seen_stale[0])
    b.acquire()  # b replaces the stale lock first
    a._read = lambda: seen_stale
    with pytest.raises(RunLocked, match="at the same moment"):
        a.acquire()  # If-Match on the stale lock's ETag fails: b's lock is not overwritten
    assert RunLock(uri, s3_bucket.storage_options).read()["token"] == b.token


def test_heartbeat_fails_when_the_lock_is_rewritten_between_read_and_write(s3_bucket, monkeypatch):
    uri = _lock_uri(s3_bucket)
    lock = RunLock(uri, s3_bucket.storage_options).acquire()
    read = lock._read

    def read_then_someone_writes():
        out = read()
        s3_bucket.fs.pipe_file(lock.path, json.dumps({**out[0], "token": "intruder"}).encode())
        return out

    monkeypatch.setattr(lock, "_read", read_then_someone_writes)
    with pytest.raises(RunLocked, match="between our read and our heartbeat"):
        lock.heartbeat()
    assert RunLock(uri, s3_bucket.storage_options).read()["token"] == "intruder"


def test_concurrent_heartbeats_of_one_holder_never_lose_the_lock(s3_bucket):
    """The keep-alive thread and commit() beat at the same time; with If-Match they must not trip each other."""
    lock = RunLock(_lock_uri(s3_bucket), s3_bucket.storage_options).acquire()
    errors = []

    def beat():
        try:
            for _ in range(8):
                lock.heartbeat()
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=beat) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and lock.read()["token"] == lock.token
    lock.release()
