"""A transformers generation engine with the interface of `workers.vllm_engine.VLLMEngine`, for hosts without vLLM.

`HFEngine` serves the same requests and returns the same dicts as `VLLMEngine` (`generation.backend: hf` picks it in
`workers.engines.create_engines`), so the stages cannot tell the two apart. It is a plain forward pass with a KV cache:
each request's prompt is run once, then all samples of all requests are decoded together as one left-padded batch (a
request's samples start from copies of its prompt's cache rows), rows that finish leave the batch, and nothing is
paged, compiled or scheduled, so it is slower than vLLM. What it keeps from vLLM's contract:
- sample i of a request is drawn with seed `seed + i`, whatever else is in the batch: each row samples with Gumbel-max
  noise from its own counter-based stream (`_uniform`, a function of its seed, the step and the vocabulary entry,
  made for the whole batch in one pass), so other rows cannot shift it; nothing is sorted unless a request filters
  (top-k, top-p), and one transfer per step says which rows ended;
- `logprobs` are the raw (temperature 1, before top-k/top-p) log-softmax of the logits at the sampled token, in
  float32, which is what `workers.trainer.response_logprobs` recomputes;
- finish reasons, eos and stop-string handling, text decoding, version and counters as documented in `VLLMEngine`.
Weight updates copy a state dict into the model's parameters in place. Sleep mode (generation.enable_sleep_mode, GPU)
moves the weights to host memory and empties the CUDA cache; there is no KV cache to free between calls.

Run its tests alone (tiny local model, ~35 s on 2 cores; the PPO run on it, marked slow, adds ~2 min):
    .venv/bin/pytest -q tests/workers/test_hf_engine.py -p no:cacheprovider -m "not slow"
    .venv/bin/pytest -q tests/workers/test_hf_engine.py -p no:cacheprovider
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from workers.engine import Engine
from workers.vllm_ext import state_dict_checksum

if TYPE_CHECKING:
    import torch


def _signed(value: int) -> int:
    """A 64-bit constant as the int64 torch stores (two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shr(x, bits: int):
    """Logical right shift of int64 tensors (torch's `>>` is arithmetic: it would copy the sign bit)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _uniform(seeds, step: int, width: int):
    """Uniform draws in (0, 1), (rows, width) float32: entry j of row r at `step` is splitmix64(seed_r, step, j)
    (Steele et al. 2014, the SplittableRandom mixer), a pure function of the three, computed for the whole batch at
    once. A row's draws do not depend on which other rows share the batch — what one torch.Generator per row gave,
    at one kernel per row per token. int64 multiplication wraps (two's complement) on every torch backend."""
    import torch

    index = torch.arange(width, device=seeds.device, dtype=torch.int64)
    z = seeds[:, None] * _GOLDEN + (step * width + index)[None, :] + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return (_shr(z, 40).float() + 0.5) / float(1 << 24)  # 24 bits: exact in float32, never 0 or 1


class HFEngine(Engine):
    """One transformers causal LM on "cuda" when available, else "cpu", plus the policy version it serves and
    cumulative counters. Ray runs one method call at a time on the actor, so nothing here is shared between threads.
    """

    def __init__(self, model_path: str, seed: int, dtype: str = "float32", max_model_len: int = 512,
                 num_threads: int | None = None) -> None:
        """`num_threads`: torch intra-op threads on CPU; None keeps torch's default (inside a Ray actor, Ray sets it
        from the actor's num_cpus through OMP_NUM_THREADS)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        started = time.perf_counter()
        self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if num_threads is not None and self._device.type == "cpu":
            torch.set_num_threads(num_threads)
        # vLLM uses the engine seed for requests without one; every request here carries its own, so this only makes
        # anything else that draws from torch's global RNG reproducible.
        torch.manual_seed(seed)
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        self._model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype).to(self._device).eval()
        self._tokenizer = AutoTokenizer.from_pretrained(model_path)
        # vLLM stops at the tokenizer's eos and at every eos id of generation_config.json; so does this engine.
        eos = self._model.generation_config.eos_token_id
        self._eos_ids = {self._tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        self._pad_id = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0
        self._max_model_len = max_model_len
        self.startup_seconds = time.perf_counter() - started
        super().__init__()

    def generate(self, requests: list[dict[str, Any]], version: int | None = None) -> list[list[dict[str, Any]]]:
        """Sample `n` responses for each request, all requests in one batch. Requests, `version` and results are
        exactly `VLLMEngine.generate`'s (read its docstring); `top_k` 0 or -1 and `top_p` 1 are off, temperature 0 is
        greedy.

        Raises ValueError naming the request when one lacks a key, has an empty prompt, n or max_new_tokens below 1,
        or a prompt longer than max_model_len - max_new_tokens.
        """
        self._check_keys(requests)
        self._check_version(version)
        for i, r in enumerate(requests):
            if not r["prompt_ids"] or r["n"] < 1 or r["max_new_tokens"] < 1:
                raise ValueError(f"generate: request {i} needs a non-empty prompt_ids, n >= 1 and max_new_tokens >= 1"
                                 f" (got {len(r['prompt_ids'])} prompt ids, n={r['n']},"
                                 f" max_new_tokens={r['max_new_tokens']})")
            if len(r["prompt_ids"]) + r["max_new_tokens"] > self._max_model_len:
                raise ValueError(
                    f"generate: request {i} has {len(r['prompt_ids'])} prompt ids + max_new_tokens "
                    f"{r['max_new_tokens']} > max_model_len {self._max_model_len}; shorten the prompt "
                    f"(at most {self._max_model_len - r['max_new_tokens']} ids) or raise max_model_len"
                )
        if not requests:
            return []
        self._check_awake()

        import torch
        from transformers import DynamicCache

        started = time.perf_counter()
        dev = self._device
        # One row per sample, in request order; sample k of request i is drawn from its own stream seeded seed + k
        # (vLLM's rule for n > 1). A row's stream advances once per step whatever the other rows do, so batching
        # cannot change its samples.
        rows = [(i, k) for i, r in enumerate(requests) for k in range(r["n"])]
        reqs = [requests[i] for i, _ in rows]
        seeds = torch.tensor([requests[i]["seed"] + k for i, k in rows], dtype=torch.int64, device=dev)
        temperature = torch.tensor([float(r["temperature"]) for r in reqs], device=dev)
        vocab = self._model.config.vocab_size
        top_k = torch.tensor([r["top_k"] if r["top_k"] > 0 else vocab for r in reqs], device=dev)
        top_p = torch.tensor([float(r["top_p"]) for r in reqs], device=dev)
        # Rows that filter (top-k, top-p) need the sorted distribution; without any (the RL default) nothing is sorted.
        filtering = any(r["top_k"] > 0 or r["top_p"] < 1.0 for r in reqs)
        stops = [list(r.get("stop") or []) for r in reqs]
        max_new = torch.tensor([r["max_new_tokens"] for r in reqs], device=dev)
        eos = torch.tensor(sorted(self._eos_ids), dtype=torch.int64, device=dev)

        # Left padding: every row's next token is predicted at the last column, so one cache serves the whole batch.
        # The prompt is run once per request, not once per sample (vLLM's prefix cache does the same): its n rows
        # then start from copies of that request's cache row.
        prompts = [list(r["prompt_ids"]) for r in requests]
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[self._pad_id] * (width - len(p)) + p for p in prompts], device=dev)
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
        # Rotary positions count real tokens only, so a padded row sees the positions it would see alone.
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        next_pos = attn.sum(-1)

        out_ids: list[list[int]] = [[] for _ in rows]
        out_lps: list[list[float]] = [[] for _ in rows]
        reasons: list[str | None] = [None] * len(rows)
        texts: list[str | None] = [None] * len(rows)
        active = torch.arange(len(rows), device=dev)  # batch position -> row
        step = 0  # tokens sampled so far by every active row (they all started together)
        cache = DynamicCache(config=self._model.config)
        with torch.inference_mode():
            # Logits of the last position only: a (rows, prompt length, vocab) tensor would dwarf the model.
            logits = self._model(input_ids=input_ids, attention_mask=attn, position_ids=positions,
                                 past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
            request_of_row = torch.tensor([i for i, _ in rows], device=dev)
            cache.batch_select_indices(request_of_row)
            logits, attn, next_pos = logits[request_of_row], attn[request_of_row], next_pos[request_of_row]
            while True:
                # Sampling, vLLM's order: temperature, top-k, then top-p of what is left; Gumbel-max draws from the
                # filtered distribution with one uniform per vocab entry from the row's own counter-based stream
                # (`_uniform`: a function of the row's seed, the step and the entry, so the other rows cannot shift
                # it). Temperature 0 is argmax.
                temp = temperature[active]
                scaled = logits / temp.clamp(min=1e-6)[:, None]
                if filtering:
                    k, p = top_k[active], top_p[active]
                    ranked, order = scaled.sort(dim=-1, descending=True)
                    cut = torch.arange(ranked.shape[-1], device=dev)[None, :] >= k[:, None]
                    probs = ranked.masked_fill(cut, float("-inf")).softmax(-1)
                    # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it does.
                    cut |= ((probs.cumsum(-1) - probs) >= p[:, None]) & (p[:, None] < 1.0)
                    scaled = torch.empty_like(ranked).scatter_(-1, order, ranked.masked_fill(cut, float("-inf")))
                gumbel = -torch.log(-torch.log(_uniform(seeds[active], step, scaled.shape[-1])))
                tokens = torch.where(temp > 0, (scaled + gumbel).argmax(-1), logits.argmax(-1))
                # The logprob is that of the raw distribution (temperature 1, unfiltered), as the trainer computes it.
                token_lps = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None])[:, 0]
                step += 1
                # Which rows end here, decided on the device: one transfer per step for the whole batch.
                done = torch.isin(tokens, eos) | (step >= max_new[active])

                keep = []
                for pos, (row, token, lp, ended) in enumerate(zip(active.tolist(), tokens.tolist(), token_lps.tolist(),
                                                                  done.tolist())):
                    out_ids[row].append(token)
                    out_lps[row].append(lp)
                    # vLLM's order: eos, then stop strings, then the length limit.
                    if token in self._eos_ids:
                        reasons[row] = "stop"
                    elif stops[row]:
                        text = self._tokenizer.decode(out_ids[row], skip_special_tokens=True)
                        hits = [at for s in stops[row] if (at := text.find(s)) >= 0]
                        if hits:
                            reasons[row], texts[row] = "stop", text[: min(hits)]
                    if reasons[row] is None and ended:
                        reasons[row] = "length"
                    if reasons[row] is None:
                        keep.append(pos)
                if not keep:
                    break
                if len(keep) < len(active):
                    # Finished rows leave the batch and the cache instead of being extended with padding.
                    index = torch.tensor(keep, device=dev)
                    cache.batch_select_indices(index)
                    active, attn, next_pos, tokens = active[index], attn[index], next_pos[index], tokens[index]
                attn = torch.cat([attn, attn.new_ones((len(active), 1))], dim=-1)
                logits = self._model(input_ids=tokens[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                                     past_key_values=cache, use_cache=True).logits[:, -1].float()
                next_pos = next_pos + 1
        elapsed = time.perf_counter() - started

        results: list[list[dict[str, Any]]] = [[] for _ in requests]
        for row, (i, _) in enumerate(rows):
            text = texts[row] if texts[row] is not None else self._tokenizer.decode(out_ids[row],
                                                                                     skip_special_tokens=True)
            results[i].append({"response_ids": out_ids[row], "logprobs": out_lps[row], "text": text,
                               "finish_reason": reasons[row]})
        self._count(results, elapsed)
        return results

    def update_weights(self, weights: bytes, version: int) -> dict[str, Any]:
        """Load a full state dict in place and serve it as policy `version`.

        `weights` is `safetensors.torch.save(state_dict)` with HF parameter names, as for `VLLMEngine`. Returns
        `{"version", "seconds", "checksum", "engine_checksum", "bytes"}`: `checksum` is `state_dict_checksum` of what
        was loaded; `engine_checksum` that of the parameters the model now holds (a tied lm_head counted once, in the
        engine's dtype).
        """
        from safetensors.torch import load

        started = time.perf_counter()
        state_dict = load(weights)
        result = self._load(state_dict.keys(), iter(state_dict.items()), version, started)
        return {**result, "bytes": len(weights)}

    def update_weights_from_path(self, path: str, version: int, sample: list[str] = ()) -> dict[str, Any]:
        """Like `update_weights`, from a local folder of HF safetensors (e.g. one written by `save_pretrained`);
        `sample_sums` holds the float64 sums of the tensors named in `sample`."""
        from pathlib import Path

        from safetensors import safe_open

        started = time.perf_counter()
        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors file in {path!r}: save the policy with save_pretrained first")
        names = []
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                names += list(f.keys())

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for file in files:
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)

        return self._load(names, tensors(), version, started, sample)

    def receive_weights(self, spec: dict[str, Any], version: int) -> dict[str, Any]:
        """Receive the policy that trainer rank 0 broadcasts (workers/weight_sync.py; NCCL when this engine has a
        GPU, gloo otherwise) and serve it as `version`; `spec` as in `VLLMEngine.receive_weights`. Joins the group on
        first use and keeps it until a sync names another. Returns `update_weights`' dict plus `sample_sums`."""
        from workers.weight_sync import SyncGroup

        self._check_awake("weights")  # before joining: the sender would wait for a receiver that gave up
        started = time.perf_counter()
        group = getattr(self, "_sync", None)
        if group is None or group.group_id != spec["id"]:
            if group is not None:
                group.close()
            self._sync = group = SyncGroup(spec["id"], spec["host"], spec["port"], spec["rank"],
                                           spec["world_size"], self._device)
        names = [e["name"] for e in spec["plan"]]
        sampled: dict[str, float] = {}
        try:
            result = self._load(names, group.receive(spec["plan"], spec["bucket_mb"], spec["sample"], sampled),
                                version, started)
        except Exception:  # a broken group is never reused: the next sync builds a new one
            group.close()
            self._sync = None
            raise
        return {**result, "sample_sums": sampled}

    def receive_shared_weights(self, shared: dict[str, Any], plan: list[dict], bucket_mb: float, sample: list[str],
                               version: int) -> dict[str, Any]:
        """CUDA IPC route: load the weights that the trainer rank on this engine's GPU holds in bucket buffers
        (`PolicyWorker.share_weights`' answer `shared`), copying straight from its memory, and serve them as
        `version`. Returns `update_weights`' dict plus `sample_sums`."""
        import torch

        from workers.weight_sync import buckets, unpack

        self._check_awake("weights")
        started = time.perf_counter()
        device = torch.cuda.current_device()

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for (rebuild, args), entries in zip(shared["handles"], buckets(plan, bucket_mb), strict=True):
                # The handle names the sender's device index; both processes see the one GPU, maybe numbered
                # differently (each actor's CUDA_VISIBLE_DEVICES), so open it on this process's current device.
                yield from unpack(rebuild(*args[:6], device, *args[7:]), entries)

        result = self._load([e["name"] for e in plan], tensors(), version, started, sample)
        torch.cuda.synchronize()  # done reading the trainer's buffers before it frees them
        return result

    def sync_group_id(self) -> str | None:
        """The weight-sync group this engine belongs to, or None (a restarted engine holds none)."""
        group = getattr(self, "_sync", None)
        return group.group_id if group is not None else None

    def _load(self, names: Iterable[str], named_tensors: Iterator[tuple[str, torch.Tensor]], version: int,
              started: float, sample: list[str] = ()) -> dict[str, Any]:
        """Copy `named_tensors` (whose names are `names`) into the model's parameters; the update's result dict,
        with the sums of the `sample` tensors."""
        import torch

        from workers.weight_sync import tensor_sum

        self._check_awake("weights")
        # Every name is checked before anything is copied: a half-loaded model would mix two policies.
        targets = self._model.state_dict(keep_vars=True)  # tied weights appear under each of their names
        unknown = sorted(set(names) - targets.keys())
        loaded = {id(targets[n]) for n in names if n in targets}
        absent = sorted(n for n in targets.keys() - set(names) if id(targets[n]) not in loaded)
        if unknown or absent:
            raise ValueError(f"update_weights: the state dict does not match the model; unknown names "
                             f"{unknown[:5]}, missing names {absent[:5]} (send every parameter, with HF names)")

        sampled, wanted = {}, set(sample)

        def copied() -> Iterator[torch.Tensor]:
            for name, tensor in named_tensors:
                if tensor.shape != targets[name].shape:  # copy_ would broadcast a wrong shape silently
                    raise ValueError(f"update_weights: {name} has shape {tuple(tensor.shape)}, the model's "
                                     f"{tuple(targets[name].shape)}")
                targets[name].copy_(tensor)  # casts to the engine's dtype and device
                if name in wanted:
                    sampled[name] = tensor_sum(tensor)
                yield tensor

        with torch.no_grad():
            checksum = state_dict_checksum(copied())  # sums each tensor as it streams past: no second model copy
        self._version = version
        return {"version": version, "seconds": time.perf_counter() - started, "checksum": checksum,
                "engine_checksum": state_dict_checksum(p.detach() for p in self._model.parameters()),
                "sample_sums": sampled}

    def _sleep(self) -> None:
        # The KV cache lives only inside a generate call, so sleeping frees the weights: moved to host memory, and
        # the CUDA caching allocator gives the blocks back to the driver for the trainers in this process's GPU.
        import torch

        self._model.to("cpu")
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def _wake_up(self, tags: list[str]) -> None:
        if "weights" in tags:
            self._model.to(self._device)



def create_hf_engine_actor(name: str, namespace: str, num_cpus: float, num_gpus: float = 0, **engine_kwargs: Any):
    """Start (or find, when a retried task asks again) the named, non-detached `HFEngine` actor; return its handle.

    Await startup with `ray.get(handle.ready.remote())`. `engine_kwargs` are `HFEngine`'s constructor arguments; an
    existing actor of that name is returned as it is, whatever they say. The engine runs on a GPU only if `num_gpus`
    gives it one (Ray hides the others).
    """
    import ray

    actor_cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(HFEngine)
    return actor_cls.options(name=name, namespace=namespace, get_if_exists=True).remote(**engine_kwargs)
