"""The asynchronous pipeline (algo.max_staleness = S ≥ 1): which policy version each iteration samples from, and the
logprob gate where engine and trainer hold the same version.

Iteration n's rollout comes from policy version `behaviour_version` = max(0, n − 1 − S), exactly: never a newer one,
whatever the timing, so the rollouts and all that is computed from them are a function of (seed, iteration) alone
and two runs with one seed commit the same tables. flows/ppo.py wires it:

    iteration n:  submit generate n+S  (the engines serve n − 1: sync n−1 put it there)
                  score n → advantages n → update n          (the trainers, while generate n+S samples)
                  wait for generate n+S                       (weights change between rollouts, never mid-sample)
                  sync n → evaluate n                         (the engines now serve n, which generate n+S+1 needs)

Before the first iteration of a process the rollouts n..n+S−1 are generated (the base policy's at the start of a run;
already committed when a run resumes: sync n−1 committed only after generate n−1+S did), then the committed sync n−1
is called once more: skipped, it brings the engines to its version (stages/sync.py). Every stage still commits on its
own marker; a crash with update n and generate n+S in flight resumes both from their last commits, and a committed
rollout keeps its staleness and is never sampled again.

The engines and trainers own separate resources (`generation.placement: standard`; stages/config.py refuses hybrid),
so generation runs on the engines' cores or GPU while the trainers use theirs. The trainer stages hold the run's
trainer lock (stages/context.py) while they rely on the trainers' state; a generate stage beside them takes it only to
move the policy, which it does only to re-sync an engine that died mid-sample (workers/engine_pool.py recovery).

The logprob gate (stages/score.py) compares the engine's logprobs with the trainer's on the same tokens and weights. A
stale rollout's engine logprobs are of version n − 1 − S and the trainer scores it with n − 1: their gap is the
off-policy distance the IS weight corrects (algo.is_correction), not a fault. So under S ≥ 1 the rollout gate applies
to rollouts of staleness 0 (the first ones of a run), and each sync checks its new version instead (`probe_engines`):
every engine samples a few of the iteration's prompts at version n and the policy, at n too, scores those tokens,
with the same bound. Every version a rollout is drawn from is thus gated before the first rollout drawn from it.

Run alone: nothing to run; tests/stages/test_pipeline.py (versions, config rules), tests/flows/test_async.py (two runs
at S = 1 commit the same tables, the overlap, the probe catching a broken sync), tests/flows/test_fault_harness.py
(SIGKILL while both are in flight); docs/async.md.
"""

from __future__ import annotations

PROBE_PROMPTS = 4
"""Prompts of the iteration's rollout that each engine samples (one response each) at a sync under S ≥ 1, for the
logprob gate at the new version."""
PROBE_TOKENS = 16
"""At most this many new tokens per probe sample. The probe sits on the pipeline's critical path (the next rollout
waits for the sync), and a broken sync shows on every token: 4 prompts x 16 tokens per engine tell it as surely as
full-length samples, in a fraction of the decode steps."""


def behaviour_version(config, iteration: int) -> int:
    """The policy version iteration `iteration` samples its rollout from: max(0, iteration − 1 − algo.max_staleness)."""
    return max(0, iteration - 1 - config.algo.max_staleness)


def staleness(config, iteration: int) -> int:
    """Policy versions between the rollout of `iteration` and the policy its update starts from (iteration − 1)."""
    return iteration - 1 - behaviour_version(config, iteration)


def probe_engines(s, version: int) -> dict:
    """The logprob gate at a sync under S ≥ 1 (see the module docstring): every engine samples PROBE_PROMPTS prompts
    of iteration `s.iteration`'s rollout at `version` (one response each of at most PROBE_TOKENS tokens, seeded by
    the run seed and the version), the policy at `version` scores the sampled tokens, and the gap is checked against
    algo.max_logprob_gap. Returns the metrics (`sync/probe_logprob_diff_mean`, `sync/probe_logprob_abs_diff_max`)
    and the requests sent (`requests`); raises LogprobGateError before the sync commits."""
    import numpy as np
    import pyarrow as pa
    import ray

    from stages.score import LogprobGateError, max_logprob_gap
    from workers.cluster import on_all_ranks

    config, gen = s.config, s.config.generation
    rollout = s.store.read_stage(s.iteration, "generate")
    prompts = list(dict.fromkeys(tuple(p) for p in rollout["prompt_ids"].to_pylist()))[:PROBE_PROMPTS]
    requests = [{"prompt_ids": list(p), "n": 1, "temperature": gen.temperature, "top_p": gen.top_p, "top_k": gen.top_k,
                 "max_new_tokens": min(gen.max_new_tokens, PROBE_TOKENS), "stop": gen.stop or None,
                 "seed": (config.seed * 1_000_003 + version * 7_919 + j + 17) % (2**31 - 1)}
                for j, p in enumerate(prompts)]
    handles = s.engines().handles
    sampled = ray.get([e.generate.remote(requests, version) for e in handles])
    s.trainers().bring_to(version, roles=["policy"])  # there already, unless the engines were current at the sync
    engine_lp, prompt_ids, response_ids = [], [], []
    for results in sampled:
        for request, (sample,) in zip(requests, results):
            prompt_ids.append(request["prompt_ids"])
            response_ids.append(sample["response_ids"])
            engine_lp.append(sample["logprobs"])
    tokens = pa.table({"prompt_ids": pa.array(prompt_ids, pa.list_(pa.int32())),
                       "response_ids": pa.array(response_ids, pa.list_(pa.int32()))})
    trainer_lp = ray.get(on_all_ranks(s.group("policy"), "logprobs", ray.put(tokens), None))[0]
    diff = np.abs(np.concatenate([np.asarray(x, np.float64) for x in engine_lp] or [[]])
                  - np.concatenate([np.asarray(x, np.float64) for x in trainer_lp] or [[]]))
    metrics = {"sync/probe_logprob_diff_mean": float(np.mean(np.exp(diff))) if diff.size else 1.0,
               "sync/probe_logprob_abs_diff_max": float(np.max(diff)) if diff.size else 0.0}
    gap, bound = metrics["sync/probe_logprob_diff_mean"], max_logprob_gap(config)
    if not gap <= bound:
        raise LogprobGateError(
            f"sync of iteration {s.iteration}: logprob gate failed: the engines sampled {len(requests)} prompts each "
            f"at policy version {version} and sync/probe_logprob_diff_mean = {gap:.6f} against the policy's logprobs "
            f"at that version exceeds algo.max_logprob_gap = {bound} (max |engine - trainer logprob| = "
            f"{metrics['sync/probe_logprob_abs_diff_max']:.4g}). The engines most likely do not hold the weights of "
            f"the version they report (a broken weight sync), or engine and trainer numerics differ. With "
            f"algo.max_staleness = {config.algo.max_staleness} rollouts are drawn from older versions than the "
            f"trainer scores, so each version is checked here, before any rollout is drawn from it. The sync of "
            f"iteration {s.iteration} was not committed; fix the sync and resume (a new process syncs the engines "
            f"again), or raise algo.max_logprob_gap if the numerics legitimately differ this much.")
    return {**metrics, "requests": len(requests) * len(handles)}
