"""Engines that die mid-generation: Ray restarts them, the dispatcher has them synced and sends their chunks again.

Fast: small stand-in actors built on `workers.engine.Engine` (its version check is the real one) under the options
`workers.engines.create_engines` gives real engines. The same on real engines inside a PPO run:
tests/flows/test_transient_faults.py. Run alone:
    .venv/bin/pytest -q tests/workers/test_engine_restart.py
"""

import os
from pathlib import Path

import pytest

from workers.engine import Engine

pytestmark = pytest.mark.usefixtures("ray_session")


class _Crashy(Engine):
    """Answers each request with its seed, the version it served and its pid. The first process to meet the request
    seeded `crash_seed` dies inside that chunk (os._exit: no cleanup, like an OOM kill); a flag file in `flags`
    remembers it, so the restarted engine (same constructor arguments) serves it."""

    def __init__(self, flags: str, crash_seed: int | None = None):
        super().__init__()
        self.flags, self.crash_seed = Path(flags), crash_seed

    def pid(self) -> int:
        return os.getpid()

    def update_weights(self, weights, version: int) -> dict:
        self._version = version
        return {"version": version, "bytes": 0}

    def generate(self, requests, version=None):
        self._check_version(version)
        for r in requests:
            if r["seed"] == self.crash_seed and not (self.flags / "crashed").exists():
                (self.flags / "crashed").touch()
                os._exit(1)
        return [[{"seed": r["seed"], "version": self._version, "pid": os.getpid()}] for r in requests]


def _engines(tmp_path, n: int, crash_seed=None, max_restarts: int = 1, version: int = 1) -> list:
    import ray

    actors = [ray.remote(_Crashy).options(num_cpus=0, max_restarts=max_restarts, max_task_retries=0)
              .remote(str(tmp_path), crash_seed) for _ in range(n)]
    ray.get([a.update_weights.remote(None, version) for a in actors])
    return actors


def _requests(n: int) -> list[dict]:
    return [{"prompt_ids": [1], "n": 1, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 4,
             "seed": s} for s in range(n)]


def _syncer(actors: list, version: int, lost: list):
    """What EnginePool.recovery does, minus the policy actor: wait for the restart, push `version`."""
    import ray

    from workers.engines import engine_versions

    def on_engine_lost(i: int, error: Exception) -> None:
        lost.append([i, error])
        lost[-1].append(engine_versions([actors[i]], timeout_s=60)[0])  # the version it came back with
        ray.get(actors[i].update_weights.remote(None, version))

    return on_engine_lost


def test_a_dead_engines_chunks_are_resent_after_it_is_restarted_and_synced(tmp_path):
    import ray
    from ray.exceptions import RayActorError

    from workers.engine_pool import generate_on_engines
    from workers.engine import EngineVersionError

    actors = _engines(tmp_path, 2, crash_seed=9)
    pids = ray.get([a.pid.remote() for a in actors])
    lost: list = []
    results = generate_on_engines(actors, _requests(24), chunk_size=3, timeout_s=60, version=1,
                                  on_engine_lost=_syncer(actors, 1, lost))

    assert [r[0]["seed"] for r in results] == list(range(24))  # every chunk, in request order, once
    assert {r[0]["version"] for r in results} == {1}  # none served by the restarted engine's base weights
    dead = lost[0][0]
    assert isinstance(lost[0][1], RayActorError) and lost[0][2] == 0  # it came back from its constructor: version 0
    # its second chunk died with it, or reached the restarted engine before the sync and was refused there
    assert all(i == dead and isinstance(e, (RayActorError, EngineVersionError)) for i, e, _ in lost)
    now = ray.get([a.pid.remote() for a in actors])
    assert now[dead] != pids[dead] and now[1 - dead] == pids[1 - dead]
    for a in actors:
        ray.kill(a)


def test_an_engine_behind_refuses_the_chunk_and_without_a_callback_the_error_surfaces(tmp_path):
    import ray

    from workers.engine_pool import generate_on_engines
    from workers.engine import EngineVersionError

    (stale,) = _engines(tmp_path, 1, version=0)  # a restarted engine, before anyone synced it
    with pytest.raises(EngineVersionError, match="asked for policy version 1, the engine serves 0"):
        generate_on_engines([stale], _requests(4), version=1)
    lost: list = []
    results = generate_on_engines([stale], _requests(4), version=1, on_engine_lost=_syncer([stale], 1, lost))
    assert [(i, type(e).__name__, found) for i, e, found in lost] == [(0, "RayTaskError(EngineVersionError)", 0)]
    assert {r[0]["version"] for r in results} == {1}
    assert len(generate_on_engines([stale], _requests(4))) == 4  # no version asked: no check, as before
    ray.kill(stale)


def test_an_engine_out_of_restarts_fails_the_call(tmp_path):
    from ray.exceptions import ActorDiedError

    from workers.engine_pool import generate_on_engines

    (engine,) = _engines(tmp_path, 1, crash_seed=0, max_restarts=0)  # generation.max_engine_restarts=0
    lost: list = []
    with pytest.raises(ActorDiedError):
        generate_on_engines([engine], _requests(4), version=1, on_engine_lost=_syncer([engine], 1, lost))
    assert [(i, len(rest)) for i, *rest in lost] == [(0, 1)]  # called once; its wait raised: gone for good
