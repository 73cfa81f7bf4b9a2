"""Start and stop every actor of a run: the engines (workers/engines.py places them), the policy and critic groups,
the reference and the reward model, in the run's placement groups.

`start_workers` returns the handles: the caller keeps them for as long as the run's workers should live (Ray kills a
non-detached actor once no handle to it is left, name or not; stages/setup.py keeps them in the run's context).

Run alone: nothing to run; stages/setup.py calls it, tests/flows/* run it for real.
"""

from __future__ import annotations

from workers.cluster import SPIN_ENV, actor_name, group_address, rank_role
from workers.engines import bundle_strategy, create_engines, placement_group, remove_placement_group


def start_workers(run_uri: str, config, timeout_s: float = 600.0) -> dict:
    """Create (or find) every actor the config needs and wait until all are ready. Returns {role: handle}, the
    engines as `engine-{i}`, the ranks of a group as `policy`, `policy-rank1`, .... Engines (and, with
    generation.placement hybrid, the trainers) take their resources from the run's placement group, trainer groups
    under standard placement from a second one (workers/engines.py)."""
    import ray

    from workers.config import deepspeed_overrides
    from workers.trainer import CriticWorker, PolicyWorker, ReferenceWorker

    ns, seed, model = config.ray.namespace, config.seed, config.model
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
        # On CPU a model computes with several threads only while it works alone (workers/trainers.py: threads_each);
        # not so the ranks of a group, which compute at once, nor the reward model (its own num_threads).
        if trainer.num_gpus == 0 and getattr(trainer, "num_ranks", 1) == 1 and role != "reward":
            opts["runtime_env"] = {"env_vars": SPIN_ENV}
        return opts

    def group(role: str, cls, trainer, model_path: str, **kwargs) -> dict:
        """The `trainer.num_ranks` rank actors of one DeepSpeed model group, {rank_role(role, r): handle}."""
        # The user's DeepSpeed JSON is read here, on the driver: the ranks may run on hosts without the file.
        overrides = deepspeed_overrides(trainer.deepspeed_config) if trainer.deepspeed_config else None
        n, rendezvous = trainer.num_ranks, {}
        if n > 1:  # rank 0's node address and a free port there, looked up on rank 0's bundle
            where = {"scheduling_strategy": bundle_strategy(pg, layout.trainer_bundles[0])}
            addr, port = ray.get(ray.remote(group_address).options(num_cpus=0, **where).remote(), timeout=timeout_s)
            rendezvous = {"world_size": n, "master_addr": addr, "master_port": port}
        return {rank_role(role, r): ray.remote(cls).options(**options(rank_role(role, r), trainer, r)).remote(
            model_path, trainer, model.dtype, seed, rank=r, deepspeed_overrides=overrides, **rendezvous, **kwargs)
            for r in range(n)}

    actors = {f"engine-{i}": engine for i, engine in enumerate(engines)}
    # Dr. GRPO's seq-mean-token-sum-norm divides by a constant length: the response length limit.
    # A LoRA policy sits on the base model (model.ref_path, when a lineage warm-starts its adapter) and is its own
    # reference (the adapter disabled): no reference actor, no second copy of the weights.
    lora = config.policy.lora is not None
    actors.update(group("policy", PolicyWorker, config.policy, (model.ref_path or model.path) if lora else model.path,
                        algo=config.algo, norm_len=config.generation.max_new_tokens))
    if not lora:
        actors["reference"] = ray.remote(ReferenceWorker).options(**options("reference", config.policy)).remote(
            model.ref_path or model.path, model.dtype, config.policy)
    if config.uses_critic:
        from transformers import AutoTokenizer

        pad_id = AutoTokenizer.from_pretrained(model.path).pad_token_id
        actors.update(group("critic", CriticWorker, config.critic, model.critic_path or model.path, algo=config.algo,
                            pad_token_id=pad_id))
    if config.reward.model is not None:
        from workers.reward import RewardModelWorker

        rm = config.reward.model
        actors["reward"] = ray.remote(RewardModelWorker).options(**options("reward", rm)).remote(
            rm.path, rm.dtype or model.dtype, rm.micro_batch_size, rm.num_threads, rm.apply_chat_template)
    # Constructors run concurrently; a trivial call on each waits for all of them (and raises their errors).
    probes = [a.ready.remote() if role.startswith("engine") else a.__ray_ready__.remote() for role, a in actors.items()]
    ray.get(probes, timeout=timeout_s)
    return actors


def stop_workers(run_uri: str, namespace: str) -> None:
    """Kill every actor of the run (engines, each rank of the trainer groups, reference, reward model) and remove
    its placement groups."""
    import ray

    prefix = actor_name(run_uri, "")
    actors = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == namespace and entry["name"].startswith(prefix):
            try:
                actors[entry["name"]] = ray.get_actor(entry["name"], namespace=namespace)
            except ValueError:  # died meanwhile
                pass
    # An engine first removes what a kill would leave on disk (Engine.close); a busy or dead one is killed without.
    closing = [a.close.remote() for name, a in actors.items() if name.startswith(prefix + "engine-")]
    ray.wait(closing, num_returns=len(closing), timeout=10)
    for actor in actors.values():
        ray.kill(actor)
    remove_placement_group(run_uri)
