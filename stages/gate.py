"""Promotion gate of a retraining lineage: the run just trained (the candidate) and the lineage's promoted policy
answer the same held-out prompts (`retrain.gate.eval_prompts`, same seeds), each answer scored by the rule reward;
the candidate is promoted only when its score beats the promoted one's by `retrain.gate.min_delta`.

Both policies are full HF folders (a LoRA run's merged export), so one engine of `generation.backend` serves both:
it starts from the promoted policy (the lineage's base model before any promotion) and loads the candidate in place
with the sync stage's path route. The verdict is recorded in the run's lineage record (`promotion`, `gate`); a
promotion moves the lineage's serving pointer (storage/lineage.py `_SERVING.json`); a rejected run is kept, and
the next trigger starts from the promoted policy again (stages/lineage.py). A Prefect artifact `{lineage}-gate`
shows the comparison, and with `tracking.logger: mlflow` every candidate becomes a version of the registered model
`{tracking.project}-{lineage}`, tagged with its scores and verdict, the alias `promoted` on the promoted one.

Run alone (gate a trained run of a lineage):
    python -m stages.gate LINEAGE RUN_URI configs/quickstart.yaml [dotted.key=value ...]
Tests: tests/flows/test_retrain.py
"""

import sys
import time

from prefect import task
from prefect.cache_policies import NO_CACHE

from stages.config import load_config


def score_policies(config, folders: list[str]) -> list[dict]:
    """The gate's metrics (eval/pass_rate, eval/reward_mean, ...) of each HF model folder in `folders`, answering
    retrain.gate's prompts on one engine actor: created from folders[0], then loading each next folder in place."""
    import ray

    from stages.evaluate import eval_requests, scored_answers
    from storage.prompts import read_prompts
    from workers.cluster import connect

    gate, data, gen = config.retrain.gate, config.data, config.generation
    rows = read_prompts(gate.eval_prompts, data.prompt_key, config.storage.storage_options,
                        label_key=data.label_key, chat=data.apply_chat_template, input_template=data.input_template,
                        field="retrain.gate.eval_prompts")[: gate.max_prompts]
    requests = eval_requests(config, rows, gate.n_samples, gate.temperature)
    connect(config.ray.address, config.ray.num_cpus, config.ray.namespace)
    common = {"model_path": folders[0], "seed": config.seed, "dtype": config.model.dtype,
              "max_model_len": gen.max_model_len}
    options = {"num_cpus": gen.num_cpus, "num_gpus": gen.num_gpus}
    if gen.backend == "hf":
        from workers.hf_engine import HFEngine

        engine = ray.remote(HFEngine).options(**options).remote(**common, num_threads=gen.num_threads)
    else:
        from workers.vllm_engine import VLLMEngine

        on_gpu = gen.num_gpus > 0
        engine = ray.remote(VLLMEngine).options(**options).remote(
            **common, enforce_eager=gen.enforce_eager, kv_cache_gib=None if on_gpu else gen.kv_cache_gib,
            gpu_memory_utilization=gen.gpu_memory_utilization)
    try:
        out = []
        for version, folder in enumerate(folders):
            if version > 0:
                ray.get(engine.update_weights_from_path.remote(folder, version))
            results = ray.get(engine.generate.remote(requests, version))
            out.append(scored_answers(config, rows, results, version, gate.reward_fn or config.reward.fn,
                                      gate.pass_threshold, f"gate{version}")[1])
        return out
    finally:
        ray.wait([engine.close.remote()], timeout=10)  # Engine.close: what the kill would leave on disk
        ray.kill(engine)


