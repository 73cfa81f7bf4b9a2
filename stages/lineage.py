"""Scheduled retraining: what the next run of a lineage trains on, from which policy, and its record when it ends.

A lineage is a chain of runs over a growing folder of prompt files (JSONL/Parquet). Each run trains on the files
that arrived since the previous run started and warm-starts its policy from the lineage's promoted policy (the final
HF export of the latest run the promotion gate let through, stages/gate.py; without a gate every finished run is
promoted); the reference model (KL anchor) and the critic's initialisation stay the lineage's base model. With
`policy.lora` the runs share the base model and carry an adapter from run to run: a run starts from the promoted
run's adapter (`policy.lora.init_adapter`), its engines from that adapter merged into the base. Records live in storage
(storage/lineage.py): a run's files count as consumed as soon as its record exists, and a run that did not finish is
resumed by the next trigger (same run id, same files) instead of being replaced, so no file is trained on twice or
skipped. Two triggers at once plan the same run id, and the run lock lets only one of them write it.

Run alone (what the next trigger would do, without training):
    python -m stages.lineage LINEAGE PROMPTS_DIR CONFIG [dotted.key=value ...]
"""

import json
import sys

from prefect import task
from prefect.cache_policies import NO_CACHE

from stages.config import load_config


def _base(config_path: str, overrides: list[str] | None):
    return load_config(config_path, list(overrides or []))


def next_run(lineage: str, prompts_dir: str, config_path: str, overrides: list[str] | None = None) -> dict:
    """Decide the next run; never writes. `action` is `resume`, `train` or `nothing_new`; `overrides` are the dotted
    overrides the run adds to the lineage's config."""
    return _next_run(_base(config_path, overrides), lineage, prompts_dir)


def _next_run(config, lineage: str, prompts_dir: str) -> dict:
    from storage.lineage import LineageStore
    from storage.prompts import list_prompt_files

    opts = config.storage.storage_options
    lineages = LineageStore(config.storage.root, lineage, opts)
    records = lineages.records()
    if records and records[-1]["status"] != "complete":
        last = records[-1]
        return {"action": "resume", "lineage": lineage, "run_id": last["run_id"], "parent": last["parent"],
                "prompt_files": last["prompt_files"], "overrides": last["overrides"],
                "message": f"lineage {lineage}: resuming {last['run_id']}, which did not finish"}
    if records and records[-1].get("promotion", "promoted") is None:  # trained, but the gate never decided
        last = records[-1]
        from storage.run import find_run

        return {"action": "gate", "lineage": lineage, "run_id": last["run_id"], "parent": last["parent"],
                "run_uri": find_run(config.storage.root, last["run_id"], opts)[0],
                "prompt_files": last["prompt_files"], "overrides": last["overrides"],
                "message": f"lineage {lineage}: {last['run_id']} finished training; its promotion gate runs now"}
    consumed = {f for r in records for f in r["prompt_files"]}
    files = [f for f in list_prompt_files(prompts_dir, opts) if f not in consumed]
    parent = lineages.promoted()  # a rejected run is no parent: the next one starts from the promoted policy
    if not files:
        since = f" since run {records[-1]['run_id']}" if records else ""
        return {"action": "nothing_new", "lineage": lineage, "parent": parent and parent["run_id"],
                "message": f"lineage {lineage}: no new prompt files in {prompts_dir}{since}; nothing to train"}
    run_id = f"{lineage}-{len(records) + 1:04d}"
    base = config.model
    init = parent["final_policy"] if parent else base.path
    overrides = [f"run_id={run_id}", f"data.prompts={json.dumps(files)}", f"model.path={init}",
                 f"model.ref_path={base.ref_path or base.path}", f"model.critic_path={base.critic_path or base.path}"]
    if config.policy.lora is not None and parent is not None:
        if not parent.get("final_adapter"):
            raise ValueError(f"policy.lora: lineage {lineage} warm-starts from {parent['run_id']}, which trained "
                             "no LoRA adapter (full fine-tuning); a LoRA lineage needs adapters from its first run "
                             "on: start a new lineage, or train this one without policy.lora")
        overrides.append(f"policy.lora.init_adapter={parent['final_adapter']}")
    rejected = [r["run_id"] for r in records if r.get("promotion") == "rejected"]
    return {"action": "train", "lineage": lineage, "run_id": run_id, "parent": parent and parent["run_id"],
            "prompt_files": files, "overrides": overrides, "init_policy": init,
            "message": f"lineage {lineage}: {run_id} trains on {len(files)} new prompt file(s)"
                       + (f" from {parent['run_id']}'s final policy (promoted)" if parent else " from the base model")
                       + (f"; rejected: {', '.join(rejected)}" if rejected else "")}


