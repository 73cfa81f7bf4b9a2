"""Ray connection and the run's named worker actors: engines (engine-0, engine-1, ...), the policy and critic
groups (rank 0 named `policy` / `critic`, rank r `policy-rank{r}`), the reference and the reward model.

Actors are created once per training run (non-detached: they die with the driver process) and named after the run,
so any Prefect task in the driver finds them with `get_actor(run_uri, role)` — tasks never pass actor handles.

Run alone to list the named actors of a Ray cluster (address, or "auto"):
    python -m workers.cluster auto
"""

import hashlib
import os
import sys

# Ray kills a non-detached actor once no handle to it is left, name or not: this process keeps one per actor for
# as long as the run's workers should live (until stop_workers).
_HANDLES: dict[str, object] = {}


def worker_env() -> dict[str, str]:
    """Environment of every actor of the run (the job's runtime_env): OpenMP threads that sleep when idle.

    Several actors share the cores (engine, policy, critic, reference), each with its own OpenMP pool. With the
    default wait policy an idle pool spins, taking the cores from the actor that works: on the 2-core quickstart
    this made the score and update stages 7x slower. OMP_WAIT_POLICY and GOMP_SPINCOUNT set in the driver's
    environment are passed on (the latter then stands for SPIN_ENV too).
    """
    env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    if "GOMP_SPINCOUNT" in os.environ:
        env["GOMP_SPINCOUNT"] = os.environ["GOMP_SPINCOUNT"]
    return env


# What lets an actor's OpenMP threads spin between ops (libgomp's default wait: ~3 ms, then they sleep), overriding the
# PASSIVE policy of worker_env: for an actor whose several threads compute while no other actor does on its cores
# (the engines; on CPU the trainers, which run one thread each beside other models). Waking sleeping threads for each
# op made generation 1.4-1.7x slower and the 6M policy's update ~1.2x (bench/RESULTS.md). GOMP_SPINCOUNT=0 in the
# driver's environment keeps every actor's threads sleeping (for runs that share their cores with other work).
SPIN_ENV = {} if "GOMP_SPINCOUNT" in os.environ else {"GOMP_SPINCOUNT": "300000"}


def connect(address: str | None, num_cpus: int | None, namespace: str) -> None:
    """Join `address`, or start a local Ray. Idempotent within a process."""
    import ray

    if ray.is_initialized():
        return
    kwargs = {"namespace": namespace, "include_dashboard": False, "log_to_driver": True,
              "runtime_env": {"env_vars": worker_env()}}
    if address is None:
        kwargs["num_cpus"] = num_cpus or os.cpu_count()
    # "local", not None: with None, ray.init joins a cluster that `ray start` left on this host, if any.
    ray.init(address=address or "local", **kwargs)


def forward_worker_logs(handler, name: str = "ppoflow") -> None:
    """Also pass every line the actors print to `handler(line, is_err, source)`, in the driver (log_to_driver=True).

    Ray offers no public hook for this; its driver-side dispatcher is a private API, so if it moves the lines are
    still printed to the driver's stdout and only the forwarding is lost. Handlers are kept by `name` (the flow
    run's log, the log files of workers/logs.py): calling again replaces that name's handler, None removes it."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return

    def on_batch(data: dict) -> None:
        source = " ".join(filter(None, [data.get("actor_name") or data.get("task_name"), f"pid={data.get('pid')}"]))
        for line in data.get("lines", []):
            handler(line, bool(data.get("is_err")), source)

    dispatcher.remove_handler(name)
    if handler is not None:
        dispatcher.add_handler(name, on_batch)


def actor_name(run_uri: str, role: str) -> str:
    run_id = run_uri.rstrip("/").rsplit("/", 1)[-1]
    # Two runs may share an id under different storage roots; the URI hash keeps their actors apart.
    return f"{run_id}-{hashlib.sha1(run_uri.encode()).hexdigest()[:8]}:{role}"


def get_actor(run_uri: str, role: str, namespace: str):
    """The run's actor of `role`; "engine" is engine 0 (`workers.engines.get_engines` lists them all)."""
    import ray

    if role == "engine":  # callers from before several engines (one engine was named `:engine`)
        role = "engine-0"
    return ray.get_actor(actor_name(run_uri, role), namespace=namespace)


def rank_role(role: str, rank: int) -> str:
    """Actor role of rank `rank` of a trainer group: rank 0 is the role itself (`policy`), others `policy-rank1`..."""
    return role if rank == 0 else f"{role}-rank{rank}"


def get_group(run_uri: str, role: str, namespace: str, num_ranks: int) -> list:
    """Every rank's actor of a trainer group, in rank order."""
    return [get_actor(run_uri, rank_role(role, r), namespace) for r in range(num_ranks)]


