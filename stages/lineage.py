"""Scheduled retraining: what the next run of a lineage trains on, from which policy, and its record when it ends.

A lineage is a chain of runs over a growing folder of prompt files (JSONL/Parquet). Each run trains on the files
that arrived since the previous run started and warm-starts its policy from the previous run's final HF export; the
reference model (KL anchor) and the critic's initialisation stay the lineage's base model. Records live in storage
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
    records = LineageStore(config.storage.root, lineage, opts).records()
    if records and records[-1]["status"] != "complete":
        last = records[-1]
        return {"action": "resume", "lineage": lineage, "run_id": last["run_id"], "parent": last["parent"],
                "prompt_files": last["prompt_files"], "overrides": last["overrides"],
                "message": f"lineage {lineage}: resuming {last['run_id']}, which did not finish"}
    consumed = {f for r in records for f in r["prompt_files"]}
    files = [f for f in list_prompt_files(prompts_dir, opts) if f not in consumed]
    parent = records[-1] if records else None
    if not files:
        since = f" since run {parent['run_id']}" if parent else ""
        return {"action": "nothing_new", "lineage": lineage, "parent": parent and parent["run_id"],
                "message": f"lineage {lineage}: no new prompt files in {prompts_dir}{since}; nothing to train"}
    run_id = f"{lineage}-{len(records) + 1:04d}"
    base = config.model
    init = parent["final_policy"] if parent else base.path
    overrides = [f"run_id={run_id}", f"data.prompts={json.dumps(files)}", f"model.path={init}",
                 f"model.ref_path={base.ref_path or base.path}", f"model.critic_path={base.critic_path or base.path}"]
    return {"action": "train", "lineage": lineage, "run_id": run_id, "parent": parent and parent["run_id"],
            "prompt_files": files, "overrides": overrides, "init_policy": init,
            "message": f"lineage {lineage}: {run_id} trains on {len(files)} new prompt file(s)"
                       + (f" from {parent['run_id']}'s final policy" if parent else " from the base model")}


def plan_retrain(lineage: str, prompts_dir: str, config_path: str, overrides: list[str] | None = None) -> dict:
    """`next_run`, and for a new run its record (status `started`): from here on its prompt files are consumed."""
    from storage.lineage import LineageStore

    config = _base(config_path, overrides)
    plan = _next_run(config, lineage, prompts_dir)
    if plan["action"] == "train":
        LineageStore(config.storage.root, lineage, config.storage.storage_options).write({
            "lineage": lineage, "run_id": plan["run_id"], "parent": plan["parent"],
            "prompt_files": plan["prompt_files"], "overrides": plan["overrides"], "init_policy": plan["init_policy"],
            "status": "started", "final_policy": None,
        })
    return plan


def finish_retrain(lineage: str, run_uri: str, config_path: str, overrides: list[str] | None = None) -> dict:
    """Mark the run complete with its final policy (the HF export of its last committed update)."""
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
    record.update(status="complete", final_policy=f"{store.checkpoint_uri(last)}/hf", final_iteration=last)
    lineages.write(record)
    return record


@task(name="plan-retrain", cache_policy=NO_CACHE)
def plan_retrain_task(lineage: str, prompts_dir: str, config_path: str, overrides: list[str] | None = None) -> dict:
    return plan_retrain(lineage, prompts_dir, config_path, overrides)


@task(name="finish-retrain", cache_policy=NO_CACHE)
def finish_retrain_task(lineage: str, run_uri: str, config_path: str, overrides: list[str] | None = None) -> dict:
    return finish_retrain(lineage, run_uri, config_path, overrides)


if __name__ == "__main__":
    print(next_run(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])["message"])