def plan_retrain(lineage: str, prompts_dir: str, config_path: str, overrides: list[str] | None = None) -> dict:
    """`next_run`, and for a new run its record (status `started`): from here on its prompt files are consumed."""
    from storage.lineage import LineageStore

    config = _base(config_path, overrides)
    plan = _next_run(config, lineage, prompts_dir)
    if plan["action"] == "train":
        LineageStore(config.storage.root, lineage, config.storage.storage_options).write({
            "lineage": lineage, "run_id": plan["run_id"], "parent": plan["parent"],
            "prompt_files": plan["prompt_files"], "overrides": plan["overrides"], "init_policy": plan["init_policy"],
            "status": "started", "final_policy": None, "final_adapter": None, "promotion": None,
        })
    return plan


def finish_retrain(lineage: str, run_uri: str, config_path: str, overrides: list[str] | None = None) -> dict:
    """Mark the run complete with its final policy (the HF export of its last committed update; a LoRA run's merged
    export, and its adapter as `final_adapter`). Without `retrain.gate` the run is promoted here; with one its
    promotion waits for the gate (stages/gate.py)."""
    from storage.lineage import LineageStore
    from storage.run import RunStore

    config = _base(config_path, overrides)
    store, lineages = RunStore(run_uri, config.storage.storage_options), LineageStore(
        config.storage.root, lineage, config.storage.storage_options)
    record = next(r for r in lineages.records() if r["run_id"] == store.run_id)
    last = store.latest_committed("update")
    if last < 1:
        raise RuntimeError(f"run {store.run_id} of lineage {lineage} committed no update; it cannot be a parent")
    store.pin_checkpoint(last, f"final policy of lineage {lineage}")  # the next run starts from it: never rotated
    final = f"{store.checkpoint_uri(last)}/hf"
    record.update(status="complete", final_policy=final, final_adapter=None, final_iteration=last)
    if config.policy.lora is not None:
        if not store.hf_export_ready(last, "merged"):
            raise RuntimeError(f"run {store.run_id} of lineage {lineage} wrote no merged export of its final policy "
                               f"(policy.lora.merged_export: {config.policy.lora.merged_export}); a lineage's next run "
                               "and the gate load full weights: set policy.lora.merged_export to final or every")
        record.update(final_policy=f"{store.checkpoint_uri(last)}/merged", final_adapter=final)
    if config.retrain.gate is None:
        record["promotion"] = "promoted"
    lineages.write(record)
    if config.retrain.gate is None:
        lineages.promote(record, config.model.ref_path or config.model.path, None)
    return record


@task(name="plan-retrain", cache_policy=NO_CACHE)
def plan_retrain_task(lineage: str, prompts_dir: str, config_path: str, overrides: list[str] | None = None) -> dict:
    return plan_retrain(lineage, prompts_dir, config_path, overrides)


@task(name="finish-retrain", cache_policy=NO_CACHE)
def finish_retrain_task(lineage: str, run_uri: str, config_path: str, overrides: list[str] | None = None) -> dict:
    return finish_retrain(lineage, run_uri, config_path, overrides)


if __name__ == "__main__":
    print(next_run(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])["message"])
