"""Ray connection and the run's named worker actors: engines (engine-0, engine-1, ...), policy, critic, reference.

Actors are created once per training run (non-detached: they die with the driver process) and named after the run,
so any Prefect task in the driver finds them with `get_actor(run_uri, role)` — tasks never pass actor handles.

Run alone to list the named actors of a Ray cluster (address, or "auto"):
    python -m workers.cluster auto
"""

import hashlib
import os
import sys

ROLES = ("policy", "critic", "reference")  # plus engine-0 .. engine-{n-1}: workers/engines.py

# Ray kills a non-detached actor once no handle to it is left, name or not: this process keeps one per actor for
# as long as the run's workers should live (until stop_workers).
_HANDLES: dict[str, object] = {}


def connect(address: str | None, num_cpus: int | None, namespace: str) -> None:
    """Join `address`, or start a local Ray. Idempotent within a process."""
    import ray

    if ray.is_initialized():
        return
    kwargs = {"namespace": namespace, "include_dashboard": False, "log_to_driver": True}
    if address is None:
        kwargs["num_cpus"] = num_cpus or os.cpu_count()
    ray.init(address=address, **kwargs)


def forward_worker_logs(handler) -> None:
    """Also pass every line the actors print to `handler(line, is_err, source)`, in the driver (log_to_driver=True).

    Ray offers no public hook for this; its driver-side dispatcher is a private API, so if it moves the lines are
    still printed to the driver's stdout and only the forwarding is lost. Calling again replaces the handler."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return

    def on_batch(data: dict) -> None:
        source = " ".join(filter(None, [data.get("actor_name") or data.get("task_name"), f"pid={data.get('pid')}"]))
        for line in data.get("lines", []):
            handler(line, bool(data.get("is_err")), source)

    dispatcher.remove_handler("ppoflow")
    dispatcher.add_handler("ppoflow", on_batch)


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


def start_workers(run_uri: str, config, timeout_s: float = 600.0) -> dict:
    """Create (or find) every actor the config needs and wait until all are ready. Returns {role: actor name}, the
    engines as `engine-{i}`. Engines (and, with generation.placement hybrid, the trainers) take their resources from
    the run's placement group (workers/engines.py)."""
    import ray

    from workers.engines import bundle_strategy, create_engines
    from workers.trainer import CriticWorker, PolicyWorker, ReferenceWorker

    ns, seed, model = config.ray.namespace, config.seed, config.model
    # Dr. GRPO's seq-mean-token-sum-norm divides by a constant length: the response length limit.
    algo = {**config.algo.model_dump(), "norm_len": config.generation.max_new_tokens}
    engines, layout, pg = create_engines(run_uri, config, timeout_s)

    def options(role: str, trainer) -> dict:
        opts = {"name": actor_name(run_uri, role), "namespace": ns, "get_if_exists": True,
                "num_cpus": trainer.num_cpus, "num_gpus": trainer.num_gpus}
        if layout.trainer_bundle is not None:  # hybrid: the trainers share engine 0's bundle
            opts["scheduling_strategy"] = bundle_strategy(pg, layout.trainer_bundle)
        return opts

    actors = {f"engine-{i}": engine for i, engine in enumerate(engines)}
    actors.update({
        "policy": ray.remote(PolicyWorker).options(**options("policy", config.policy)).remote(
            model.path, config.policy.model_dump(), model.dtype, seed, algo=algo),
        "reference": ray.remote(ReferenceWorker).options(**options("reference", config.policy)).remote(
            model.ref_path or model.path, model.dtype, config.policy.micro_batch_size, config.policy.num_threads),
    })
    if config.uses_critic:
        from transformers import AutoTokenizer

        pad_id = AutoTokenizer.from_pretrained(model.path).pad_token_id
        actors["critic"] = ray.remote(CriticWorker).options(**options("critic", config.critic)).remote(
            model.critic_path or model.path, config.critic.model_dump(), model.dtype, seed, algo=algo,
            pad_token_id=pad_id)
    for role, handle in actors.items():
        _HANDLES[actor_name(run_uri, role)] = handle
    # Constructors run concurrently; a trivial call on each waits for all of them (and raises their errors).
    probes = [a.ready.remote() if role.startswith("engine") else a.__ray_ready__.remote() for role, a in actors.items()]
    ray.get(probes, timeout=timeout_s)
    return {role: actor_name(run_uri, role) for role in actors}


def stop_workers(run_uri: str, namespace: str) -> None:
    """Kill the run's actors (every engine-{i} found) and remove its placement group."""
    import ray

    from workers.engines import get_engines, remove_placement_group

    for engine in get_engines(run_uri, namespace):
        ray.kill(engine)
    for name in [n for n in _HANDLES if n.startswith(actor_name(run_uri, ""))]:
        _HANDLES.pop(name)
    for role in ROLES:
        try:
            ray.kill(ray.get_actor(actor_name(run_uri, role), namespace=namespace))
        except ValueError:
            pass
    remove_placement_group(run_uri)


if __name__ == "__main__":
    import ray
    from ray.util.state import list_actors

    ray.init(address=sys.argv[1] if len(sys.argv) > 1 else "auto")
    for a in list_actors(filters=[("state", "=", "ALIVE")]):
        print(a.ray_namespace, a.name, a.class_name)
