"""Sync stage: push the updated policy weights into the generation engine, in place, and record the version it serves.

The weights travel as safetensors bytes through Ray's object store (policy actor → engine actor, never through
Prefect). `bring_engine_to` is also how generation and run start make sure the engine serves the committed policy.

Run alone (a run whose workers are up in this process):  see flows/ppo.py; tests: tests/stages/test_sync.py
"""

import time

from prefect import task
from prefect.cache_policies import NO_CACHE

from stages.common import actor, checkpoint_uri, commit, fault_point, skip_if_committed, store_of


def bring_engine_to(config, store, run_uri: str, version: int) -> dict:
    """Make the engine serve policy `version` (reloading the policy actor from its checkpoint if needed)."""
    import ray

    engine, policy = actor(config, run_uri, "engine"), actor(config, run_uri, "policy")
    current = ray.get(engine.version.remote())
    row = {"engine": "engine", "policy_version": version, "method": "already_current", "bytes": 0, "seconds": 0.0,
           "checksum": float("nan")}
    if current == version:
        return row
    t0 = time.perf_counter()
    ray.get(policy.ensure_version.remote(version, checkpoint_uri(store, version), config.storage.storage_options))
    weights = policy.export_weights.remote()
    result = ray.get(engine.update_weights.remote(weights, version))
    if result["version"] != version:
        raise RuntimeError(f"engine reports version {result['version']} after a sync to {version}")
    row.update(method="object_store", bytes=result["bytes"], seconds=time.perf_counter() - t0,
               checksum=float(result.get("checksum", float("nan"))))
    return row


def sync(config, run_uri: str, iteration: int) -> dict:
    import pyarrow as pa

    from storage.schema import SYNC

    store = store_of(config, run_uri)
    if (done := skip_if_committed(store, iteration, "sync")) is not None:
        return done
    started = time.perf_counter()
    fault_point("sync.start", iteration)
    row = bring_engine_to(config, store, run_uri, iteration)
    fault_point("sync.before_commit", iteration)
    metrics = {"perf/sync_s": row["seconds"], "perf/sync_bytes": row["bytes"]}
    return commit(store, config, iteration, "sync", pa.Table.from_pylist([row], schema=SYNC), "sync", started,
                  metrics, policy_version=iteration)


@task(name="sync", cache_policy=NO_CACHE)
def sync_task(config, run_uri: str, iteration: int) -> dict:
    return sync(config, run_uri, iteration)
