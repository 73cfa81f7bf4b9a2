"""Crash and resume, for real: SIGKILL `ppoflow train` inside the update stage of iteration 2, then resume it.

The resumed process must not generate again for iteration 2 (its engine serves no request), must first bring the
workers to the committed policy version 1, must ignore the half-written update/checkpoint folders and rewrite them,
and must end with iterations 1-2 committed.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _train(args: list[str], env_extra: dict, log: Path, reap) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    with log.open("w") as out:
        # Own session: after a crash, every process the run left behind (Ray, vLLM) can be found and reaped.
        proc = subprocess.Popen([sys.executable, "-m", "ppoflow.cli", "train", *args], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=900)
        finally:
            reap(proc.pid)
    return proc


def _events(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run / "events").iterdir())]


def test_sigkill_in_update_then_resume(tmp_path, tiny_model_dir, prompts_dir, reap_session, test_scale):
    args = ["--config", "configs/quickstart.yaml", "--run-id", "crash",
            "--set", f"model.path={tiny_model_dir}", "--set", f"data.prompts={prompts_dir}/train.jsonl",
            "--set", "eval.prompts=null",  # the resumed engine must serve no request at all: no evaluation either
            "--set", f"storage.root={tmp_path}", "--set", "iterations=2", *(a for s in test_scale for a in ("--set", s))]
    env = {"PREFECT_HOME": str(tmp_path / "prefect")}
    run = tmp_path / "runs" / "crash"

    first = _train(args, {**env, "PPOFLOW_FAULTS": "update.after_train@2=kill"}, tmp_path / "first.log",
                   reap_session)
    assert first.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    for stage in ("generate", "score", "advantages", "update", "sync"):
        assert (run / "iter-000001" / stage / "_SUCCESS.json").exists()
    for stage in ("generate", "score", "advantages"):
        assert (run / "iter-000002" / stage / "_SUCCESS.json").exists()
    assert not (run / "iter-000002" / "update").exists()
    generate_marker = (run / "iter-000002" / "generate" / "_SUCCESS.json").read_bytes()
    # What a crash during the writes would leave: a torn part file and a half checkpoint, neither committed.
    (run / "iter-000002" / "update").mkdir()
    (run / "iter-000002" / "update" / "part-00000.parquet").write_bytes(b"PAR1 torn")
    (run / "checkpoints" / "iter-000002" / "policy").mkdir(parents=True)
    (run / "checkpoints" / "iter-000002" / "policy" / "junk").write_bytes(b"half a checkpoint")

    second = _train(args, env, tmp_path / "second.log", reap_session)
    log = (tmp_path / "second.log").read_text()
    assert second.returncode == 0, log[-3000:]
    assert "run crash" in log

    for n in (1, 2):
        for stage in ("generate", "score", "advantages", "update", "sync"):
            assert json.loads((run / f"iter-{n:06d}" / stage / "_SUCCESS.json").read_text())["stage"] == stage
    assert (run / "iter-000002" / "generate" / "_SUCCESS.json").read_bytes() == generate_marker
    assert pq.read_table(run / "iter-000002" / "update" / "part-00000.parquet").num_rows > 0
    assert not (run / "checkpoints" / "iter-000002" / "policy" / "junk").exists()
    sync = json.loads((run / "iter-000002" / "sync" / "_SUCCESS.json").read_text())
    assert sync["policy_version"] == 2

    events = _events(run)
    resumed = [e for e in events if e["pid"] != events[0]["pid"]]
    by_stage = {(e["stage"], e.get("iteration")): e["action"] for e in resumed}
    assert by_stage[("generate", 2)] == "skipped" and by_stage[("score", 2)] == "skipped"
    assert by_stage[("update", 2)] == "ran" and by_stage[("sync", 2)] == "ran"
    started = next(e for e in resumed if e["stage"] == "workers" and e["action"] == "started")
    assert started["policy_version"] == 1  # workers restored to the committed policy before anything ran
    stopped = next(e for e in resumed if e["stage"] == "workers" and e["action"] == "stopped")
    assert stopped["engine"]["requests"] == 0  # no generation request in the resumed process
