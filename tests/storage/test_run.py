"""Stage commits: a marker written last commits a stage; anything without one is ignored and rewritten."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.run import MARKER, CorruptStage, RunStore, StageAlreadyCommitted, run_uri
from storage.schema import METRICS, fingerprint

ROWS = [{"name": "ppo/policy_loss", "step": i, "value": float(i) / 3} for i in range(10)]


@pytest.fixture(params=["local", "memory", "s3"])
def store(request, tmp_path) -> RunStore:
    """The same tests on a local folder, memory:// and a real S3 API (moto on loopback: no renames, PUTs only)."""
    if request.param == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        return RunStore(run_uri(bucket.uri("prefix"), "r1"), bucket.storage_options)
    root = str(tmp_path) if request.param == "local" else f"memory://ppoflow-test-{tmp_path.name}"
    return RunStore(run_uri(root, "r1"))


def test_write_then_read_roundtrip_in_parts(store):
    table = pa.Table.from_pylist(ROWS, schema=METRICS)
    marker = store.write_stage(1, "update", table, "metrics", METRICS, rows_per_part=4, seconds=1.5)
    assert marker["rows"] == 10 and [f["rows"] for f in marker["files"]] == [4, 4, 2]
    assert marker["schema_fingerprint"] == fingerprint(METRICS) and marker["seconds"] == 1.5
    assert store.read_stage(1, "update").to_pylist() == ROWS
    assert store.committed_stages(1) == ["update"]
    assert store.latest_committed("update") == 1 and store.latest_committed("sync") == 0


def test_committed_stage_is_never_overwritten(store):
    table = pa.Table.from_pylist(ROWS, schema=METRICS)
    store.write_stage(1, "update", table, "metrics", METRICS)
    with pytest.raises(StageAlreadyCommitted):
        store.write_stage(1, "update", table.slice(0, 1), "metrics", METRICS)
    assert store.read_stage(1, "update").num_rows == 10


def test_folder_without_marker_is_ignored_and_rewritten(store):
    path = store._path(store.stage_uri(2, "generate"))
    store.fs.makedirs(path, exist_ok=True)
    store.fs.pipe_file(f"{path}/part-00000.parquet", b"PAR1 half a file")
    store.fs.pipe_file(f"{path}/part-00007.parquet", b"stray part of a crashed attempt")
    assert store.stage_marker(2, "generate") is None
    with pytest.raises(CorruptStage, match="no commit marker"):
        store.read_stage(2, "generate")
    store.write_stage(2, "generate", pa.Table.from_pylist(ROWS[:3], schema=METRICS), "metrics", METRICS)
    assert sorted(p.rsplit("/", 1)[-1] for p in store.fs.ls(path, detail=False)) == [MARKER, "part-00000.parquet"]
    assert store.read_stage(2, "generate").num_rows == 3


def test_torn_marker_means_uncommitted(store):
    store.write_stage(1, "score", pa.Table.from_pylist(ROWS, schema=METRICS), "metrics", METRICS)
    path = f"{store._path(store.stage_uri(1, 'score'))}/{MARKER}"
    store.fs.pipe_file(path, store.fs.cat_file(path)[:20])
    assert store.stage_marker(1, "score") is None


def test_part_file_changed_after_commit_is_detected(store):
    store.write_stage(1, "score", pa.Table.from_pylist(ROWS, schema=METRICS), "metrics", METRICS)
    part = f"{store._path(store.stage_uri(1, 'score'))}/part-00000.parquet"
    store.fs.pipe_file(part, b"truncated")
    with pytest.raises(CorruptStage, match="size differs"):
        store.read_stage(1, "score")


def test_plain_pyarrow_reads_committed_parts(tmp_path):
    store = RunStore(run_uri(str(tmp_path), "r2"))
    store.write_stage(1, "update", pa.Table.from_pylist(ROWS, schema=METRICS), "metrics", METRICS)
    folder = tmp_path / "r2" / "iter-000001" / "update"
    assert pq.read_table(folder / "part-00000.parquet").column("value").to_pylist() == [r["value"] for r in ROWS]
    assert json.loads((folder / MARKER).read_text())["rows"] == 10


def test_manifest_written_once_and_events_recorded(store):
    store.write_manifest({"run_id": "r1", "config_hash": "abc"})
    with pytest.raises(StageAlreadyCommitted):
        store.write_manifest({"run_id": "r1", "config_hash": "other"})
    assert store.read_manifest()["config_hash"] == "abc"
    store.record_event(stage="generate", iteration=1, action="ran")
    store.record_event(stage="generate", iteration=1, action="skipped")
    assert [e["action"] for e in store.events()] == ["ran", "skipped"]


