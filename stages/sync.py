"""Sync stage: push the updated policy weights into every generation engine, in place, and record the version each
serves (one SYNC row per engine).

The weights travel by `generation.weight_sync` (workers/engine_pool.py `EnginePool.bring_to`: broadcast in buckets
from trainer rank 0 over a group of its own, safetensors bytes through Ray's object store, the checkpoint's HF export
in storage, or CUDA IPC between a policy rank and the engine on its GPU); never through Prefect. Both sides' sums of
a sample of tensors must match, or the sync fails naming the engine and tensor. With generation.enable_sleep_mode the
engines wake their weights (not their KV cache) for it.

Run alone (a run whose workers are up in this process): see flows/ppo.py; tests: tests/workers/test_weight_sync.py
(each route), tests/flows/test_fault_harness.py (a crash inside the sync)
"""

from stages.common import Output, StageRun, stage


@stage("sync", schema="sync")
def sync(s: StageRun) -> Output:
    import pyarrow as pa

    from storage.schema import SYNC

    rows = s.engines().bring_to(s.iteration, fault_stage="sync")
    metrics = {"perf/sync_s": max(r["seconds"] for r in rows), "perf/sync_bytes": sum(r["bytes"] for r in rows)}
    return Output(pa.Table.from_pylist(rows, schema=SYNC), metrics, {"policy_version": s.iteration})


sync_task = sync.task