def run_gate(lineage: str, run_uri: str, config_path: str, overrides: list[str] | None = None) -> dict:
    """Gate the trained run at `run_uri` of `lineage`: score it and the promoted policy, record the verdict in its
    lineage record, move the serving pointer on a promotion, publish the comparison. Returns the record."""
    from storage.lineage import LineageStore
    from storage.run import RunStore

    config = load_config(config_path, list(overrides or []))
    gate = config.retrain.gate
    if gate is None:
        raise ValueError("retrain.gate: not set; without a gate every finished run is promoted (stages/lineage.py)")
    lineages = LineageStore(config.storage.root, lineage, config.storage.storage_options)
    run_id = RunStore(run_uri, config.storage.storage_options).run_id
    record = next(r for r in lineages.records() if r["run_id"] == run_id)
    if record["status"] != "complete":
        raise RuntimeError(f"run {run_id} of lineage {lineage} has not finished training; resume it first")
    base = config.model.ref_path or config.model.path
    incumbent = lineages.promoted()
    t0 = time.perf_counter()
    promoted_m, candidate_m = score_policies(config, [incumbent["final_policy"] if incumbent else base,
                                                      record["final_policy"]])
    key = f"eval/{gate.metric}"
    delta = candidate_m[key] - promoted_m[key]
    verdict = "promoted" if delta >= gate.min_delta else "rejected"
    record.update(promotion=verdict, gate={
        "metric": gate.metric, "candidate": candidate_m[key], "promoted": promoted_m[key],
        "promoted_run": incumbent["run_id"] if incumbent else None, "delta": delta, "min_delta": gate.min_delta,
        "prompts": candidate_m["eval/prompts"], "n_samples": gate.n_samples,
        "candidate_metrics": candidate_m, "promoted_metrics": promoted_m,
        "seconds": round(time.perf_counter() - t0, 2)})
    if config.tracking.logger == "mlflow":
        _register(config, lineage, record)
    lineages.write(record)
    if verdict == "promoted":  # the pointer moves only once the record says so
        lineages.promote(record, base, candidate_m[key])
    _publish(lineage, record)
    return record


def gate_table(lineage: str, record: dict) -> str:
    """The comparison as Markdown (the artifact's body)."""
    g = record["gate"]
    against = g["promoted_run"] or "the base model"
    lines = [f"### {lineage}: {record['run_id']} {record['promotion']}",
             "", f"{g['metric']} on {g['prompts']} held-out prompts × {g['n_samples']}: candidate "
             f"{g['candidate']:.4f} vs promoted ({against}) {g['promoted']:.4f}, delta {g['delta']:+.4f}, "
             f"promotion needs ≥ {g['min_delta']:+.4f}", "",
             "| policy | run | weights | pass_rate | reward_mean |", "|---|---|---|---|---|"]
    for name, run, weights, m in (("candidate", record["run_id"], record["final_policy"], g["candidate_metrics"]),
                                  ("promoted", against, "", g["promoted_metrics"])):
        lines.append(f"| {name} | {run} | {weights} | {m['eval/pass_rate']:.4f} | {m['eval/reward_mean']:.4f} |")
    return "\n".join(lines) + "\n"


def _publish(lineage: str, record: dict) -> None:
    """The comparison as a Markdown artifact of the flow run (`{lineage}-gate`, a new version per gate)."""
    import re

    from prefect.artifacts import create_markdown_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return  # called outside a flow: no flow run to attach it to
    key = re.sub(r"[^a-z0-9-]", "-", f"{lineage.lower()}-gate")
    create_markdown_artifact(gate_table(lineage, record), key=key,
                             description=f"promotion gate of {record['run_id']}: {record['promotion']}")


def _register(config, lineage: str, record: dict) -> None:
    """The candidate as a version of the MLflow registered model `{tracking.project}-{lineage}` (its source: the
    candidate's HF folder), tagged with the gate's scores and verdict; the alias `promoted` moves to it on a
    promotion."""
    import os

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    t = config.tracking
    # the trackers' default store (stages/tracking.py): {tracking.dir or a local storage root}/mlflow.db
    uri = t.mlflow_tracking_uri or f"sqlite:///{os.path.abspath(t.dir or config.storage.root)}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = f"{t.project}-{lineage}"
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    g = record["gate"]
    version = client.create_model_version(name, source=record["final_policy"], tags={
        "ppoflow.run_id": record["run_id"], "ppoflow.promotion": record["promotion"],
        f"ppoflow.gate.{g['metric']}": str(g["candidate"]), "ppoflow.gate.promoted_score": str(g["promoted"]),
        "ppoflow.gate.delta": str(g["delta"])}).version
    if record["promotion"] == "promoted":
        client.set_registered_model_alias(name, "promoted", version)
    record["mlflow_model_version"] = f"{name}/{version}"


@task(name="promotion-gate", cache_policy=NO_CACHE)
def gate_task(lineage: str, run_uri: str, config_path: str, overrides: list[str] | None = None) -> dict:
    return run_gate(lineage, run_uri, config_path, overrides)


if __name__ == "__main__":
    r = run_gate(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
    print(gate_table(sys.argv[1], r))