def test_checkpoint_cleared_only_while_uncommitted(store):
    ckpt = store._path(store.checkpoint_uri(1))
    store.fs.makedirs(f"{ckpt}/policy", exist_ok=True)
    store.fs.pipe_file(f"{ckpt}/policy/partial.pt", b"x")
    store.clear_uncommitted_checkpoint(1)
    assert not store.fs.exists(ckpt)
    store.fs.makedirs(f"{ckpt}/policy", exist_ok=True)
    store.fs.pipe_file(f"{ckpt}/policy/state.pt", b"committed")
    assert store.checkpoint_files(1) == [{"name": "policy/state.pt", "bytes": 9}]
    store.write_stage(1, "update", pa.Table.from_pylist(ROWS, schema=METRICS), "metrics", METRICS)
    with pytest.raises(StageAlreadyCommitted):
        store.clear_uncommitted_checkpoint(1)
    assert store.fs.exists(f"{ckpt}/policy/state.pt")


def test_files_beside_the_run_are_written_and_read_back(store):
    uri = store.write_file("plots/curves.png", b"\x89PNG first")
    assert uri == f"{store.uri}/plots/curves.png"
    store.write_file("plots/curves.png", b"\x89PNG second")  # derived files are replaced, not committed
    assert store.read_file("plots/curves.png") == b"\x89PNG second"
    with pytest.raises(FileNotFoundError):
        store.read_file("plots/missing.png")


@pytest.mark.parametrize("path", ["iter-000001/score/part-00000.parquet", "checkpoints/iter-000001/x", "run.json",
                                  "_LOCK.json", "events/x.json", "../other-run/plots/a.png", "/abs.png"])
def test_write_file_refuses_the_runs_own_layout(store, path):
    with pytest.raises(ValueError, match="not a free path"):
        store.write_file(path, b"x")


def test_list_runs_finds_every_run_folder(tmp_path):
    for root in (str(tmp_path), f"memory://ppoflow-list-{tmp_path.name}"):
        assert RunStore.list_runs(root) == []
        RunStore(run_uri(root, "b")).write_manifest({"run_id": "b"})
        a = RunStore(run_uri(root, "a"))
        a.write_manifest({"run_id": "a"})
        a.write_stage(1, "update", pa.Table.from_pylist(ROWS, schema=METRICS), "metrics", METRICS)
        RunStore(run_uri(root, "c")).write_file("logs/driver.log", b"a refused start leaves only logs")
        runs = RunStore.list_runs(root)  # a run folder holds a run.json (or the lock of a run being opened)
        assert [s.uri for s in runs] == [run_uri(root, "a"), run_uri(root, "b")]
        assert runs[0].read_stage(1, "update").num_rows == 10 and runs[1].read_manifest() == {"run_id": "b"}


def _checkpoint_and_commit(store, n):
    base = store._path(store.checkpoint_uri(n))
    for role in ("policy", "critic", "hf"):
        store.fs.makedirs(f"{base}/{role}", exist_ok=True)
        store.fs.pipe_file(f"{base}/{role}/state.pt", b"weights %d" % n)
    store.write_stage(n, "update", pa.Table.from_pylist(ROWS, schema=METRICS), "metrics", METRICS,
                      checkpoint={"uri": store.checkpoint_uri(n), "files": store.checkpoint_files(n)})


def _kept(store):
    return [n for n in range(1, 10) if store.fs.exists(store._path(store.checkpoint_uri(n)))]


def test_rotation_keeps_the_newest_committed_and_the_pinned(store):
    for n in (1, 2, 3):
        _checkpoint_and_commit(store, n)
    store.pin_checkpoint(1, "final policy of lineage daily")
    store.fs.makedirs(store._path(store.checkpoint_uri(4)) + "/policy", exist_ok=True)  # being written: no marker
    assert store.rotate_checkpoints(2) == []  # 1 is pinned; 2 and 3 are the newest two committed
    _checkpoint_and_commit(store, 4)
    assert store.rotate_checkpoints(2) == [2] and _kept(store) == [1, 3, 4]
    assert store.rotate_checkpoints(1) == [3] and _kept(store) == [1, 4]
    assert store.checkpoint_files(4) == [{"name": f"{r}/state.pt", "bytes": 9} for r in ("critic", "hf", "policy")]
    assert [e["iteration"] for e in (json.loads(store.fs.cat_file(p)) for p in sorted(
        store.fs.ls(f"{store.path}/events", detail=False))) if e["action"] == "checkpoint_deleted"] == [2, 3]
    with pytest.raises(ValueError, match="at least 1"):
        store.rotate_checkpoints(0)


