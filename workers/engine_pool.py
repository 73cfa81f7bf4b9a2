"""A run's generation engines seen from the driver, as one pool: find them, bring them to a policy version (the weight
sync routes), sample on them (chunks dispatched to the least loaded engine; a lost engine recovered and its chunk
sent again), and free or restore their GPU memory (sleep mode). The stages (generate, evaluate, sync, run start) go
through `EnginePool` and nothing else; the engine actors themselves are workers/vllm_engine.py and hf_engine.py,
created by workers/engines.py.

Weight sync routes (`generation.weight_sync`, see GenerationConfig): `broadcast` from trainer rank 0 over a group of
its own (workers/weight_sync.py; gloo on CPU, NCCL on GPU), `object_store` (one safetensors export through Ray's
object store), `storage` (the engines read the checkpoint's HF export), and `ipc` (engine i on a fraction of the GPU
that policy rank i holds, e.g. hybrid placement: it loads from that rank's GPU memory through CUDA IPC handles).
Every route but the object store checks both sides' sums of a sample of tensors.

Run alone: nothing to run; tests/workers/test_engine_group.py and test_weight_sync.py drive it on real engines.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from storage.faults import fault_point
from workers.cluster import get_group, on_all_ranks, weight_route
from workers.engines import engine_name, engine_versions, get_engines
from workers.trainers import TrainerPool

SYNC_TIMEOUT_S = 900.0
"""Bound on each wait for the trainers and engines during a sync (the sync group's own timeout is shorter)."""

CHUNKS_PER_ENGINE = 4
"""With several engines a batch is cut into about this many chunks per engine: enough for a fast engine to take over
a slow one's share, few enough that each chunk is still a large batch for vLLM."""


def generate_on_engines(engines: list, requests: list[dict], chunk_size: int | None = None,
                        timeout_s: float | None = None, version: int | None = None,
                        on_engine_lost: Callable | None = None) -> list[list[dict]]:
    """Results of `requests` (engine.generate's contract) in request order, from several engines: chunks of
    `chunk_size` requests (default: all of them for one engine, else about CHUNKS_PER_ENGINE chunks per engine), each
    sent to the engine with the fewest outstanding requests.

    Each engine holds at most two chunks at a time (one running, one waiting, so it never idles between them); the
    others wait here and go to whichever engine finishes first (ray.wait). Requests carry their own seeds, so
    a request's samples do not depend on which engine serves it. `timeout_s` bounds each wait (TimeoutError).

    `version`, the policy the samples must come from, travels with every chunk: an engine serving another refuses
    the chunk (EngineVersionError) rather than sample from the wrong weights. A chunk lost with its engine (it died:
    RayActorError) or refused that way is handed to `on_engine_lost(i, error)`, which must bring engine i back to
    `version` or raise (`EnginePool.recovery`); the chunk is then sent again, and since its seeds decide its
    samples the call returns what an undisturbed one would. Without the callback those errors propagate. Deaths are
    bounded by Ray's restarts (generation.max_engine_restarts): past them the callback raises."""
    import ray
    from ray.exceptions import RayActorError

    from workers.engine import EngineVersionError

    if not requests:
        return []
    if chunk_size is None:
        per = len(requests) if len(engines) == 1 else -(-len(requests) // (len(engines) * CHUNKS_PER_ENGINE))
        chunk_size = max(1, per)
    pending = [(start, requests[start:start + chunk_size]) for start in range(0, len(requests), chunk_size)]
    pending.reverse()  # pop() takes the first chunk
    outstanding = [0] * len(engines)  # requests sent to engine i and not yet returned
    chunks_held = [0] * len(engines)
    in_flight: dict = {}  # ObjectRef -> (engine index, start, chunk length)
    results: list = [None] * len(requests)
    while pending or in_flight:
        while pending:
            free = [i for i in range(len(engines)) if chunks_held[i] < 2]
            if not free:
                break
            i = min(free, key=lambda e: (outstanding[e], e))
            start, chunk = pending.pop()
            ref = engines[i].generate.remote(chunk) if version is None else engines[i].generate.remote(chunk, version)
            in_flight[ref] = (i, start, len(chunk))
            outstanding[i] += len(chunk)
            chunks_held[i] += 1
        done, _ = ray.wait(list(in_flight), num_returns=1, timeout=timeout_s)
        if not done:
            raise TimeoutError(f"generate: no engine returned a chunk within {timeout_s} s "
                               f"({sum(outstanding)} requests outstanding)")
        i, start, length = in_flight.pop(done[0])
        outstanding[i] -= length
        chunks_held[i] -= 1
        try:
            results[start:start + length] = ray.get(done[0])
        except (RayActorError, EngineVersionError) as err:
            if on_engine_lost is None:
                raise
            on_engine_lost(i, err)  # blocks; the other engines keep sampling what they hold
            pending.append((start, requests[start:start + length]))  # the next chunk sent
    return results


def check_serving(handles: list, version: int) -> int:
    """`version`, after checking that every engine serves it: a sample from an engine behind the committed policy
    would be trained on as if the current policy had drawn it."""
    import ray

    served = ray.get([e.version.remote() for e in handles])
    behind = {i: v for i, v in enumerate(served) if v != version}
    if behind:
        raise RuntimeError(f"engines {sorted(behind)} serve policy versions {sorted(set(behind.values()))}, not the "
                           f"committed {version}: bring them to it first (EnginePool.bring_to)")
    return version


class EnginePool:
    """The engines of one run (`generation.num_engines` of them, found by name) and the policy group that feeds
    them. `config` is the RunConfig; `store` the run's RunStore (checkpoints to reload from, events to record);
    `log(msg, *args)` where recoveries are reported (the stage's Prefect logger)."""

    def __init__(self, config, run_uri: str, store, log: Callable | None = None):
        self.config, self.run_uri, self.store = config, run_uri, store
        self.log = log or logging.getLogger("ppoflow.engines").warning

    @functools.cached_property
    def handles(self) -> list:
        """The engines' actor handles, looked up by name once per pool (a stage makes one): each lookup is a round
        trip to Ray's GCS, and a handle stays good when Ray restarts its engine."""
        return get_engines(self.run_uri, self.config.ray.namespace, self.config.generation.num_engines)

    def _policy(self) -> list:
        return get_group(self.run_uri, "policy", self.config.ray.namespace, self.config.policy.num_ranks)

    # ---- sampling ---------------------------------------------------------------------------------------
    def chunk_size(self, n_requests: int) -> int | None:
        """The dispatcher's chunk size for this backend: None (CHUNKS_PER_ENGINE chunks per engine) for vLLM, whose
        continuous batching keeps a stream of chunks busy; one chunk per engine for the HF engine, which decodes a
        chunk as one padded batch, a kernel launch per token whatever its size, so a few large chunks beat many
        small ones (bench/RESULTS.md)."""
        if self.config.generation.backend == "vllm":
            return None
        return max(1, -(-n_requests // self.config.generation.num_engines))

    def generate(self, requests: list[dict], version: int, stage: str, iteration: int,
                 guard: Callable[[], AbstractContextManager] | None = None) -> list[list[dict]]:
        """Sample `requests` on every engine, each chunk from policy `version`; an engine lost on the way is brought
        back to `version` and its chunk resent (`recovery`), so the result is what an undisturbed call returns.
        `guard()`: a context each recovery runs in (the generate stage's trainer lock: bringing a restarted engine
        back moves the policy, which the trainer stages beside a pipelined generate also use)."""
        recover = self.recovery(version, stage, iteration)
        if guard is not None:
            unguarded = recover

            def recover(index: int, error: Exception) -> None:
                with guard():
                    unguarded(index, error)

        return generate_on_engines(self.handles, requests, chunk_size=self.chunk_size(len(requests)),
                                   version=version, on_engine_lost=recover)

    def recovery(self, version: int, stage: str, iteration: int) -> Callable:
        """The `on_engine_lost(i, error)` of `generate_on_engines` for a stage sampling policy `version`: wait until
        Ray has restarted engine i, bring it to `version`, and record an `engine_recovered` event (engine, error, the
        version it came back with, how it was synced). Raises when the engine is gone for good or not back in time,
        failing the stage: its task retry starts the stage over from what is committed."""

        def recover(index: int, error: Exception) -> None:
            import ray

            handle = self.handles[index]
            found = engine_versions([handle])[0]
            rows = self.bring_to(version)
            if self.config.generation.enable_sleep_mode:  # sampling needs the KV cache too
                ray.get(handle.wake_up.remote(["weights", "kv_cache"]))
            row = rows[index]
            self.log("%s: %s lost a chunk (%s); it serves version %d again (found %d, %s) and the chunk is resent",
                     stage, row["engine"], type(error).__name__, version, found, row["method"])
            self.store.record_event(stage=stage, iteration=iteration, action="engine_recovered", engine=row["engine"],
                                    error=type(error).__name__, found_version=found, policy_version=version,
                                    method=row["method"])

        return recover

    # ---- sleep mode -------------------------------------------------------------------------------------
    def wake(self, tags: tuple[str, ...] = ("weights", "kv_cache")) -> None:
        """With generation.enable_sleep_mode, bring back what the engines freed (both before sampling)."""
        import ray

        if self.config.generation.enable_sleep_mode:
            ray.get([e.wake_up.remote(list(tags)) for e in self.handles])

    def sleep(self) -> None:
        """With generation.enable_sleep_mode, free the engines' GPU memory for the trainers (score, update) until the
        sync wakes their weights and the next sampling their KV cache."""
        import ray

        if self.config.generation.enable_sleep_mode:
            ray.get([e.sleep.remote() for e in self.handles])

    # ---- weight sync ------------------------------------------------------------------------------------
    def bring_to(self, version: int, fault_stage: str | None = None) -> list[dict]:
        """Make every engine serve policy `version` (reloading the policy actors from its checkpoint if needed); one
        SYNC row per engine (the policy group is brought to `version` first, workers/trainers.py). Each engine reports
        its own version, so one that was restarted (version 0) is synced
        again while the others are left alone; all engines behind get the same weights, concurrently, by
        `generation.weight_sync`'s route (`object_store` instead of `storage` for a version without a whole HF export
        in storage, e.g. version 0; for `broadcast` with engines on GPU fractions, the route `weight_route` picks from
        where Ray put the engines and the policy ranks; see GenerationConfig.weight_sync). `fault_stage` names the
        fault point between the policy's side and the engines' update (`{fault_stage}.before_engine_update`)."""
        import ray

        handles = self.handles
        current = engine_versions(handles)  # waits for an engine that Ray is restarting
        rows = [{"engine": engine_name(self.run_uri, i), "policy_version": version, "method": "already_current",
                 "bytes": 0, "seconds": 0.0, "checksum": float("nan")} for i in range(len(handles))]
        behind = [i for i, v in enumerate(current) if v != version]
        if not behind:
            return rows
        t0 = time.perf_counter()
        gen = self.config.generation
        if gen.enable_sleep_mode:  # the weights only: the KV cache stays freed until sampling
            ray.get([handles[i].wake_up.remote(["weights"]) for i in behind])
        TrainerPool(self.config, self.run_uri, self.store).bring_to(version, roles=["policy"])
        policy = self._policy()
        route = gen.weight_sync
        if route == "storage" and not (version > 0 and self.store.hf_export_ready(version, self._full_export)):
            route = "object_store"  # no HF export of this version in storage (the base model; hf_every; in flight)
        if route == "broadcast" and 0 < gen.num_gpus < 1:
            # An engine may share a GPU with a trainer rank (NCCL cannot put both in one group): the route follows
            # where Ray put them, so that standard placement on one GPU gets the IPC route as hybrid does.
            # Tensor-parallel workers' GPUs are vLLM's to place: the object store.
            route = "object_store"
            if gen.tensor_parallel_size == 1:
                places = ray.get([handles[i].gpus.remote() for i in behind] + [r.gpus.remote() for r in policy],
                                 timeout=SYNC_TIMEOUT_S)
                route = weight_route(dict(zip(behind, places)), places[len(behind):])
        send = {"broadcast": self._broadcast, "object_store": self._via_object_store, "storage": self._via_storage,
                "ipc": self._via_ipc}[route]
        results = send(policy, [handles[i] for i in behind], behind, version, fault_stage)
        seconds = time.perf_counter() - t0
        for i, result in zip(behind, results):
            if result["version"] != version:
                raise RuntimeError(f"{rows[i]['engine']} reports version {result['version']} after a sync to "
                                   f"{version}")
            rows[i].update(method=route, bytes=result["bytes"], seconds=seconds,
                           checksum=float(result.get("checksum", float("nan"))))
        return rows

    @property
    def _full_export(self) -> str:
        """The checkpoint folder with the policy's full weights: `hf`, or a LoRA policy's `merged` (its `hf` holds
        the adapter)."""
        return "hf" if self.config.policy.lora is None else "merged"

    def _names(self, indices: list[int]) -> list[str]:
        return [engine_name(self.run_uri, i) for i in indices]

    @staticmethod
    def _fault(fault_stage: str | None, version: int) -> None:
        if fault_stage is not None:
            fault_point(f"{fault_stage}.before_engine_update", version)

    def _via_object_store(self, policy, targets, indices, version, fault_stage) -> list[dict]:
        # One export in the object store, read by every engine behind: rank 0's (every rank takes part in a ZeRO-3
        # gather; the others return None).
        import ray

        weights, *others = on_all_ranks(policy, "export_weights")
        self._fault(fault_stage, version)
        results = ray.get([e.update_weights.remote(weights, version) for e in targets], timeout=SYNC_TIMEOUT_S)
        ray.get(others, timeout=SYNC_TIMEOUT_S)
        return results

    def _via_storage(self, policy, targets, indices, version, fault_stage) -> list[dict]:
        # The engines read the HF export committed with the checkpoint (update wrote it); the trainer, which
        # ensure_version put at `version`, gives the sums the engines' sample must match.
        import ray

        from workers.weight_sync import sample_names, verify

        sample = sample_names(ray.get(policy[0].weight_sync_plan.remote(), timeout=SYNC_TIMEOUT_S), version)
        sent = {"sample_sums": ray.get(on_all_ranks(policy, "weight_sums", sample), timeout=SYNC_TIMEOUT_S)[0]}
        self._fault(fault_stage, version)
        uri = f"{self.store.policy_checkpoint(version)}/{self._full_export}"
        results = ray.get([e.update_weights_from_uri.remote(uri, version, self.config.storage.storage_options, sample)
                           for e in targets], timeout=SYNC_TIMEOUT_S)
        for name, result in zip(self._names(indices), results):
            verify(sent, result, name)
        return [{**r, "bytes": 0} for r in results]  # nothing was sent: the engines read storage

    def _via_ipc(self, policy, targets, indices, version, fault_stage) -> list[dict]:
        # Engine i shares its GPU with policy rank i (weight_route), which copies the weights into bucket
        # buffers of its own (every rank holds them whole, or gathers them under ZeRO-3) and hands the engine their
        # CUDA IPC handles: a device-to-device copy in the engine, no transfer, no NCCL group (it refuses two ranks on
        # one GPU).
        import ray

        from workers.weight_sync import sample_names, verify

        bucket_mb = self.config.generation.weight_sync_bucket_mb
        plan = ray.get(policy[0].weight_sync_plan.remote(), timeout=SYNC_TIMEOUT_S)
        sample = sample_names(plan, version)
        shared = ray.get(on_all_ranks(policy, "share_weights", plan, bucket_mb, sample), timeout=SYNC_TIMEOUT_S)
        try:
            self._fault(fault_stage, version)
            results = ray.get([e.receive_shared_weights.remote(shared[i], plan, bucket_mb, sample, version)
                               for e, i in zip(targets, indices)], timeout=SYNC_TIMEOUT_S)
        finally:
            ray.get(on_all_ranks(policy, "release_shared_weights"), timeout=SYNC_TIMEOUT_S)
        for name, i, result in zip(self._names(indices), indices, results):
            verify(shared[i], result, name)
        return [{**r, "bytes": shared[i]["bytes"]} for i, r in zip(indices, results)]

    def _broadcast(self, policy, targets, indices, version, fault_stage) -> list[dict]:
        # Trainer rank 0 and the engines behind form one group (workers/weight_sync.py), kept across syncs while the
        # same engines are behind and every one of them still holds it (a restarted engine or trainer holds none,
        # and the group is rebuilt). Sender and receivers block in the same broadcasts, so their calls go out
        # together.
        import ray

        from workers.weight_sync import sample_names, verify

        gen, names = self.config.generation, self._names(indices)
        tp = gen.tensor_parallel_size
        held = ray.get([e.sync_group_id.remote() for e in targets], timeout=SYNC_TIMEOUT_S)
        reuse = held[0] if len(set(held)) == 1 else None
        group = ray.get(policy[0].open_weight_sync.remote(names, reuse), timeout=SYNC_TIMEOUT_S)
        plan = ray.get(policy[0].weight_sync_plan.remote(), timeout=SYNC_TIMEOUT_S)
        spec = {**group, "world_size": 1 + len(targets) * tp, "plan": plan, "bucket_mb": gen.weight_sync_bucket_mb,
                "sample": sample_names(plan, version)}
        self._fault(fault_stage, version)
        sending = on_all_ranks(policy, "broadcast_weights", spec)
        receiving = [e.receive_weights.remote({**spec, "rank": 1 + j * tp}, version) for j, e in enumerate(targets)]
        try:
            results = ray.get(receiving, timeout=SYNC_TIMEOUT_S)
        finally:
            sent = ray.get(sending, timeout=SYNC_TIMEOUT_S)[0]  # a failed receiver fails the sender at its timeout
        for name, result in zip(names, results):
            verify(sent, result, name)
        return [{**r, "bytes": sent["bytes"]} for r in results]

    def stats(self, timeout_s: float = 30) -> list[dict]:
        """Each engine's cumulative counters (requests, samples, generated tokens, seconds)."""
        import ray

        return ray.get([e.stats.remote() for e in self.handles], timeout=timeout_s)
