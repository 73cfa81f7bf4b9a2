"""Sync stage: push the updated policy weights into every generation engine, in place, and record the version each
serves (one SYNC row per engine).

The weights travel by `generation.weight_sync`: broadcast in buckets from trainer rank 0 over a group of its own
(workers/weight_sync.py; gloo on CPU, NCCL on GPU), safetensors bytes through Ray's object store, or the checkpoint's
HF export in storage; never through Prefect. After a broadcast or storage sync both sides' sums of a sample of
tensors (and, for the broadcast, of all of them) must match, or the sync fails naming the engine and tensor.
`bring_engine_to` is also how generation, evaluation and run start make sure every engine serves the committed
policy. With generation.enable_sleep_mode the engines wake their weights (not their KV cache) for it.

Run alone (a run whose workers are up in this process):  see flows/ppo.py; tests: tests/stages/test_sync.py
"""

import time

from prefect import task
from prefect.cache_policies import NO_CACHE

from stages.common import (checkpoint_uri, commit, engines, fault_point, on_all_ranks, skip_if_committed, stage_errors,
                           store_of, trainer_group)


SYNC_TIMEOUT_S = 900.0
"""Bound on each wait for the trainers and engines during a sync (the sync group's own timeout is shorter)."""


def bring_engine_to(config, store, run_uri: str, version: int, fault_stage: str | None = None) -> list[dict]:
    """Make every engine serve policy `version` (reloading the policy actor from its checkpoint if needed); one SYNC
    row per engine. Each engine reports its own version, so one that was restarted (version 0) is synced again while
    the others are left alone; all engines behind get the same weights, concurrently, by `generation.weight_sync`'s
    route (`object_store` instead of `storage` for version 0, which has no export in storage, and instead of
    `broadcast` when engines hold GPU fractions, or `ipc` from the policy rank on the engine's GPU; see
    GenerationConfig.weight_sync). `fault_stage` names
    the fault point between the policy's side and the engines' update (`{fault_stage}.before_engine_update`)."""
    import ray

    from workers.engines import engine_name, engine_versions

    handles = engines(config, run_uri)
    current = engine_versions(handles)  # waits for an engine that Ray is restarting
    rows = [{"engine": engine_name(run_uri, i), "policy_version": version, "method": "already_current", "bytes": 0,
             "seconds": 0.0, "checksum": float("nan")} for i in range(len(handles))]
    behind = [i for i, v in enumerate(current) if v != version]
    if not behind:
        return rows
    t0 = time.perf_counter()
    if config.generation.enable_sleep_mode:  # the weights only: the KV cache stays freed until sampling
        ray.get([handles[i].wake_up.remote(["weights"]) for i in behind])
    policy = trainer_group(config, run_uri, "policy")
    ray.get(on_all_ranks(policy, "ensure_version", version, checkpoint_uri(store, version),
                         config.storage.storage_options))
    route = config.generation.weight_sync
    if route == "storage" and version == 0:
        route = "object_store"
    gen = config.generation
    if route == "broadcast" and 0 < gen.num_gpus < 1:  # an engine may share trainer rank 0's GPU: no NCCL group
        colocated = gen.placement == "hybrid" and gen.backend == "hf" and gen.num_engines == config.policy.num_ranks
        route = "ipc" if colocated else "object_store"
    targets, names = [handles[i] for i in behind], [rows[i]["engine"] for i in behind]
    if route == "ipc":
        results = _via_ipc(config, policy, targets, behind, names, version, fault_stage)
    else:
        send = {"broadcast": _broadcast, "object_store": _via_object_store, "storage": _via_storage}[route]
        results = send(config, store, policy, targets, names, version, fault_stage)
    seconds = time.perf_counter() - t0
    for i, result in zip(behind, results):
        if result["version"] != version:
            raise RuntimeError(f"{rows[i]['engine']} reports version {result['version']} after a sync to {version}")
        rows[i].update(method=route, bytes=result["bytes"], seconds=seconds,
                       checksum=float(result.get("checksum", float("nan"))))
    return rows


def _via_object_store(config, store, policy, targets, names, version, fault_stage) -> list[dict]:
    # One export in the object store, read by every engine behind: rank 0's (every rank takes part in a ZeRO-3
    # gather; the others return None).
    import ray

    weights, *others = on_all_ranks(policy, "export_weights")
    if fault_stage is not None:
        fault_point(f"{fault_stage}.before_engine_update", version)
    results = ray.get([e.update_weights.remote(weights, version) for e in targets], timeout=SYNC_TIMEOUT_S)
    ray.get(others, timeout=SYNC_TIMEOUT_S)
    return results


def _via_storage(config, store, policy, targets, names, version, fault_stage) -> list[dict]:
    # The engines read the HF export committed with the checkpoint (update wrote it); the trainer, which
    # ensure_version put at `version`, gives the sums the engines' sample must match.
    import ray

    from workers.weight_sync import sample_names, verify

    sample = sample_names(ray.get(policy[0].weight_sync_plan.remote(), timeout=SYNC_TIMEOUT_S), version)
    sent = {"sample_sums": ray.get(on_all_ranks(policy, "weight_sums", sample), timeout=SYNC_TIMEOUT_S)[0]}
    if fault_stage is not None:
        fault_point(f"{fault_stage}.before_engine_update", version)
    uri = f"{checkpoint_uri(store, version)}/hf"
    results = ray.get([e.update_weights_from_uri.remote(uri, version, config.storage.storage_options, sample)
                       for e in targets], timeout=SYNC_TIMEOUT_S)
    for name, result in zip(names, results):
        verify(sent, result, name)
    return [{**r, "bytes": 0} for r in results]  # nothing was sent: the engines read storage


