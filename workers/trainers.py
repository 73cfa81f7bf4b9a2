"""A run's trainer groups (policy, and critic when the estimator learns values) seen from the driver: train one
iteration's update from its committed experience, write a checkpoint, and bring the trainers to any committed policy
version — from the newest complete checkpoint at or before it, replaying the committed updates after it from their
experience tables (workers/trainer.py keeps the math; this module decides what to load and what to replay).

Replay is the same call as the update: the iteration's experience table, the same seed (seed × 7919 + n), the same
β (the advantages marker's), the same thread split; every rank draws the same micro-batch order. So a replayed state
equals the one the uninterrupted run held — bit for bit in deterministic CPU mode, which the fault harness checks —
and nothing is generated, scored or rewarded again. Each replay records a `replayed` event with the largest
difference between its metrics and the committed ones (0 in deterministic mode).

Run alone: nothing to run; stages/update.py, score.py and setup.py drive it; tests/flows/test_fault_harness.py
crashes runs between checkpoints.
"""

from __future__ import annotations

import time

from storage.faults import fault_point
from workers.cluster import get_group, on_all_ranks


def threads_each(config, trainer, working: int) -> int | None:
    """Torch threads for one of `working` models computing at once (a stage's policy, reference, critic, reward
    model), `trainer` its config section: on CPU they share the cores, so each takes its share of its num_threads,
    at least one; None (its num_threads) on GPUs or when it works alone. Fewer threads each beat the models' teams
    fighting over the cores (bench/RESULTS.md). A function of the config alone: a replayed update splits the same
    way as the original, so it rounds the same way."""
    if config.policy.num_gpus > 0 or working <= 1:
        return None
    return max(1, trainer.num_threads // working)


def update_metric_rows(results: dict[str, list[dict]]) -> list[dict]:
    """The update's metrics table (storage/schema.py METRICS): one row per (name, optimizer step)."""
    return [{"name": name, "step": step, "value": value}
            for steps in results.values() for step, m in enumerate(steps) for name, value in m.items()]


class TrainerPool:
    """The trainer groups of one run, found by name. `config` is the RunConfig, `store` the run's RunStore."""

    def __init__(self, config, run_uri: str, store):
        self.config, self.run_uri, self.store = config, run_uri, store
        self.roles = ["policy", "critic"] if config.uses_critic else ["policy"]

    def group(self, role: str) -> list:
        return get_group(self.run_uri, role, self.config.ray.namespace, getattr(self.config, role).num_ranks)

    def train(self, iteration: int, roles: list[str] | None = None) -> dict[str, list[dict]]:
        """Train `roles` (default: all) on the committed experience of `iteration`, concurrently (on CPU each on its
        share of the threads); every rank returns the metrics of the whole optimizer steps, rank 0's stand for the
        group. Each trainer then holds version `iteration`."""
        import ray

        experience = ray.put(self.store.read_stage(iteration, "advantages"))
        seed = self.config.seed * 7919 + iteration  # the same shuffles on a retry or a replay
        kl_coef = self.store.stage_marker(iteration, "advantages")["state"]["kl_coef"]
        refs = {role: on_all_ranks(self.group(role), "train", experience, iteration, seed, kl_coef,
                                   threads_each(self.config, getattr(self.config, role), len(self.roles)))
                for role in roles or self.roles}
        return {role: ray.get(r)[0] for role, r in refs.items()}

    def bring_to(self, version: int, roles: list[str] | None = None) -> dict:
        """Make `roles` (default: all) hold committed policy version `version`: a trainer already there (not
        half-way through an update) is left alone; one behind it but at or after the newest complete checkpoint
        ≤ `version` goes on from its memory; any other loads that checkpoint (or rebuilds the base model for 0).
        Then the committed updates up to `version` are replayed. Returns {"loaded": checkpoint or None,
        "replayed": [iterations]}."""
        import ray

        roles = roles or self.roles
        states = dict(zip(roles, ray.get([self.group(role)[0].state.remote() for role in roles])))
        if all(s["version"] == version and not s["dirty"] for s in states.values()):
            return {"loaded": None, "replayed": []}
        base = self.store.latest_checkpoint(version)
        start = {role: s["version"] if not s["dirty"] and base <= s["version"] <= version else None
                 for role, s in states.items()}
        loading = [role for role, v in start.items() if v is None]
        uri, opts = self.store.policy_checkpoint(base), self.config.storage.storage_options
        ray.get([ref for role in loading for ref in on_all_ranks(self.group(role), "ensure_version", base, uri, opts)])
        start.update({role: base for role in loading})
        replayed = []
        for n in range(min(start.values()) + 1, version + 1):
            t0 = time.perf_counter()
            results = self.train(n, [role for role in roles if start[role] < n])
            committed = {(r["name"], r["step"]): r["value"] for r in self.store.read_stage(n, "update").to_pylist()}
            diff = max((abs(r["value"] - committed[(r["name"], r["step"])]) for r in update_metric_rows(results)
                        if (r["name"], r["step"]) in committed), default=0.0)
            self.store.record_event(stage="update", iteration=n, action="replayed", roles=list(results),
                                    from_checkpoint=base, max_metric_diff=diff,
                                    seconds=round(time.perf_counter() - t0, 4))
            replayed.append(n)
        return {"loaded": base if loading else None, "replayed": replayed}

    def save(self, iteration: int, state: bool, hf: bool, background: bool,
             merged: bool = False) -> tuple[list[str], float]:
        """Write checkpoint `iteration`'s parts: every rank's DeepSpeed state of each role (`state`) and the policy's
        HF export (`hf`; a LoRA policy's adapter, plus with `merged` its full weights), now or (`background`) in the
        trainers' writer threads. Returns the part names, the update marker's list of what makes the checkpoint
        whole, and the seconds the driver was blocked."""
        import ray

        t0 = time.perf_counter()
        ckpt, opts = self.store.checkpoint_uri(iteration), self.config.storage.storage_options
        parts, saving = [], []
        if state:
            for role in self.roles:
                group = self.group(role)
                saving.append(on_all_ranks(group, "save_checkpoint", ckpt, opts, background))
                parts += [f"{role}-rank{r}" for r in range(len(group))]
        if hf:
            saving.append(on_all_ranks(self.group("policy"), "export_hf", ckpt, opts, background, merged))
            parts += ["hf", "merged"] if merged else ["hf"]
        if saving:
            ray.get(saving[0])
            # mid-checkpoint: the policy's state copied (written, unless in the background); the rest in flight
            fault_point("update.policy_saved", iteration)
            ray.get([ref for refs in saving[1:] for ref in refs])
        if not background:
            self.wait_for_writes()  # nothing of an earlier background write left behind either
        return parts, time.perf_counter() - t0

    def wait_for_writes(self) -> None:
        """Return once every rank's background checkpoint writes are done (raises a failed write's error)."""
        import ray

        ray.get([ref for role in self.roles for ref in on_all_ranks(self.group(role), "wait_for_writes")])
