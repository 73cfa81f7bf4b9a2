"""Update stage: PPO epochs over the experience for the policy (and the critic), then a committed checkpoint.

Both trainers first return to the committed state of the previous iteration, so a retried or resumed update is the
same update, never one on top of a half-finished one. The checkpoint (DeepSpeed state of each model + an HF export of
the policy) is written before the stage marker, which lists its files: the marker commits both. After the commit,
checkpoints older than the newest `storage.keep_checkpoints` are deleted (storage/run.py rotate_checkpoints).

Tests: tests/stages/test_update.py; crash/resume: tests/flows/test_fault_harness.py
"""

import time

from prefect import task
from prefect.cache_policies import NO_CACHE

from stages.common import (checkpoint_uri, commit, fault_point, on_all_ranks, skip_if_committed, stage_errors,
                           store_of, threads_each, trainer_group)


def update(config, run_uri: str, iteration: int) -> dict:
    import numpy as np
    import pyarrow as pa
    import ray

    from storage.schema import METRICS

    store = store_of(config, run_uri)
    if (done := skip_if_committed(store, iteration, "update")) is not None:
        return done
    started = time.perf_counter()
    fault_point("update.start", iteration)
    experience = ray.put(store.read_stage(iteration, "advantages"))
    opts = config.storage.storage_options
    roles = ["policy", "critic"] if config.uses_critic else ["policy"]
    groups = {role: trainer_group(config, run_uri, role) for role in roles}
    ray.get([ref for g in groups.values()
             for ref in on_all_ranks(g, "ensure_version", iteration - 1, checkpoint_uri(store, iteration - 1), opts)])
    ckpt = store.clear_uncommitted_checkpoint(iteration)

    seed = config.seed * 7919 + iteration  # same shuffles on a retry: the update is reproducible
    kl_coef = store.stage_marker(iteration, "advantages")["state"]["kl_coef"]
    train_started = time.perf_counter()
    # Every rank returns the metrics of the whole optimizer steps: rank 0's stand for the group.
    # Policy and critic train at once: on CPU each on its share of the threads.
    trained = {role: on_all_ranks(g, "train", experience, iteration, seed, kl_coef,
                                  threads_each(config, getattr(config, role), len(groups)))
               for role, g in groups.items()}
    results = [ray.get(refs)[0] for refs in trained.values()]
    train_s = time.perf_counter() - train_started
    fault_point("update.after_train", iteration)
    # The ranks of a group write their own shards into one folder; rank 0 writes the HF export. A group's saving time
    # is its slowest rank's.
    saving = [on_all_ranks(g, "save_checkpoint", ckpt, opts) for g in groups.values()]
    saving.append(on_all_ranks(groups["policy"], "export_hf", ckpt, opts))
    save_s = [max(ray.get(saving[0]))]
    fault_point("update.policy_saved", iteration)  # mid-checkpoint: the critic's state and HF export still running
    save_s += [max(ray.get(refs)) for refs in saving[1:]]
    fault_point("update.before_commit", iteration)

    rows = [{"name": name, "step": step, "value": value}
            for steps in results for step, m in enumerate(steps) for name, value in m.items()]
    metrics = {name: float(np.mean([r["value"] for r in rows if r["name"] == name]))
               for name in dict.fromkeys(r["name"] for r in rows)}
    metrics["perf/train_s"] = train_s  # policy and critic train concurrently: wall time of both
    metrics["perf/checkpoint_s"] = float(sum(save_s))
    marker = commit(store, config, iteration, "update", pa.Table.from_pylist(rows, schema=METRICS), "metrics",
                    started, metrics, policy_version=iteration,
                    checkpoint={"uri": ckpt, "files": store.checkpoint_files(iteration)})
    if config.storage.keep_checkpoints is not None:  # only now: the new checkpoint is committed
        store.rotate_checkpoints(config.storage.keep_checkpoints)
    fault_point("update.after_commit", iteration)
    return marker


@task(name="update", task_run_name="update-{iteration}", cache_policy=NO_CACHE)
@stage_errors
def update_task(config, run_uri: str, iteration: int) -> dict:
    return update(config, run_uri, iteration)
