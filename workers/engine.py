"""What every generation engine shares (workers/vllm_engine.py, workers/hf_engine.py): the request contract, the
policy version the engine serves, its cumulative counters and sleep mode. The stages see only this interface."""

from __future__ import annotations

from typing import Any

from workers.cluster import RunActor

REQUEST_KEYS = frozenset({"prompt_ids", "n", "temperature", "top_p", "top_k", "max_new_tokens", "seed"})
"""Keys every generate request carries (plus an optional "stop" list of strings)."""

VERSION_LOST = -1
"""The version an engine reports while it holds no weights (vLLM's level-2 sleep dropped them): behind every policy,
so the next sync sends them whatever the last one did."""

SLEEP_TAGS = ("weights", "kv_cache")
"""What a sleeping engine has freed on its device, and what `wake_up(tags)` brings back (vLLM's tags)."""


class EngineVersionError(RuntimeError):
    """A generate call named a policy version the engine does not serve. What an engine restarted by Ray (its
    constructor again: base weights, version 0) answers to the chunks sent to it before it was synced again."""


class Engine(RunActor):
    def __init__(self) -> None:
        self._version = 0  # 0 = the weights found at model_path
        self._stats = {"requests": 0, "samples": 0, "generated_tokens": 0, "generate_seconds": 0.0}
        self._sleeping: set[str] = set()  # SLEEP_TAGS currently freed

    def ready(self) -> bool:
        """Returns once the engine is up; `ray.get(actor.ready.remote())` is the way to await startup."""
        return True

    def version(self) -> int:
        """Policy version being served: 0 for the weights the engine was created from, then the last update's."""
        return self._version

    def stats(self) -> dict[str, Any]:
        """Cumulative counts since the actor started: requests, samples, generated_tokens, generate_seconds."""
        return dict(self._stats)

    def close(self) -> list[str]:
        """Remove what this engine leaves on its host's disk and a killed process cannot remove itself; call it right
        before killing the actor (workers/launch.py's stop_workers). Returns the paths removed (none here)."""
        return []

    def sleep(self) -> None:
        """Free the engine's device memory while the trainers work: drop the KV cache and move the weights to host
        memory. Idempotent. Only engines created with enable_sleep_mode (GPU) free anything."""
        if self._sleeping == set(SLEEP_TAGS):
            return
        if self._sleeping:
            # Half awake (weights back for a sync): wake fully first, since vLLM's sleep expects every allocation
            # resident and would skip or double-free the rest otherwise.
            self._wake_up(sorted(self._sleeping))
        self._sleep()
        self._sleeping = set(SLEEP_TAGS)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Bring back what `sleep` freed: `["weights"]` for a weight update, `["kv_cache"]` (after the weights) to
        sample; None for both. Tags already awake are skipped."""
        unknown = set(tags or ()) - set(SLEEP_TAGS)
        if unknown:
            raise ValueError(f"wake_up: unknown tags {sorted(unknown)}; use {list(SLEEP_TAGS)}")
        todo = [t for t in (tags or SLEEP_TAGS) if t in self._sleeping]
        if todo:
            self._wake_up(todo)
            self._sleeping -= set(todo)

    def update_weights_from_uri(self, uri: str, version: int, storage_options: dict | None = None,
                                sample: list[str] = ()) -> dict[str, Any]:
        """The storage route of the weight sync: `update_weights_from_path` on an HF export in the run's storage
        (an s3:// folder is downloaded to a local temporary folder on this engine's node first)."""
        from storage.checkpoint import local_dir_for_read

        with local_dir_for_read(uri, storage_options) as path:
            return self.update_weights_from_path(path, version, sample)

    def sleeping(self) -> list[str]:
        """The SLEEP_TAGS currently freed; empty when the engine is fully awake."""
        return sorted(self._sleeping)

    def _sleep(self) -> None:
        raise NotImplementedError

    def _wake_up(self, tags: list[str]) -> None:
        raise NotImplementedError

    def _check_version(self, version: int | None) -> None:
        # Checked here, in the actor, because only the actor knows which incarnation runs the call: a chunk sent to
        # an engine that died and was restarted after the caller's last version check would be sampled from the
        # base model otherwise, silently.
        if version is not None and version != self._version:
            raise EngineVersionError(f"generate: asked for policy version {version}, the engine serves "
                                     f"{self._version} (restarted? sync it first: stages.sync.bring_engine_to)")

    def _check_awake(self, *needed: str) -> None:
        # A vLLM engine asked to sample while asleep waits forever (its scheduler is paused); fail instead.
        asleep = sorted(self._sleeping & set(needed or SLEEP_TAGS))
        if asleep:
            raise RuntimeError(f"the engine is asleep ({', '.join(asleep)} freed): call wake_up({asleep}) first")

    @staticmethod
    def _check_keys(requests: list[dict[str, Any]]) -> None:
        for i, r in enumerate(requests):
            missing = REQUEST_KEYS - r.keys()
            if missing:
                raise ValueError(f"generate: request {i} lacks {sorted(missing)}; every request needs "
                                 f"{sorted(REQUEST_KEYS)} and optionally 'stop'")

    def _count(self, results: list[list[dict[str, Any]]], seconds: float) -> None:
        self._stats["requests"] += len(results)
        self._stats["samples"] += sum(len(samples) for samples in results)
        self._stats["generated_tokens"] += sum(len(s["response_ids"]) for samples in results for s in samples)
        self._stats["generate_seconds"] += seconds