def test_rotation_cut_short_leaves_the_newest_whole_and_is_finished_next_time(store):
    for n in (1, 2, 3):
        _checkpoint_and_commit(store, n)
    # a crash in the middle of deleting checkpoint 1: some of its files are gone, the folder is still there
    store.fs.rm(store._path(store.checkpoint_uri(1)) + "/policy", recursive=True)
    assert store.checkpoint_files(3) == [{"name": f"{r}/state.pt", "bytes": 9} for r in ("critic", "hf", "policy")]
    assert store.rotate_checkpoints(1) == [1, 2] and _kept(store) == [3]


def _checkpoint_in_parts(store, n, parts, written, state=True):
    """Checkpoint `n` committed by its update marker as `parts`, of which only `written` are whole (a part marker
    after its file); the others were cut short by a crash (a file, no marker)."""
    from storage.checkpoint import write_part

    uri = store.checkpoint_uri(n)
    for part in parts:
        name = f"{part.split('-')[0]}/{part}.pt"
        store.fs.makedirs(store._path(f"{uri}/{name.split('/')[0]}"), exist_ok=True)
        store.fs.pipe_file(store._path(f"{uri}/{name}"), b"part %d" % n)
        if part in written:
            write_part(uri, part, {name: 6}, store.fs.storage_options)
    store.write_stage(n, "update", pa.Table.from_pylist(ROWS, schema=METRICS), "metrics", METRICS,
                      checkpoint={"uri": uri, "parts": parts, "state": state, "hf": "hf" in parts})


def test_a_checkpoint_is_trusted_once_its_update_committed_and_every_part_is_whole(store):
    from storage.checkpoint import write_part

    parts = ["policy-rank0", "policy-rank1", "critic-rank0", "hf"]
    _checkpoint_in_parts(store, 3, parts, written=parts[:2])  # a crash while critic and HF export were written
    assert not store.checkpoint_complete(3) and store.latest_checkpoint(5) == 0 and not store.hf_export_ready(3)
    write_part(store.checkpoint_uri(3), "hf", {"hf/hf.pt": 6}, store.fs.storage_options)
    assert store.hf_export_ready(3) and not store.checkpoint_complete(3)
    write_part(store.checkpoint_uri(3), "critic-rank0", {"critic/critic-rank0.pt": 6}, store.fs.storage_options)
    assert store.checkpoint_complete(3) and store.latest_checkpoint(5) == 3 and store.latest_checkpoint(2) == 0
    success = json.loads(store.fs.cat_file(store._path(store.checkpoint_uri(3)) + f"/{MARKER}"))
    assert sorted(success["files"]) == sorted(f"{p.split('-')[0]}/{p}.pt" for p in parts)

    # Whole parts but no committed update (a crash between the writes and the update marker): never trusted.
    uri = store.checkpoint_uri(4)
    write_part(uri, "policy-rank0", {"policy/x.pt": 1}, store.fs.storage_options)
    assert not store.checkpoint_complete(4) and store.latest_checkpoint(4) == 3
    # An iteration that wrote only its HF export is no base to load the trainers' state from.
    _checkpoint_in_parts(store, 6, ["hf"], written=["hf"], state=False)
    assert store.checkpoint_complete(6) and store.hf_export_ready(6) and store.latest_checkpoint(6) == 3


def test_rotation_counts_complete_checkpoints_and_spares_those_being_written(store):
    parts = ["policy-rank0", "hf"]
    for n in (1, 2, 3):
        _checkpoint_in_parts(store, n, parts, written=parts)
    _checkpoint_in_parts(store, 4, parts, written=["hf"])  # committed, still being written (no policy marker)
    assert store.rotate_checkpoints(1) == [1, 2] and _kept(store) == [3, 4]
    assert store.latest_checkpoint(4) == 3  # the base of a replay survives whatever `keep` says
    _checkpoint_in_parts(store, 5, parts, written=parts)  # 5 complete: 4 will never be (its writer is gone)
    assert store.rotate_checkpoints(2) == [4] and _kept(store) == [3, 5]


def test_rotation_keeps_the_newest_state_checkpoint_behind_hf_exports(store):
    _checkpoint_in_parts(store, 2, ["policy-rank0"], written=["policy-rank0"])
    for n in (3, 4):
        _checkpoint_in_parts(store, n, ["hf"], written=["hf"], state=False)
    assert store.rotate_checkpoints(1) == [3] and _kept(store) == [2, 4]
