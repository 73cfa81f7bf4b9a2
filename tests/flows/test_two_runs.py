"""Two training flows in one process (a worker serving two deployments, a notebook), one after the other and at the
same time: each keeps its own state — lock, actors, tracker, iteration table, storage — and close_run leaves nothing
of either behind (stages/context.py holds what a run keeps in the process).

Run alone:  .venv/bin/pytest -q tests/flows/test_two_runs.py
"""

import threading
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session", "prefect_backend")]


def _config(make_config, run_id: str, iterations: int):
    # GRPO on the HF engine: no critic, the engine beside the point. Small CPU shares, so two runs' actors fit the
    # session's 2-CPU Ray at once.
    return make_config(f"run_id={run_id}", f"iterations={iterations}", "algo.estimator=group_norm",
                       "generation.backend=hf", "generation.num_cpus=0.2", "policy.num_cpus=0.2",
                       "policy.num_threads=1", "eval.prompts=null", "data.prompts_per_iteration=4",
                       "policy.mini_batch_size=16")


@pytest.fixture
def tables(monkeypatch):
    """Every table artifact the reports publish, by key, in order (the report's publishing captured; Prefect's API is
    beside the point)."""
    import json

    import stages.report

    made, guard = {}, threading.Lock()

    def publish(artifacts: dict[str, dict], prefix: str) -> None:
        with guard:
            for name, art in artifacts.items():
                if art["type"] == "table":
                    made.setdefault(f"{prefix}-{name}", []).append(json.loads(art["data"]))

    monkeypatch.setattr(stages.report, "_publish", publish)
    return made


def _check_own_state(config, tables: dict) -> None:
    import ray
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from stages.common import iteration_summary
    from storage.run import RunStore, run_uri
    from workers.cluster import actor_name

    uri = run_uri(config.storage.root, config.run_id)
    store, n = RunStore(uri), config.iterations
    assert store.iterations() == list(range(1, n + 1)) and all(store.stage_marker(n, "sync") for n in range(1, n + 1))
    # The iteration table lists this run's iterations, with this run's numbers: rows never leak between runs.
    last = tables[f"{config.run_id}-iterations"][-1]
    assert [row["iteration"] for row in last] == list(range(1, n + 1))
    assert [row["reward"] for row in last] == [round(iteration_summary(store, i)["rollout/reward_mean"], 4)
                                               for i in range(1, n + 1)]
    # Its own tracker: TensorBoard steps 1..n in its own folder.
    events = EventAccumulator(str(Path(uri) / "tensorboard")).Reload()
    assert [p.step for p in events.Scalars("rollout/reward_mean")] == list(range(1, n + 1))
    assert not (Path(uri) / "_LOCK.json").exists()  # its lock released
    prefix = actor_name(uri, "")
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


def test_two_runs_one_after_the_other_and_at_once(make_config, tables):
    from flows.ppo import ppo_train
    from stages.context import active_runs

    first, second = _config(make_config, "first", 2), _config(make_config, "second", 1)
    ppo_train(config=first)
    ppo_train(config=second)
    for config in (first, second):
        _check_own_state(config, tables)
    assert active_runs() == []

    errors: list = []
    together = [_config(make_config, "left", 2), _config(make_config, "right", 1)]

    def train(config) -> None:
        try:
            ppo_train(config=config)
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=train, args=(c,)) for c in together]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert not errors, errors
    for config in together:
        _check_own_state(config, tables)
    assert active_runs() == []
