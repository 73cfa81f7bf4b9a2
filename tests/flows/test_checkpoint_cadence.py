"""Checkpoints every K iterations, written in the background, and the replay that stands in for the ones not written:
trainers brought to a version past the newest checkpoint hold exactly the weights the run computed there, from the
committed experience alone (no generation request, no reward call).

The crash cases (a SIGKILL between checkpoints, during a background write) are in tests/flows/test_fault_harness.py.
Run alone:  .venv/bin/pytest -q tests/flows/test_checkpoint_cadence.py
"""

import json
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session", "prefect_backend")]

COUNTED_REWARD = '''
import os

from ppoflow.tasks.arith import reward as arith


def reward(prompts, responses, metadata):
    """The quickstart's reward, each call counted in a file."""
    with open(os.environ["PPOFLOW_TEST_REWARD_CALLS"], "a") as f:
        f.write(".")
    return arith(prompts, responses, metadata)
'''


def _policy_weights(run_uri: str, config, version: int) -> dict:
    """The policy actor's weights, as its HF export of `version` would hold them (export_weights: safetensors)."""
    import ray
    from safetensors.torch import load

    from workers.cluster import get_actor

    policy = get_actor(run_uri, "policy", config.ray.namespace)
    assert ray.get(policy.state.remote())["version"] == version
    return load(ray.get(policy.export_weights.remote()))


def test_checkpoint_every_k_and_replay_from_storage(make_config, monkeypatch, tmp_path):
    import torch
    from safetensors.torch import load_file

    from flows.ppo import ppo_train
    from stages.setup import close_run, open_run, start_workers
    from storage.run import RunStore

    (tmp_path / "rewards").mkdir()
    (tmp_path / "rewards" / "counted_reward.py").write_text(COUNTED_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path / "rewards"))
    monkeypatch.delitem(sys.modules, "counted_reward", raising=False)
    calls = tmp_path / "reward-calls"
    monkeypatch.setenv("PPOFLOW_TEST_REWARD_CALLS", str(calls))
    # PPO with a critic: both groups replay. The HF engine, every request seeded: deterministic on CPU.
    config = make_config("run_id=cadence", "iterations=5", "checkpoint.every=2", "checkpoint.hf_every=3",
                         "generation.backend=hf", "eval.prompts=null", "reward.fn=counted_reward:reward",
                         "tracking.logger=none", "storage.keep_checkpoints=null")
    run = ppo_train(config=config)
    store = RunStore(run["run_uri"])
    ckpt = {n: (store.stage_marker(n, "update").get("checkpoint") or {}) for n in range(1, 6)}
    assert {n: (c.get("state"), c.get("hf")) for n, c in ckpt.items() if c} == \
        {2: (True, False), 3: (False, True), 4: (True, False), 5: (True, True)}  # 5: the last, always whole
    assert all(store.checkpoint_complete(n) for n in (2, 3, 4, 5)) and store.latest_checkpoint(3) == 2
    assert not Path(store.checkpoint_uri(1)).exists()
    final = load_file(f"{store.checkpoint_uri(5)}/hf/model.safetensors")
    export_3 = load_file(f"{store.checkpoint_uri(3)}/hf/model.safetensors")
    reward_calls = calls.read_text()

    # A process that finds the run committed up to 5 but its newest checkpoints gone (say, deleted by hand): the
    # trainers load checkpoint 2 and replay 3..5 from the experience tables.
    for n in (4, 5):
        for f in Path(store.checkpoint_uri(n)).rglob("_*.json"):
            f.unlink()  # parts no longer whole: untrusted
    assert store.latest_checkpoint(5) == 2
    opened = open_run(config)
    try:
        start_workers(config, opened["run_uri"])
        replayed = [e for e in store.events() if e["action"] == "replayed"]
        assert [(e["iteration"], e["from_checkpoint"]) for e in replayed] == [(3, 2), (4, 2), (5, 2)]
        assert all(e["max_metric_diff"] == 0.0 for e in replayed), replayed  # the same losses, step by step
        assert set(replayed[0]["roles"]) == {"policy", "critic"}
        weights = _policy_weights(opened["run_uri"], config, 5)
        assert weights.keys() == final.keys()
        assert all(torch.equal(weights[k], final[k]) for k in final)  # bit for bit
        assert not all(torch.equal(export_3[k], final[k]) for k in final)
    finally:
        close_run(config, opened["run_uri"])
    assert calls.read_text() == reward_calls  # the replay called no reward
    stopped = [e for e in store.events() if e["action"] == "stopped"][-1]
    assert stopped["engine"]["requests"] == 0  # and asked the engine for nothing
    assert json.loads((Path(store.checkpoint_uri(2)) / "_SUCCESS.json").read_text())["parts"] == \
        ["policy-rank0", "critic-rank0"]
