"""vLLM worker extension that loads new policy weights in place (ppoflow's weight sync).

vLLM imports this class inside its engine process (`LLM(worker_extension_cls="workers.vllm_ext.WeightSyncExtension")`)
and mixes it into its worker, so the methods run beside `self.model_runner` and are called with
`llm.collective_rpc("ppoflow_...")`. Names carry a `ppoflow_` prefix because vLLM refuses an extension whose attributes
clash with the worker's own (`update_weights`, `reload_weights`, ...).

Not runnable alone: `tests/workers/test_vllm_engine.py` exercises it through `workers.vllm_engine.VLLMEngine`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def state_dict_checksum(tensors: Iterable[torch.Tensor]) -> float:
    """Sum of all elements of all tensors, each summed in float64 and combined with `math.fsum`.

    `fsum` makes it independent of tensor order, so the trainer can compute it over its own state dict
    (`state_dict_checksum(sd.values())`) and compare with the engine's; per-tensor float64 sums may differ in the
    last bits between thread counts, so compare with `math.isclose(a, b, rel_tol=1e-9)`.
    """
    return math.fsum(_float64_sum(t) for t in tensors)


def _float64_sum(tensor: torch.Tensor) -> float:
    import torch

    return float(tensor.sum(dtype=torch.float64))


class WeightSyncExtension:
    """Mixed into vLLM's worker class: `self` is the worker."""

    def ppoflow_store_file(self) -> str | None:
        """The file of the FileStore this worker met its process group at (vLLM's `file://{tmp}/vllm_dist_<uuid>`
        rendezvous, used by its uniproc and multiproc executors), or None for a TCP one (its Ray executor). vLLM's
        WorkerBase keeps the method; a worker class without it has no file we know of: None, and the engine starts."""
        method = getattr(self, "distributed_init_method", None) or ""
        return method.removeprefix("file://") if method.startswith("file://") else None

    def ppoflow_load_weights(self, payload: bytes) -> dict[str, float]:
        """Load a full HF-named state dict given as `safetensors.torch.save` bytes; return both checksums.

        Bytes rather than tensors because `collective_rpc` arguments reach the worker as plain lists.
        """
        from safetensors.torch import load

        return self._ppoflow_reload(iter(load(payload).items()))

    def ppoflow_load_weights_from_path(self, path: str, sample: list[str] = ()) -> dict:
        """Load every `*.safetensors` file of a local HF model folder; return both checksums and the sums of the
        `sample` tensors (`sample_sums`)."""
        from pathlib import Path

        from safetensors import safe_open

        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors file in {path!r}: save the policy with save_pretrained first")

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for file in files:
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)

        return self._ppoflow_reload(tensors(), sample)

    def ppoflow_receive_weights(self, spec: dict) -> dict:
        """Receive the policy broadcast by trainer rank 0 (workers/weight_sync.py) and load it as it arrives.

        `spec`: the group (`id`, `host`, `port`, `world_size`), this engine's first group `rank` (tensor-parallel
        worker t is `rank + t`: each worker receives the full tensors and reload_weights shards them), the `plan`,
        `bucket_mb` and the `sample` names. Joins the group on first use and keeps it for the next syncs; a new group
        id replaces it. Returns both checksums and `sample_sums`."""
        from workers.weight_sync import SyncGroup

        group = getattr(self, "_ppoflow_sync", None)
        if group is None or group.group_id != spec["id"]:
            if group is not None:
                group.close()
            self._ppoflow_sync = None
            group = SyncGroup(spec["id"], spec["host"], spec["port"], spec["rank"] + self.rank, spec["world_size"],
                              self.device)
            self._ppoflow_sync = group
        sampled: dict[str, float] = {}
        try:
            result = self._ppoflow_reload(group.receive(spec["plan"], spec["bucket_mb"], spec["sample"], sampled))
        except Exception:  # a broken group is never reused: the next sync builds a new one
            group.close()
            self._ppoflow_sync = None
            raise
        return {**result, "sample_sums": sampled}

    def ppoflow_receive_shared(self, handles: bytes, plan: list[dict], bucket_mb: float, sample: list[str]) -> dict:
        """Load the weights a trainer rank on this GPU holds in bucket buffers, from their CUDA IPC handles (pickled
        `torch.multiprocessing.reductions.reduce_tensor` results, one per bucket of `plan`), straight from its
        memory. Returns both checksums and `sample_sums`."""
        import pickle

        import torch

        from workers.weight_sync import buckets, unpack

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for (rebuild, args), entries in zip(pickle.loads(handles), buckets(plan, bucket_mb), strict=True):
                # The handle names the sender's device index; both processes see the one GPU, maybe numbered
                # differently: open it on this worker's device.
                yield from unpack(rebuild(*args[:6], self.device.index or 0, *args[7:]), entries)

        result = self._ppoflow_reload(tensors(), sample)
        torch.cuda.synchronize()  # done reading the trainer's buffers before it frees them
        return result

    def ppoflow_sync_group_id(self) -> str | None:
        """The id of the weight-sync group this worker belongs to, or None (a new process holds none)."""
        group = getattr(self, "_ppoflow_sync", None)
        return group.group_id if group is not None else None

    def ppoflow_engine_checksum(self) -> float:
        """`state_dict_checksum` of the parameters as vLLM holds them.

        On CPU vLLM moves linear weights into packed kernel handles and leaves empty parameters, so this covers only
        embeddings (= tied lm_head, with vocab padding), norms and biases; it tells two engine states apart, it is not
        comparable with a checksum of the HF state dict.
        """
        return state_dict_checksum(p.detach() for p in self.model_runner.get_model().parameters())

    def _ppoflow_reload(self, named_tensors: Iterator[tuple[str, torch.Tensor]], sample: list[str] = ()) -> dict:
        # model_runner.reload_weights, not model.load_weights: the latter fails on CPU because the linear weights
        # were repacked at startup. reload_weights takes HF names and redoes vLLM's fusing (qkv, gate_up) and packing.
        # Sum each tensor as it streams past so the path route never holds a second copy of the model.
        sums, sampled, wanted = [], {}, set(sample)

        def summed() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in named_tensors:
                sums.append(_float64_sum(tensor))
                if name in wanted:
                    sampled[name] = sums[-1]
                yield name, tensor

        self.model_runner.reload_weights(weights_iterator=summed())
        self._ppoflow_repack_embedding_matmuls()
        return {"checksum": math.fsum(sums), "engine_checksum": self.ppoflow_engine_checksum(), "sample_sums": sampled}

    def _ppoflow_repack_embedding_matmuls(self) -> None:
        # vLLM bug workaround (0.32, CPU): a tied lm_head shares embed_tokens' weight, but on CPU its logits matmul
        # runs on a packed copy made at startup. reload_weights refreshes embed_tokens, finds no checkpoint entry of
        # its own for lm_head and keeps its old packed copy, so the logits silently stay those of the first weights.
        # Re-running the embedding method's post-load step repacks from the current weight (a no-op off CPU).
        from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

        for module in self.model_runner.get_model().modules():
            method = getattr(module, "quant_method", None)
            if isinstance(method, UnquantizedEmbeddingMethod):
                method.process_weights_after_loading(module)
