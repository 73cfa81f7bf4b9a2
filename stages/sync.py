"""Sync stage: push the updated policy weights into every generation engine, in place, and record the version each
serves (one SYNC row per engine).

The weights travel as safetensors bytes through Ray's object store (policy actor → engine actors, never through
Prefect). `bring_engine_to` is also how generation, evaluation and run start make sure every engine serves the
committed policy. With generation.enable_sleep_mode the engines wake their weights (not their KV cache) for it.

Run alone (a run whose workers are up in this process):  see flows/ppo.py; tests: tests/stages/test_sync.py
"""

import time

from prefect import task
from prefect.cache_policies import NO_CACHE

from stages.common import actor, checkpoint_uri, commit, engines, fault_point, skip_if_committed, store_of


def bring_engine_to(config, store, run_uri: str, version: int) -> list[dict]:
    """Make every engine serve policy `version` (reloading the policy actor from its checkpoint if needed); one SYNC
    row per engine. Each engine reports its own version, so one that was restarted (version 0) is synced again while
    the others are left alone; all engines behind get the same exported weights, concurrently."""
    import ray

    from workers.engines import engine_name

    handles = engines(config, run_uri)
    current = ray.get([e.version.remote() for e in handles])
    rows = [{"engine": engine_name(run_uri, i), "policy_version": version, "method": "already_current", "bytes": 0,
             "seconds": 0.0, "checksum": float("nan")} for i in range(len(handles))]
    behind = [i for i, v in enumerate(current) if v != version]
    if not behind:
        return rows
    t0 = time.perf_counter()
    if config.generation.enable_sleep_mode:  # the weights only: the KV cache stays freed until sampling
        ray.get([handles[i].wake_up.remote(["weights"]) for i in behind])
    policy = actor(config, run_uri, "policy")
    ray.get(policy.ensure_version.remote(version, checkpoint_uri(store, version), config.storage.storage_options))
    weights = policy.export_weights.remote()  # one export in the object store, read by every engine behind
    results = ray.get([handles[i].update_weights.remote(weights, version) for i in behind])
    seconds = time.perf_counter() - t0
    for i, result in zip(behind, results):
        if result["version"] != version:
            raise RuntimeError(f"{rows[i]['engine']} reports version {result['version']} after a sync to {version}")
        rows[i].update(method="object_store", bytes=result["bytes"], seconds=seconds,
                       checksum=float(result.get("checksum", float("nan"))))
    return rows


def sync(config, run_uri: str, iteration: int) -> dict:
    import pyarrow as pa

    from storage.schema import SYNC

    store = store_of(config, run_uri)
    if (done := skip_if_committed(store, iteration, "sync")) is not None:
        return done
    started = time.perf_counter()
    fault_point("sync.start", iteration)
    rows = bring_engine_to(config, store, run_uri, iteration)
    fault_point("sync.before_commit", iteration)
    metrics = {"perf/sync_s": max(r["seconds"] for r in rows), "perf/sync_bytes": sum(r["bytes"] for r in rows)}
    return commit(store, config, iteration, "sync", pa.Table.from_pylist(rows, schema=SYNC), "sync", started,
                  metrics, policy_version=iteration)


@task(name="sync", cache_policy=NO_CACHE)
def sync_task(config, run_uri: str, iteration: int) -> dict:
    return sync(config, run_uri, iteration)
