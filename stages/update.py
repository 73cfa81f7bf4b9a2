"""Update stage: PPO epochs over the committed experience for the policy (and the critic), and every
`checkpoint.every` iterations a checkpoint.

Both trainers first come to the committed state of the previous iteration (workers/trainers.py: from memory, or the
newest complete checkpoint plus the committed updates after it, replayed), so a retried or resumed update is the same
update, never one on top of a half-finished one. The update marker commits the metrics and the policy version; when
the iteration writes a checkpoint it also names the checkpoint's parts (each rank's DeepSpeed state, the HF export),
which may still be written in the background while the next iterations run: the checkpoint is trusted once every
part is whole (storage/run.py checkpoint_complete). After the commit, complete checkpoints older than the newest
`storage.keep_checkpoints` are deleted.

Tests: tests/workers/test_trainer.py and test_trainer_group.py (the update's math), tests/storage/test_run.py
(checkpoint trust and rotation); crash/resume between checkpoints: tests/flows/test_fault_harness.py
"""

import time

from stages.common import Output, StageRun, fault_point, stage


def _rotate_checkpoints(s: StageRun, marker: dict) -> None:
    if s.config.storage.keep_checkpoints is not None:  # only now: the new checkpoint's update is committed
        s.store.rotate_checkpoints(s.config.storage.keep_checkpoints)


def checkpoint_due(config, iteration: int) -> tuple[bool, bool]:
    """Whether `iteration` writes the trainers' DeepSpeed state and the HF export: every checkpoint.every
    (hf_every) iterations, and both after the last one (the run's final policy)."""
    ck, last = config.checkpoint, iteration == config.iterations
    return iteration % ck.every == 0 or last, iteration % (ck.hf_every or ck.every) == 0 or last


@stage("update", schema="metrics", after_commit=_rotate_checkpoints, trainers=True)
def update(s: StageRun) -> Output:
    import numpy as np
    import pyarrow as pa

    from storage.schema import METRICS
    from workers.trainers import update_metric_rows

    config, store, iteration = s.config, s.store, s.iteration
    trainers = s.trainers()
    trainers.bring_to(iteration - 1)
    ckpt = store.clear_uncommitted_checkpoint(iteration)  # leftovers of an attempt that never committed

    train_started = time.perf_counter()
    results = trainers.train(iteration)  # policy and critic at once: wall time of both
    train_s = time.perf_counter() - train_started
    fault_point("update.after_train", iteration)
    state, hf = checkpoint_due(config, iteration)
    # The last iteration's checkpoint is waited for: the run's final policy must be whole when the run ends.
    background = config.checkpoint.background and iteration < config.iterations
    lora = config.policy.lora
    merged = hf and lora is not None and (lora.merged_export == "every" or
                                          (lora.merged_export == "final" and iteration == config.iterations))
    parts, save_s = trainers.save(iteration, state, hf, background, merged) if state or hf else ([], 0.0)

    rows = update_metric_rows(results)
    metrics = {name: float(np.mean([r["value"] for r in rows if r["name"] == name]))
               for name in dict.fromkeys(r["name"] for r in rows)}
    metrics["perf/train_s"] = train_s
    metrics["perf/checkpoint_s"] = save_s  # what the update waited for (a host copy when writing in the background)
    fields = {"policy_version": iteration}
    if parts:
        fields["checkpoint"] = {"uri": ckpt, "parts": parts, "state": state, "hf": hf, "merged": merged}
    return Output(pa.Table.from_pylist(rows, schema=METRICS), metrics, fields)


update_task = update.task
