"""Ray connection and the run's named worker actors: engine, policy, critic, reference.

Actors are created once per training run (non-detached: they die with the driver process) and named after the run,
so any Prefect task in the driver finds them with `get_actor(run_uri, role)` — tasks never pass actor handles.

Run alone to list the named actors of a Ray cluster (address, or "auto"):
    python -m workers.cluster auto
"""

import hashlib
import os
import sys

ROLES = ("engine", "policy", "critic", "reference")

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
    import ray

    return ray.get_actor(actor_name(run_uri, role), namespace=namespace)


def start_workers(run_uri: str, config, timeout_s: float = 600.0) -> dict:
    """Create (or find) every actor the config needs and wait until all are ready. Returns {role: actor name}."""
    import ray

    from workers.trainer import CriticWorker, PolicyWorker, ReferenceWorker

    ns, seed, model = config.ray.namespace, config.seed, config.model
    # Dr. GRPO's seq-mean-token-sum-norm divides by a constant length: the response length limit.
    algo = {**config.algo.model_dump(), "norm_len": config.generation.max_new_tokens}

    def options(role: str, trainer) -> dict:
        return {"name": actor_name(run_uri, role), "namespace": ns, "get_if_exists": True,
                "num_cpus": trainer.num_cpus, "num_gpus": trainer.num_gpus}

    gen = config.generation
    if gen.backend == "hf":
        from workers.hf_engine import create_hf_engine_actor

        engine = create_hf_engine_actor(
            actor_name(run_uri, "engine"), ns, gen.num_cpus, gen.num_gpus, model_path=model.path, seed=seed, dtype=model.dtype,
            max_model_len=gen.max_model_len)
    else:
        from workers.vllm_engine import create_engine_actor

        engine = create_engine_actor(
            actor_name(run_uri, "engine"), ns, gen.num_cpus, gen.num_gpus, model_path=model.path, seed=seed, dtype=model.dtype,
            max_model_len=gen.max_model_len, kv_cache_gib=gen.kv_cache_gib, enforce_eager=gen.enforce_eager)
    actors = {
        "engine": engine,
        "policy": ray.remote(PolicyWorker).options(**options("policy", config.policy)).remote(
            model.path, config.policy.model_dump(), model.dtype, seed, algo=algo),
        "reference": ray.remote(ReferenceWorker).options(**options("reference", config.policy)).remote(
            model.ref_path or model.path, model.dtype, config.policy.micro_batch_size, config.policy.num_threads),
    }
    if config.uses_critic:
        from transformers import AutoTokenizer

        pad_id = AutoTokenizer.from_pretrained(model.path).pad_token_id
        actors["critic"] = ray.remote(CriticWorker).options(**options("critic", config.critic)).remote(
            model.critic_path or model.path, config.critic.model_dump(), model.dtype, seed, algo=algo,
            pad_token_id=pad_id)
    for role, handle in actors.items():
        _HANDLES[actor_name(run_uri, role)] = handle
    # Constructors run concurrently; a trivial call on each waits for all of them (and raises their errors).
    probes = [a.ready.remote() if role == "engine" else a.__ray_ready__.remote() for role, a in actors.items()]
    ray.get(probes, timeout=timeout_s)
    return {role: actor_name(run_uri, role) for role in actors}


def stop_workers(run_uri: str, namespace: str) -> None:
    import ray

    for role in ROLES:
        _HANDLES.pop(actor_name(run_uri, role), None)
        try:
            ray.kill(get_actor(run_uri, role, namespace))
        except ValueError:
            pass


if __name__ == "__main__":
    import ray
    from ray.util.state import list_actors

    ray.init(address=sys.argv[1] if len(sys.argv) > 1 else "auto")
    for a in list_actors(filters=[("state", "=", "ALIVE")]):
        print(a.ray_namespace, a.name, a.class_name)
