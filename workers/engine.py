"""What every generation engine shares (workers/vllm_engine.py, workers/hf_engine.py): the request contract, the
policy version the engine serves and its cumulative counters. The stages see only this interface."""

from __future__ import annotations

from typing import Any

REQUEST_KEYS = frozenset({"prompt_ids", "n", "temperature", "top_p", "top_k", "max_new_tokens", "seed"})
"""Keys every generate request carries (plus an optional "stop" list of strings)."""


class Engine:
    def __init__(self) -> None:
        self._version = 0  # 0 = the weights found at model_path
        self._stats = {"requests": 0, "samples": 0, "generated_tokens": 0, "generate_seconds": 0.0}

    def ready(self) -> bool:
        """Returns once the engine is up; `ray.get(actor.ready.remote())` is the way to await startup."""
        return True

    def version(self) -> int:
        """Policy version being served: 0 for the weights the engine was created from, then the last update's."""
        return self._version

    def stats(self) -> dict[str, Any]:
        """Cumulative counts since the actor started: requests, samples, generated_tokens, generate_seconds."""
        return dict(self._stats)

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