def start_workers(run_uri: str, config, timeout_s: float = 600.0) -> dict:
    """Create (or find) every actor the config needs and wait until all are ready. Returns {role: actor name}, the
    engines as `engine-{i}`. Engines (and, with generation.placement hybrid, the trainers) take their resources from
    the run's placement group, trainer groups under standard placement from a second one (workers/engines.py)."""
    import ray

    from workers.config import deepspeed_overrides
    from workers.engines import bundle_strategy, create_engines, placement_group
    from workers.trainer import CriticWorker, PolicyWorker, ReferenceWorker, group_address

    ns, seed, model = config.ray.namespace, config.seed, config.model
    # Dr. GRPO's seq-mean-token-sum-norm divides by a constant length: the response length limit.
    algo = {**config.algo.model_dump(), "norm_len": config.generation.max_new_tokens}
    engines, layout, pg = create_engines(run_uri, config, timeout_s)
    if layout.trainer_group:  # standard placement with trainer groups: their own group, with ray.trainers' strategy
        pg = placement_group(run_uri, layout, timeout_s, group="trainers")

    def options(role: str, trainer, rank: int = 0) -> dict:
        opts = {"name": actor_name(run_uri, role), "namespace": ns, "get_if_exists": True,
                "num_cpus": trainer.num_cpus, "num_gpus": trainer.num_gpus}
        if layout.trainer_bundles:  # hybrid, or trainer groups: rank r sits on its bundle of its group
            opts["scheduling_strategy"] = bundle_strategy(pg, layout.trainer_bundles[rank])
        elif layout.trainer_custom:  # a single trainer, on a node with ray.trainers.resources
            opts["resources"] = layout.trainer_custom
        # On CPU a model computes with several threads only while it works alone (stages/common.py: threads_each);
        # not so the ranks of a group, which compute at once, nor the reward model (its own num_threads).
        if trainer.num_gpus == 0 and getattr(trainer, "num_ranks", 1) == 1 and role != "reward":
            opts["runtime_env"] = {"env_vars": SPIN_ENV}
        return opts

    def group(role: str, cls, trainer, model_path: str, **kwargs) -> dict:
        """The `trainer.num_ranks` rank actors of one DeepSpeed model group, {rank_role(role, r): handle}."""
        settings = trainer.model_dump()
        if trainer.deepspeed_config:  # read here, on the driver: the ranks may run on hosts without the file
            settings["deepspeed_overrides"] = deepspeed_overrides(trainer.deepspeed_config)
        n, rendezvous = trainer.num_ranks, {}
        if n > 1:  # rank 0's node address and a free port there, looked up on rank 0's bundle
            where = {"scheduling_strategy": bundle_strategy(pg, layout.trainer_bundles[0])}
            addr, port = ray.get(ray.remote(group_address).options(num_cpus=0, **where).remote(), timeout=timeout_s)
            rendezvous = {"world_size": n, "master_addr": addr, "master_port": port}
        return {rank_role(role, r): ray.remote(cls).options(**options(rank_role(role, r), trainer, r)).remote(
            model_path, settings, model.dtype, seed, rank=r, **rendezvous, **kwargs) for r in range(n)}

    actors = {f"engine-{i}": engine for i, engine in enumerate(engines)}
    actors.update(group("policy", PolicyWorker, config.policy, model.path, algo=algo))
    actors["reference"] = ray.remote(ReferenceWorker).options(**options("reference", config.policy)).remote(
        model.ref_path or model.path, model.dtype, config.policy.micro_batch_size, config.policy.num_threads,
        config.policy.share_prompts)
    if config.uses_critic:
        from transformers import AutoTokenizer

        pad_id = AutoTokenizer.from_pretrained(model.path).pad_token_id
        actors.update(group("critic", CriticWorker, config.critic, model.critic_path or model.path, algo=algo,
                            pad_token_id=pad_id))
    if config.reward.model is not None:
        from workers.reward import RewardModelWorker

        rm = config.reward.model
        actors["reward"] = ray.remote(RewardModelWorker).options(**options("reward", rm)).remote(
            rm.path, rm.dtype or model.dtype, rm.micro_batch_size, rm.num_threads, rm.apply_chat_template)
    for role, handle in actors.items():
        _HANDLES[actor_name(run_uri, role)] = handle
    # Constructors run concurrently; a trivial call on each waits for all of them (and raises their errors).
    probes = [a.ready.remote() if role.startswith("engine") else a.__ray_ready__.remote() for role, a in actors.items()]
    ray.get(probes, timeout=timeout_s)
    return {role: actor_name(run_uri, role) for role in actors}


def stop_workers(run_uri: str, namespace: str) -> None:
    """Kill every actor of the run (engines, each rank of the trainer groups, reference, reward model) and remove
    its placement group."""
    import ray

    from workers.engines import remove_placement_group

    prefix = actor_name(run_uri, "")
    for name in [n for n in _HANDLES if n.startswith(prefix)]:
        _HANDLES.pop(name)
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == namespace and entry["name"].startswith(prefix):
            try:
                ray.kill(ray.get_actor(entry["name"], namespace=namespace))
            except ValueError:  # died meanwhile
                pass
    remove_placement_group(run_uri)


if __name__ == "__main__":
    import ray
    from ray.util.state import list_actors

    ray.init(address=sys.argv[1] if len(sys.argv) > 1 else "auto")
    for a in list_actors(filters=[("state", "=", "ALIVE")]):
        print(a.ray_namespace, a.name, a.class_name)