def _via_ipc(config, policy, targets, indices, names, version, fault_stage) -> list[dict]:
    # Hybrid placement on GPUs: engine i shares GPU i with policy rank i, which copies the weights into bucket buffers
    # of its own (every rank holds them whole, or gathers them under ZeRO-3) and hands the engine their CUDA IPC
    # handles: a device-to-device copy in the engine, no transfer, no NCCL group (it refuses two ranks on one GPU).
    import ray

    from workers.weight_sync import sample_names, verify

    bucket_mb = config.generation.weight_sync_bucket_mb
    plan = ray.get(policy[0].weight_sync_plan.remote(), timeout=SYNC_TIMEOUT_S)
    sample = sample_names(plan, version)
    shared = ray.get(on_all_ranks(policy, "share_weights", plan, bucket_mb, sample), timeout=SYNC_TIMEOUT_S)
    try:
        if fault_stage is not None:
            fault_point(f"{fault_stage}.before_engine_update", version)
        results = ray.get([e.receive_shared_weights.remote(shared[i], plan, bucket_mb, sample, version)
                           for e, i in zip(targets, indices)], timeout=SYNC_TIMEOUT_S)
    finally:
        ray.get(on_all_ranks(policy, "release_shared_weights"), timeout=SYNC_TIMEOUT_S)
    for name, i, result in zip(names, indices, results):
        verify(shared[i], result, name)
    return [{**r, "bytes": shared[i]["bytes"]} for i, r in zip(indices, results)]


def _broadcast(config, store, policy, targets, names, version, fault_stage) -> list[dict]:
    # Trainer rank 0 and the engines behind form one group (workers/weight_sync.py), kept across syncs while the
    # same engines are behind and every one of them still holds it (a restarted engine or trainer holds none, and
    # the group is rebuilt). Sender and receivers block in the same broadcasts, so their calls go out together.
    import ray

    from workers.weight_sync import sample_names, verify

    gen = config.generation
    tp = gen.tensor_parallel_size
    held = ray.get([e.sync_group_id.remote() for e in targets], timeout=SYNC_TIMEOUT_S)
    reuse = held[0] if len(set(held)) == 1 else None
    group = ray.get(policy[0].open_weight_sync.remote(names, reuse), timeout=SYNC_TIMEOUT_S)
    plan = ray.get(policy[0].weight_sync_plan.remote(), timeout=SYNC_TIMEOUT_S)
    spec = {**group, "world_size": 1 + len(targets) * tp, "plan": plan, "bucket_mb": gen.weight_sync_bucket_mb,
            "sample": sample_names(plan, version)}
    if fault_stage is not None:
        fault_point(f"{fault_stage}.before_engine_update", version)
    sending = on_all_ranks(policy, "broadcast_weights", spec)
    receiving = [e.receive_weights.remote({**spec, "rank": 1 + j * tp}, version) for j, e in enumerate(targets)]
    try:
        results = ray.get(receiving, timeout=SYNC_TIMEOUT_S)
    finally:
        sent = ray.get(sending, timeout=SYNC_TIMEOUT_S)[0]  # a failed receiver fails the sender at its timeout
    for name, result in zip(names, results):
        verify(sent, result, name)
    return [{**r, "bytes": sent["bytes"]} for r in results]


def engine_recovery(config, store, run_uri: str, version: int, stage: str, iteration: int):
    """The `on_engine_lost(i, error)` of `generate_on_engines` for a stage sampling policy `version`: wait until Ray
    has restarted engine i, bring it to `version`, and record an `engine_recovered` event (engine, error, the version
    it came back with, how it was synced). Raises when the engine is gone for good or not back in time, failing the
    stage: its task retry starts the stage over from what is committed."""

    def recover(index: int, error: Exception) -> None:
        import ray

        from stages.common import logger
        from workers.engines import engine_versions

        handle = engines(config, run_uri)[index]
        found = engine_versions([handle])[0]
        rows = bring_engine_to(config, store, run_uri, version)
        if config.generation.enable_sleep_mode:  # sampling needs the KV cache too
            ray.get(handle.wake_up.remote(["weights", "kv_cache"]))
        row = rows[index]
        logger().warning("%s: %s lost a chunk (%s); it serves version %d again (found %d, %s) and the chunk is resent",
                         stage, row["engine"], type(error).__name__, version, found, row["method"])
        store.record_event(stage=stage, iteration=iteration, action="engine_recovered", engine=row["engine"],
                           error=type(error).__name__, found_version=found, policy_version=version,
                           method=row["method"])

    return recover


def sync(config, run_uri: str, iteration: int) -> dict:
    import pyarrow as pa

    from storage.schema import SYNC

    store = store_of(config, run_uri)
    if (done := skip_if_committed(store, iteration, "sync")) is not None:
        return done
    started = time.perf_counter()
    fault_point("sync.start", iteration)
    rows = bring_engine_to(config, store, run_uri, iteration, fault_stage="sync")
    fault_point("sync.before_commit", iteration)
    metrics = {"perf/sync_s": max(r["seconds"] for r in rows), "perf/sync_bytes": sum(r["bytes"] for r in rows)}
    marker = commit(store, config, iteration, "sync", pa.Table.from_pylist(rows, schema=SYNC), "sync", started,
                    metrics, policy_version=iteration)
    fault_point("sync.after_commit", iteration)
    return marker


@task(name="sync", task_run_name="sync-{iteration}", cache_policy=NO_CACHE)
@stage_errors
def sync_task(config, run_uri: str, iteration: int) -> dict:
    return sync(config, run_uri, iteration)
