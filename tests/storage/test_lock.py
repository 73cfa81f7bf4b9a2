"""The run lock refuses a second live writer and is taken over from a dead one."""

import json
import subprocess
import sys

import pytest

from storage.lock import RunLock, RunLocked


def test_second_writer_is_refused_with_owner_named(tmp_path):
    uri = str(tmp_path / "runs" / "r")
    first = RunLock(uri).acquire()
    with pytest.raises(RunLocked, match=r"locked by pid \d+"):
        RunLock(uri).acquire()
    first.release()
    RunLock(uri).acquire().release()  # free again


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    uri = str(tmp_path / "runs" / "r")
    code = f"from storage.lock import RunLock; RunLock({uri!r}).acquire()"  # exits without releasing
    subprocess.run([sys.executable, "-c", code], check=True)
    stale = json.loads((tmp_path / "runs" / "r" / "_LOCK.json").read_text())
    lock = RunLock(uri).acquire()
    assert lock.read()["token"] == lock.token != stale["token"]


def test_heartbeat_detects_a_takeover(tmp_path):
    uri = str(tmp_path / "runs" / "r")
    lock = RunLock(uri).acquire()
    (tmp_path / "runs" / "r" / "_LOCK.json").write_text(json.dumps({"token": "someone-else", "host": "h"}))
    with pytest.raises(RunLocked, match="lost the run lock"):
        lock.heartbeat()


def test_keep_alive_refreshes_the_heartbeat_and_records_a_takeover(tmp_path):
    import time

    uri = str(tmp_path / "runs" / "r")
    lock = RunLock(uri).acquire().keep_alive(interval_s=0.05)
    first = lock.read()["heartbeat"]
    deadline = time.time() + 10
    while lock.read()["heartbeat"] == first and time.time() < deadline:
        time.sleep(0.05)
    assert lock.read()["heartbeat"] > first  # beats without anyone calling heartbeat()
    (tmp_path / "runs" / "r" / "_LOCK.json").write_text(json.dumps({"token": "someone-else", "host": "h"}))
    while lock.lost is None and time.time() < deadline:
        time.sleep(0.05)
    assert isinstance(lock.lost, RunLocked)
    with pytest.raises(RunLocked, match="lost the run lock"):
        lock.heartbeat()  # what commit() calls before writing a marker
    lock.release()
    assert json.loads((tmp_path / "runs" / "r" / "_LOCK.json").read_text())["token"] == "someone-else"
