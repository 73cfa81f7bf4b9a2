"""Sync stage: push the updated policy weights into every generation engine, in place, and record the version each
serves (one SYNC row per engine).

The weights travel by `generation.weight_sync` (workers/engine_pool.py `EnginePool.bring_to`: broadcast in buckets
from trainer rank 0 over a group of its own, safetensors bytes through Ray's object store, the checkpoint's HF export
in storage, or CUDA IPC between a policy rank and the engine on its GPU); never through Prefect. Both sides' sums of
a sample of tensors must match, or the sync fails naming the engine and tensor. With generation.enable_sleep_mode the
engines wake their weights (not their KV cache) for it.

With algo.max_staleness = S ≥ 1 (stages/pipeline.py) the engines sample iteration n+S from version n−1 until the
sync of n: it refuses to run before that rollout is committed, and checks the new version with the logprob gate
(`probe_engines`) before it commits. A committed sync that is called again is skipped and brings the engines to its
version (what a resumed pipelined run does before its first iteration).

Run alone (a run whose workers are up in this process): see flows/ppo.py; tests: tests/workers/test_weight_sync.py
(each route), tests/flows/test_fault_harness.py (a crash inside the sync)
"""

from stages.common import Output, StageRun, stage, trainers_lock
from stages.score import _retry_unless_gate


def _serve(s: StageRun) -> None:
    with trainers_lock(s.run_uri):  # moves the policy when the engines serve another version
        s.engines().bring_to(s.iteration)


@stage("sync", schema="sync", on_skip=_serve, trainers=True, retry_condition_fn=_retry_unless_gate)
def sync(s: StageRun) -> Output:
    import pyarrow as pa

    from stages.pipeline import probe_engines
    from storage.schema import SYNC

    stale, ahead = s.config.algo.max_staleness, s.iteration + s.config.algo.max_staleness
    if stale and ahead <= s.config.iterations and s.store.stage_marker(ahead, "generate") is None:
        raise RuntimeError(f"sync of iteration {s.iteration}: the rollout of iteration {ahead} is not committed, and "
                           f"with algo.max_staleness = {stale} it samples from version {s.iteration - 1}, which this "
                           "sync would replace under it; run generate of that iteration first (flows/ppo.py does)")
    rows = s.engines().bring_to(s.iteration, fault_stage="sync")
    metrics = {"perf/sync_s": max(r["seconds"] for r in rows), "perf/sync_bytes": sum(r["bytes"] for r in rows)}
    fields = {"policy_version": s.iteration}
    if stale:
        probe = probe_engines(s, s.iteration)
        fields["engine_requests"] = probe.pop("requests")
        metrics.update(probe)
    return Output(pa.Table.from_pylist(rows, schema=SYNC), metrics, fields)


sync_task = sync.task
