"""Ray connection, the names of a run's actors and how to reach them: engines (engine-0, engine-1, ...), the policy
and critic groups (rank 0 named `policy` / `critic`, rank r `policy-rank{r}`), the reference and the reward model.

Actors are created once per training run (workers/launch.py; non-detached: they die with the driver process) and
named after the run, so any Prefect task in the driver finds them with `get_actor(run_uri, role)` — tasks never pass
actor handles. Every actor class derives from `RunActor`, so Ray prefixes its log lines with its name (the run and
role), which is how a run's log lines are told apart from another run's in one process.

Run alone to list the named actors of a Ray cluster (address, or "auto"):
    python -m workers.cluster auto
"""

import hashlib
import os
import socket
import sys
import threading
from collections.abc import Callable

_CONNECTED: dict[str, str | None] = {}  # the Ray this process joined: {"address": ray.address} (Ray is one per
# process, so a second run asking for another cluster must be refused, not silently joined to the first)
_CONNECTING = threading.Lock()  # two runs starting at once in one process must not both call ray.init


class RunActor:
    """Base of every actor class of a run: Ray prefixes an actor's log lines with `repr(actor)`, which is here its
    name (`my-run-1a2b3c4d:engine-0`) rather than its class, so each line says which run and role printed it."""

    def __repr__(self) -> str:
        import ray

        try:
            name = ray.get_runtime_context().get_actor_name()
        except Exception:  # noqa: BLE001 - not inside an actor (a plain instance in a test)
            name = None
        return name or type(self).__name__

    def gpus(self) -> list[str]:
        """Where this actor's GPUs are: `node-id/gpu-id` for each physical GPU Ray gave it (none: []). Two actors
        holding fractions of one GPU report the same entry; the weight sync picks its route from these
        (`weight_route`)."""
        import ray

        node = ray.get_runtime_context().get_node_id()
        return sorted(f"{node}/{gpu}" for gpu in ray.get_gpu_ids())


