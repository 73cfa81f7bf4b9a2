"""The pipelined flow (algo.max_staleness = 1) on the real stack (Ray, DeepSpeed, Prefect; the HF engine, which starts
in seconds): generation of iteration n+1 overlaps the trainers' work on n, and the run is still a function of its seed.

- Two runs with one seed commit identical tables, stage by stage, to the last bit; a third, whose engine is killed
  while it samples beside the trainers (Ray restarts it; the generate stage re-syncs it under the trainer lock and
  resends its requests), commits them too.
- The overlap is real (Prefect's task runs: generate-3 starts before update-2 ends and ends before sync-2 starts),
  every rollout records the version it came from and its staleness, stale tokens carry the decoupled IS weight, and
  each sync checks its version with the logprob gate's probe.
- A sync that reports success but moved no weights is caught by that probe before it commits.

Crashes (SIGKILL while both lanes are in flight): tests/flows/test_fault_harness.py.
Run alone:  .venv/bin/pytest -q tests/flows/test_async.py
"""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.ppo import ppo_train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_backend", "ray_session")]

STAGES = ("generate", "score", "advantages", "update", "sync")
RUN_FACTS = {"sync": {"engine", "seconds", "method"}}  # how the run went, not what it computed: compared apart


def _task_times(flow_run_id) -> dict:
    """{task run name: (start, end)} of a flow run, from the Prefect API (recorded a moment after the runs end)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        for _ in range(50):
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            if runs and all(r.state_name == "Completed" for r in runs):
                break
            time.sleep(0.2)
    return {r.name: (r.start_time, r.end_time) for r in runs}


def _events(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run / "events").iterdir())]


def _marker(run: Path, n: int, stage: str) -> dict:
    return json.loads((run / f"iter-{n:06d}" / stage / "_SUCCESS.json").read_text())


def _assert_same_tables(run: Path, ref: Path, stages, iterations: int = 3) -> None:
    for n in range(1, iterations + 1):
        for stage in stages:
            got, want = pq.read_table(run / f"iter-{n:06d}" / stage), pq.read_table(ref / f"iter-{n:06d}" / stage)
            assert got.schema.equals(want.schema) and got.num_rows == want.num_rows, (run.name, n, stage)
            for column in set(got.column_names) - RUN_FACTS.get(stage, set()):
                assert got[column].equals(want[column]), f"{run.name} iteration {n} {stage}.{column} differs"


def _lose_engine_on_call(dispatch, call: int, lost: list):
    """`generate_on_engines`, but on its `call`-th use the engine that takes the first chunk is killed right after
    (Ray restarts it: a crash), with the chunk in flight."""
    import ray

    calls = [0]

    class Dying:
        def __init__(self, handle):
            self.handle = handle

        @property
        def generate(self):
            return self

        def remote(self, *args):
            ref = self.handle.generate.remote(*args)
            if not lost:
                lost.append(self.handle)
                ray.kill(self.handle, no_restart=False)
            return ref

    def generate_on_engines(handles, requests, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            handles = [Dying(handles[0]), *handles[1:]]
        return dispatch(handles, requests, **kwargs)

    return generate_on_engines


def test_staleness_1_overlaps_and_is_a_function_of_the_seed(make_config, monkeypatch):
    import workers.engine_pool
    from stages.score import max_logprob_gap

    def config(run_id: str, *extra: str):
        return make_config(f"run_id={run_id}", "iterations=3", "algo.max_staleness=1", "generation.backend=hf",
                           "tracking.logger=none", *extra)

    state = ppo_train(config=config("a"), return_state=True)
    a = Path(state.result()["run_uri"])
    tasks = _task_times(state.state_details.flow_run_id)
    # Prefect shows every stage of every iteration as its task run, the generate tasks of 2 and 3 beside the
    # trainers' stages of 1 and 2, each finished before the sync that changes the engines' weights.
    assert {f"{s}-{n}" for s in (*STAGES, "evaluate", "report") for n in (1, 2, 3)} <= set(tasks), sorted(tasks)
    for n in (1, 2):
        assert tasks[f"generate-{n + 1}"][0] < tasks[f"update-{n}"][1], (n, tasks)
        assert tasks[f"generate-{n + 1}"][1] <= tasks[f"sync-{n}"][0], (n, tasks)
    assert tasks["sync-1"][1] <= tasks["generate-3"][0]  # which samples from the version sync 1 brought

    cfg = config("a")
    assert json.loads((a / "run.json").read_text())["config"]["algo"]["is_correction"] == "tis"  # the default here
    bound = max_logprob_gap(cfg)
    for n, version in ((1, 0), (2, 0), (3, 1)):
        rollout = pq.read_table(a / f"iter-{n:06d}" / "generate")
        assert set(rollout["policy_version"].to_pylist()) == {version}
        assert set(rollout["staleness"].to_pylist()) == {n - 1 - version}
        assert _marker(a, n, "generate")["metrics"]["rollout/staleness"] == n - 1 - version
        scored = _marker(a, n, "score")["metrics"]
        assert scored["rollout/staleness"] == n - 1 - version
        synced = _marker(a, n, "sync")
        # each new version checked on the engine before a rollout is drawn from it: the probe's gap is fp32 noise
        assert 1.0 <= synced["metrics"]["sync/probe_logprob_diff_mean"] < 1.001 < bound, synced["metrics"]
        assert synced["engine_requests"] == 4
    assert _marker(a, 1, "score")["metrics"]["rollout/logprob_diff_mean"] < 1.001  # staleness 0: gated as always
    # Stale tokens: the engine's policy is one update behind π_old, so the IS weight is not 1 everywhere.
    update2 = pq.read_table(a / "iter-000002" / "update").to_pylist()
    weights = [r["value"] for r in update2 if r["name"] == "ppo/is_weight_mean"]
    assert weights and all(0 < w <= cfg.algo.is_cap for w in weights) and any(w != 1.0 for w in weights), weights
    ran = [(e["stage"], e["iteration"]) for e in _events(a) if e["action"] == "ran"]
    assert sorted(ran) == sorted({(s, n) for s in (*STAGES, "eval") for n in (1, 2, 3)} | {("eval", 0)})

    # The same seed again: the same tables, to the bit, whatever the timing of the overlap was.
    b = Path(ppo_train(config=config("b"))["run_uri"])
    _assert_same_tables(b, a, (*STAGES, "eval"))

    # The engine killed while it samples iteration 3's rollout, beside the trainers' stages of iteration 2 (calls of
    # generate_on_engines without evaluation: generate 1, 2, 3): the restarted engine is synced back to policy 1
    # under the trainers' lock, sampled again, and the run commits what the undisturbed ones did.
    lost: list = []
    monkeypatch.setattr(workers.engine_pool, "generate_on_engines",
                        _lose_engine_on_call(workers.engine_pool.generate_on_engines, 3, lost))
    c = Path(ppo_train(config=config("c", "eval.prompts=null"))["run_uri"])
    assert lost, "no engine was killed"
    recovered = [e for e in _events(c) if e["action"] == "engine_recovered"]
    assert [(e["stage"], e["iteration"], e["found_version"], e["policy_version"]) for e in recovered] == \
        [("generate", 3, 0, 1)]
    _assert_same_tables(c, a, STAGES)


def test_a_sync_that_moved_no_weights_is_caught_by_the_probe(make_config):
    import ray

    from stages.advantages import advantages
    from stages.common import store_of
    from stages.generate import generate
    from stages.score import LogprobGateError, score
    from stages.setup import close_run, open_run, start_workers
    from stages.sync import sync
    from stages.update import update
    from workers.cluster import get_actor
    from workers.engine_pool import EnginePool

    # lr 1e-3: one update moves the policy unmistakably (GAE: the random model's rewards are all 0, and a group
    # estimator would give it no advantage to move by).
    config = make_config("run_id=probe", "iterations=2", "algo.max_staleness=1", "generation.backend=hf",
                         "policy.lr=1e-3", "eval.prompts=null", "tracking.logger=none")
    opened = open_run(config)
    run_uri, run = opened["run_uri"], Path(opened["run_uri"])
    try:
        start_workers(config, run_uri)
        pool = EnginePool(config, run_uri, store_of(config, run_uri))
        (engine,), policy = pool.handles, get_actor(run_uri, "policy", config.ray.namespace)
        generate(config, run_uri, 1)
        generate(config, run_uri, 2)  # staleness 1: from the base policy, like iteration 1's
        score(config, run_uri, 1)
        advantages(config, run_uri, 1)
        old_weights = policy.export_weights.remote()  # version 0, before the update
        update(config, run_uri, 1)
        ray.get(engine.update_weights.remote(old_weights, 1))  # says version 1, holds version 0
        with pytest.raises(LogprobGateError) as err:
            print(sync(config, run_uri, 1))  # what it committed, if it did
        msg = str(err.value)
        for part in ("sync of iteration 1: logprob gate failed", "at policy version 1", "algo.max_staleness = 1",
                     "was not committed"):
            assert part in msg, (part, msg)
        assert float(msg.split("sync/probe_logprob_diff_mean = ")[1].split()[0]) > 1.05
        assert not (run / "iter-000001" / "sync" / "_SUCCESS.json").exists()

        ray.get(engine.update_weights.remote(old_weights, 0))  # what a fresh engine holds; the next sync is real
        marker = sync(config, run_uri, 1)
        assert [r["method"] for r in pq.read_table(run / "iter-000001" / "sync").to_pylist()] == ["object_store"]
        assert marker["metrics"]["sync/probe_logprob_diff_mean"] < 1.001
    finally:
        close_run(config, run_uri)
