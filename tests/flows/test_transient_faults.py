"""Transient faults cost a retry or a resend, not the run, and the run commits what an undisturbed one would.

One PPO run on the real stack (Ray, DeepSpeed, Prefect; two HF engines, which start in seconds), one worker start-up
for the three faults of issue 9:
- the reward function fails on its first call: Prefect retries the score task (flow.retries), which commits once;
- a storage error while the advantages stage writes its second part file, leaving a torn file: the task retry wipes
  the uncommitted folder and commits every row once;
- engine 0 dies (killed; Ray restarts it, generation.max_engine_restarts) right after iteration 2's generate stage
  sent it a chunk: the stage waits for it, syncs it to policy 1, resends its chunks, and commits the rollout an
  undisturbed stage commits.
The storage error also runs alone, without workers, on a local folder and on S3 (moto).

Storage keeps no retry loop of its own, by decision: s3fs (5 attempts with backoff on connection errors, timeouts,
throttling) and botocore (5xx) already retry transient object-store errors per request, and an error that gets past
them — or a local OSError, rarely transient — fails the stage, whose write is idempotent (an uncommitted folder is
wiped and rewritten; the marker is written last) and whose Prefect retry is the one bounded, visible retry. A second
loop inside storage would multiply the attempts and hide the failures from the flow run.

Run alone:  .venv/bin/pytest -q tests/workers/test_engine_restart.py tests/flows/test_transient_faults.py
"""

import errno
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.usefixtures("prefect_backend")

FLAKY_REWARD = '''
import os

from ppoflow.tasks.arith import reward as arith


def reward(prompts, responses, metadata):
    """The quickstart's reward behind a service that fails its first call (calls counted in a file)."""
    calls = os.environ["PPOFLOW_TEST_REWARD_CALLS"]
    n = os.path.getsize(calls) if os.path.exists(calls) else 0
    with open(calls, "a") as f:
        f.write(".")
    if n == 0:
        raise ConnectionError("reward service unavailable (injected: its first call fails)")
    return arith(prompts, responses, metadata)
'''


def _fail_first_write_of(monkeypatch, suffix: str) -> list[str]:
    """Make the first write of the part file whose path ends in `suffix` leave a torn file and raise OSError, as a
    connection reset halfway through an upload would. Driver-side only: every stage commits from the driver
    (storage/run.py writes each part with pq.write_table). Returns the paths it failed."""
    import pyarrow.parquet as parquet

    real, failed = parquet.write_table, []

    def write_table(table, where, *args, filesystem=None, **kwargs):
        if str(where).endswith(suffix) and not failed:
            failed.append(str(where))
            filesystem.pipe_file(where, b"PAR1 torn")
            raise OSError(errno.ECONNRESET, "injected: connection reset by peer", str(where))
        return real(table, where, *args, filesystem=filesystem, **kwargs)

    monkeypatch.setattr(parquet, "write_table", write_table)
    return failed


def _events(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run / "events").iterdir())]