def free_port() -> int:
    """A TCP port free on this host now (the OS picks it): a rendezvous or a store binds it right after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_address() -> tuple[str, int]:
    """This node's IP and a free port: the rendezvous of a model group. Run it where rank 0 will run (e.g. a Ray task
    on rank 0's placement-group bundle) and pass both to every rank's constructor (`master_addr`, `master_port`)."""
    import ray

    return ray.util.get_node_ip_address(), free_port()


def worker_env() -> dict[str, str]:
    """Environment of every actor of the run (the job's runtime_env): OpenMP threads that sleep when idle.

    Several actors share the cores (engine, policy, critic, reference), each with its own OpenMP pool. With the
    default wait policy an idle pool spins, taking the cores from the actor that works: on the 2-core quickstart
    this made the score and update stages 7x slower. OMP_WAIT_POLICY and GOMP_SPINCOUNT set in the driver's
    environment are passed on (the latter then stands for SPIN_ENV too), and so are the crash tests' fault points
    (storage/faults.py), which may sit inside an actor.
    """
    env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    for var in ("GOMP_SPINCOUNT", "PPOFLOW_FAULTS", "PPOFLOW_FAULTS_ONCE_DIR"):
        if var in os.environ:
            env[var] = os.environ[var]
    return env


# What lets an actor's OpenMP threads spin between ops (libgomp's default wait: ~3 ms, then they sleep), overriding the
# PASSIVE policy of worker_env: for an actor whose several threads compute while no other actor does on its cores
# (the engines; on CPU the trainers, which run one thread each beside other models). Waking sleeping threads for each
# op made generation and the update clearly slower (bench/RESULTS.md). GOMP_SPINCOUNT=0 in the
# driver's environment keeps every actor's threads sleeping (for runs that share their cores with other work).
SPIN_ENV = {} if "GOMP_SPINCOUNT" in os.environ else {"GOMP_SPINCOUNT": "300000"}


def connect(address: str | None, num_cpus: int | None, namespace: str) -> None:
    """Join `address`, or start a local Ray. Idempotent within a process for the same address; another address
    while connected is refused (ray.address of the second run), since one process holds one Ray connection."""
    import ray

    with _CONNECTING:
        if ray.is_initialized():
            joined = _CONNECTED.get("address", address)
            if joined != address:
                raise RuntimeError(f"ray.address: this process is connected to Ray at {joined or 'a local Ray'}, "
                                   f"the run asks for {address or 'a local Ray'}; one process joins one Ray cluster: "
                                   "run it in another process, or give both runs the same ray.address")
            return
        _CONNECTED["address"] = address
        kwargs = {"namespace": namespace, "include_dashboard": False, "log_to_driver": True,
                  "runtime_env": {"env_vars": worker_env()}}
        if address is None:
            kwargs["num_cpus"] = num_cpus or os.cpu_count()
        # "local", not None: with None, ray.init joins a cluster that `ray start` left on this host, if any.
        ray.init(address=address or "local", **kwargs)


def forward_worker_logs(run_uri: str | None, handler, name: str | None = None) -> Callable[[], None]:
    """Also pass every line the run's actors print to `handler(line, is_err, source)`, in the driver
    (log_to_driver=True); returns the function that stops it. With `run_uri` None, every actor's line. Otherwise an
    actor's line is the run's when the actor's `RunActor` name starts with the run's prefix. While an actor's
    constructor runs, Ray knows it only by its class (its name comes with `repr` once it is built), so those lines,
    and Ray's own (the autoscaler's, the raylet's: the handler decides what of them to keep), go to every run
    forwarding at that moment: with one run per process, to that run. Handlers are kept by `name` (default: one per
    run): calling again replaces that name's handler.

    Ray offers no public hook for this; its driver-side dispatcher is a private API, so if it moves the lines are
    still printed to the driver's stdout and only the forwarding is lost."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return lambda: None
    prefix = actor_name(run_uri, "") if run_uri is not None else ""
    key = name or f"ppoflow:{run_uri}"

    def on_batch(data: dict) -> None:
        who = data.get("actor_name") or data.get("task_name") or ""
        if prefix and ":" in who and not who.startswith(prefix):  # another run's actor
            return
        source = " ".join(filter(None, [who.removeprefix(prefix), f"pid={data.get('pid')}"]))
        for line in data.get("lines", []):
            handler(line, bool(data.get("is_err")), source)

    dispatcher.remove_handler(key)
    dispatcher.add_handler(key, on_batch)
    return lambda: dispatcher.remove_handler(key)


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


def weight_route(engines: dict[int, list[str]], ranks: list[list[str]]) -> str:
    """The sync route for engines on GPU fractions (`generation.weight_sync: broadcast` asked), from the GPUs each
    engine to sync holds (`engines`, by engine index) and each policy rank holds (`ranks`, by rank), as
    `RunActor.gpus` reports them. NCCL refuses two ranks of one group on one GPU, so:
    - `ipc`: every engine holds one GPU and shares it with the policy rank of its own index (placement hybrid, or
      standard with both on one GPU): it loads the weights from that rank's GPU memory;
    - `broadcast`: the engines' GPUs are all distinct and none is policy rank 0's (the sender);
    - `object_store` otherwise."""
    if engines and all(len(g) == 1 and i < len(ranks) and g == ranks[i] for i, g in engines.items()):
        return "ipc"
    held = [gpu for g in engines.values() for gpu in g]
    if held and len(set(held)) == len(held) and not set(held) & set(ranks[0] if ranks else []):
        return "broadcast"
    return "object_store"


def on_all_ranks(group: list, method: str, *args) -> list:
    """Call a trainer method on every rank of a group, in the same order from this one caller (each method is
    collective: the ranks meet inside it). ObjectRefs in rank order; rank 0's result is the group's."""
    return [getattr(rank, method).remote(*args) for rank in group]


if __name__ == "__main__":
    import ray
    from ray.util.state import list_actors

    ray.init(address=sys.argv[1] if len(sys.argv) > 1 else "auto")
    for a in list_actors(filters=[("state", "=", "ALIVE")]):
        print(a.ray_namespace, a.name, a.class_name)