def _task_runs(flow_run_id) -> dict[str, list]:
    """Task name -> [run_count, final state name] of one flow run, from the Prefect API (which records task runs
    from their events, a moment after they end)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        for _ in range(50):
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            out = {r.name.rsplit("-", 1)[0]: [r.run_count, r.state_name] for r in runs}
            if out and all(state == "Completed" for _, state in out.values()):
                return out
            time.sleep(0.2)
    return out


def _kill_engine_0_after_its_first_chunk(dispatch):
    """`generate_on_engines` as the generate stage calls it, but engine 0 is killed (Ray restarts it: a crash)
    right after the first chunk is sent to it."""
    import ray

    class Dying:
        def __init__(self, handle):
            self.handle, self.killed = handle, False

        @property
        def generate(self):
            return self

        def remote(self, *args):
            ref = self.handle.generate.remote(*args)
            if not self.killed:
                self.killed = True
                ray.kill(self.handle, no_restart=False)
            return ref

    def generate_on_engines(handles, requests, **kwargs):
        return dispatch([Dying(handles[0]), *handles[1:]], requests, **kwargs)

    return generate_on_engines


def _pid(self) -> int:
    return os.getpid()


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_flaky_reward_storage_error_and_dead_engine_each_cost_a_retry_not_the_run(make_config, tmp_path,
                                                                                  monkeypatch):
    import ray

    import workers.engine_pool
    from flows.ppo import ppo_iteration
    from stages.generate import generate
    from stages.setup import close_run, open_run, start_workers
    from workers.engines import engine_name, get_engines

    (tmp_path / "rewards").mkdir()
    (tmp_path / "rewards" / "transient_reward.py").write_text(FLAKY_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path / "rewards"))
    monkeypatch.delitem(sys.modules, "transient_reward", raising=False)
    calls = tmp_path / "reward-calls"
    monkeypatch.setenv("PPOFLOW_TEST_REWARD_CALLS", str(calls))
    torn = _fail_first_write_of(monkeypatch, "iter-000001/advantages/part-00001.parquet")

    # GRPO: no critic to start or train, what is tested here does not involve one
    config = make_config("run_id=transient", "iterations=2", "algo.estimator=group_norm", "generation.backend=hf",
                         "generation.num_engines=2", "generation.num_cpus=0.5", "eval.prompts=null",
                         "reward.fn=transient_reward:reward",
                         "flow.retries=1", "flow.retry_delay_s=0", "storage.rows_per_part=8",
                         "tracking.logger=none")
    opened = open_run(config)
    run_uri, run = opened["run_uri"], Path(opened["run_uri"])
    try:
        start_workers(config, run_uri)

        # Iteration 1: the reward's first call fails, then advantages' second part file.
        state = ppo_iteration(config, run_uri, 1, return_state=True)
        assert state.is_completed()
        assert calls.read_text() == ".."  # score ran twice: failed, then retried
        assert torn == [f"{run}/iter-000001/advantages/part-00001.parquet"]
        tasks = _task_runs(state.state_details.flow_run_id)
        assert tasks["score"] == [2, "Completed"] and tasks["advantages"] == [2, "Completed"], tasks
        assert tasks["generate"] == tasks["update"] == tasks["sync"] == [1, "Completed"], tasks
        ran = [(e["stage"], e["iteration"]) for e in _events(run) if e["action"] == "ran"]
        assert ran == [(s, 1) for s in ("generate", "score", "advantages", "update", "sync")]  # each committed once
        folder = run / "iter-000001" / "advantages"
        parts = [f"part-{i:05d}.parquet" for i in range(4)]
        assert sorted(p.name for p in folder.iterdir()) == ["_SUCCESS.json", *parts]  # the torn file is gone
        marker = json.loads((folder / "_SUCCESS.json").read_text())
        assert [(f["name"], f["rows"]) for f in marker["files"]] == [(p, 8) for p in parts]
        scored = pq.read_table(run / "iter-000001" / "score")
        experience = pq.read_table(folder)
        assert experience.select(scored.column_names).equals(scored)  # every scored row, once, in order

        # What an undisturbed iteration-2 rollout is (the engines serve policy 1 now); uncommitted again after.
        generate(config, run_uri, 2)
        undisturbed = pq.read_table(run / "iter-000002" / "generate").to_pylist()
        shutil.rmtree(run / "iter-000002" / "generate")
        handles = get_engines(run_uri, config.ray.namespace, config.generation.num_engines)
        pids = ray.get([e.__ray_call__.remote(_pid) for e in handles])
        n_events = len(_events(run))

        # Iteration 2: engine 0 dies with a chunk of the rollout in flight.
        monkeypatch.setattr(workers.engine_pool, "generate_on_engines",
                            _kill_engine_0_after_its_first_chunk(workers.engine_pool.generate_on_engines))
        ppo_iteration(config, run_uri, 2)
        for stage in ("generate", "score", "advantages", "update", "sync"):
            assert (run / "iter-000002" / stage / "_SUCCESS.json").exists(), stage
        after = ray.get([e.__ray_call__.remote(_pid) for e in handles])
        assert after[0] != pids[0] and after[1] == pids[1]  # engine 0 is a new process; engine 1 never stopped
        recovered = [e for e in _events(run)[n_events:] if e["action"] == "engine_recovered"]
        assert recovered and {(e["stage"], e["iteration"], e["engine"], e["policy_version"]) for e in recovered} == \
            {("generate", 2, engine_name(run_uri, 0), 1)}
        # it came back from its constructor serving the base model, and was synced to policy 1 before sampling again
        assert (recovered[0]["found_version"], recovered[0]["method"]) == (0, "object_store")
        assert [(e["stage"], e["action"]) for e in _events(run)[n_events:] if e["action"] == "ran"] == \
            [(s, "ran") for s in ("generate", "score", "advantages", "update", "sync")]

        rollout = pq.read_table(run / "iter-000002" / "generate").to_pylist()
        assert [(r["sample_id"], r["response_ids"]) for r in rollout] == \
            [(r["sample_id"], r["response_ids"]) for r in undisturbed]
        assert max(abs(a - b) for r, u in zip(rollout, undisturbed)
                   for a, b in zip(r["engine_logprobs"], u["engine_logprobs"])) < 1e-5
        generated = json.loads((run / "iter-000002" / "generate" / "_SUCCESS.json").read_text())
        assert generated["policy_version"] == 1 and generated["engine_requests"] == 8
        # no sample came from stale weights: the trainer's policy-1 logprobs match every sample's engine logprobs
        scored = json.loads((run / "iter-000002" / "score" / "_SUCCESS.json").read_text())
        assert scored["metrics"]["rollout/logprob_abs_diff_max"] < 1e-3
        sync = pq.read_table(run / "iter-000002" / "sync").to_pylist()
        assert [(r["engine"], r["policy_version"]) for r in sync] == [(engine_name(run_uri, i), 2) for i in range(2)]
    finally:
        close_run(config, run_uri)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_storage_error_mid_commit_is_retried_and_the_stage_commits_once(where, make_config, monkeypatch, request):
    """A stage's commit (stages.common.commit, as every stage calls it) inside a Prefect task with a retry: the first
    attempt dies writing the third part file and leaves two good parts and a torn one uncommitted."""
    import pyarrow as pa
    from prefect import flow, task

    from stages.common import commit, store_of
    from storage.run import run_uri
    from storage.schema import SYNC

    overrides = ["run_id=torn-write", "storage.rows_per_part=2"]
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        overrides += [f"storage.root={bucket.uri('root')}",
                      f"storage.storage_options={json.dumps(bucket.storage_options)}"]
    config = make_config(*overrides)
    uri = run_uri(config.storage.root, config.run_id)
    table = pa.Table.from_pylist([{"engine": f"engine-{i}", "policy_version": 1, "method": "object_store",
                                   "bytes": 100 + i, "seconds": 0.5, "checksum": float(i)} for i in range(7)],
                                 schema=SYNC)
    torn = _fail_first_write_of(monkeypatch, "iter-000001/sync/part-00002.parquet")
    attempts = []

    @task(retries=1, retry_delay_seconds=0)
    def write() -> dict:
        attempts.append(len(attempts) + 1)
        return commit(store_of(config, uri), config, 1, "sync", table, "sync", time.perf_counter(), {})

    @flow
    def one_stage() -> dict:
        return write()

    marker = one_stage()
    assert attempts == [1, 2] and len(torn) == 1
    store = store_of(config, uri)
    parts = [f"part-{i:05d}.parquet" for i in range(4)]
    assert [(f["name"], f["rows"]) for f in marker["files"]] == list(zip(parts, [2, 2, 2, 1]))
    folder = store._path(store.stage_uri(1, "sync"))
    listed = sorted(p.rsplit("/", 1)[-1] for p in store.fs.ls(folder, detail=False, refresh=True))
    assert listed == sorted(["_SUCCESS.json", *parts])  # nothing of the failed attempt is left
    assert store.read_stage(1, "sync").equals(table)
    assert [(e["stage"], e["action"]) for e in store.events()] == [("sync", "ran")]
