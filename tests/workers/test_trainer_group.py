"""Model groups of the DeepSpeed trainers (workers/trainer.py): N actors, one per rank, train one data-parallel model.

Real DeepSpeed on gloo in Ray actors (no mocks), on the tiny random-init Qwen2, in float32. A group must be the
1-rank model: the same losses, gradient norms and weights, whatever the split into micro-batches or ranks, under
ZeRO-2 and ZeRO-3; a checkpoint (weights, optimizer, LR scheduler, random streams) must survive the death of the
processes; the LR follows its warmup + cosine schedule.

Tolerances (float32): losses and metrics 1e-5 relative (+1e-7 absolute for values near 0); weights after an optimizer
step: ‖w_a − w_b‖ within 1e-4 of the step's own update ‖w_a − w0‖ (Adam's first update is ≈ lr·sign(g) per weight,
so a gradient at rounding level can flip a whole lr); logprobs and values 1e-5 absolute (other micro-batch padding);
a resumed step is compared exactly. Seen on CPU: metrics within 8e-7 relative, weights 1.2e-6, logprobs equal.

Adam's update does not change when every gradient is scaled by one factor (and neither does the clipped one), so the
weights cannot tell whether a group's gradient is the 1-rank sum or the ranks' mean: the gradient norm can, and is
compared at every step (without the ×N loss scale in the trainer it comes out exactly N times smaller).

Actor start-ups dominate the time (import + DeepSpeed init: 10-40 s each on a busy 2-core host; the file took ~7 min
at load 20): each test starts its groups once and reuses them for every check.
"""

import os
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow

SEED = 3
RTOL, ATOL = 1e-5, 1e-7
WEIGHT_RTOL = 1e-4
LR = 1e-3
SCHEDULE = dict(lr_warmup_steps=2, lr_schedule="cosine", lr_decay_steps=4, min_lr_ratio=0.1)
"""Every group trains with this schedule: step factors 0.5, 1 (warmup), then the cosine 1 → 0.1 over steps 2..6."""


def _trainer(**overrides):
    from workers.config import TrainerConfig

    settings = dict(lr=LR, zero_stage=2, mini_batch_size=32, micro_batch_size=8, num_threads=1, num_cpus=0.5,
                    **SCHEDULE)
    return TrainerConfig(**{**settings, **overrides})


def _algo():
    from algorithms.config import AlgoConfig

    # Options that exercise every term and metric of the policy loss: IS correction, KL loss, entropy bonus, the
    # per-sequence denominator.
    algo = AlgoConfig(estimator="gae", kl_in_reward=False, kl_estimator="k3", entropy_coef=0.01, is_correction="tis",
                      loss_agg="seq-mean-token-mean", ppo_epochs=1)
    return algo


def _tokens(n: int, seed: int, vocab: int, group: int = 4):
    """Prompt/response token lists of random lengths (so micro-batches are padded differently), in groups of `group`
    samples of one prompt, as GRPO makes them (the policy's shared-prompt path, workers/trainer.py: sample_logprobs,
    then shares a prompt wherever a micro-batch holds two samples of a group)."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, vocab, rng.integers(2, 7)).tolist() for _ in range(-(-n // group))]
    prompts = [prompts[i // group] for i in range(n)]
    responses = [rng.integers(3, vocab, rng.integers(1, 9)).tolist() for _ in range(n)]
    return pa.table({"prompt_ids": pa.array(prompts, pa.list_(pa.int32())),
                     "response_ids": pa.array(responses, pa.list_(pa.int32()))})


def _experience(tokens, old_logprobs, seed: int):
    """An experience table (storage.schema EXPERIENCE's columns that the trainers read) with fixed random numbers;
    old logprobs near the policy's own so that the PPO ratio is near 1 and most tokens get a gradient."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    lens = [len(r) for r in tokens["response_ids"].to_pylist()]
    per_token = lambda f: pa.array([f(a).astype(np.float32).tolist() for a in lens], pa.list_(pa.float32()))  # noqa
    old = [np.asarray(lp) + rng.normal(0, 0.1, len(lp)) for lp in old_logprobs]
    values = [rng.normal(0, 1, a) for a in lens]
    return tokens.append_column("old_logprobs", pa.array([x.astype(np.float32).tolist() for x in old],
                                                         pa.list_(pa.float32()))) \
        .append_column("engine_logprobs", pa.array([(x + rng.normal(0, 0.05, len(x))).astype(np.float32).tolist()
                                                    for x in old], pa.list_(pa.float32()))) \
        .append_column("ref_logprobs", pa.array([(x + rng.normal(0, 0.2, len(x))).astype(np.float32).tolist()
                                                 for x in old], pa.list_(pa.float32()))) \
        .append_column("advantages", per_token(lambda a: rng.normal(0, 1, a))) \
        .append_column("values", pa.array([v.astype(np.float32).tolist() for v in values], pa.list_(pa.float32()))) \
        .append_column("returns", pa.array([(v + rng.normal(0, 1, len(v))).astype(np.float32).tolist()
                                            for v in values], pa.list_(pa.float32())))


class Group:
    """N actors of one trainer class, ranks 0..N-1; `call` runs a method on every rank and returns every result."""

    def __init__(self, cls, n: int, model_dir: str, trainer, **kwargs):
        import ray

        from workers.cluster import free_port

        # One rank: the stages' way (the actor picks its own port); more: rank 0's address, given to every rank.
        # A quarter CPU each: a test holds up to six ranks at once in the tests' 2-CPU Ray session.
        group = {} if n == 1 else {"world_size": n, "master_addr": "127.0.0.1", "master_port": free_port()}
        self.actors = [ray.remote(cls).options(num_cpus=0.25).remote(model_dir, trainer, "float32", SEED, rank=r,
                                                                     **group, **kwargs) for r in range(n)]
        ray.get([a.__ray_ready__.remote() for a in self.actors], timeout=600)

    def call(self, method: str, *args) -> list:
        import ray

        return ray.get([getattr(a, method).remote(*args) for a in self.actors], timeout=600)

    def pids(self) -> list[int]:
        import ray

        return ray.get([a.__ray_call__.remote(lambda self: os.getpid()) for a in self.actors], timeout=60)

    def rng_draws(self) -> list:
        """A few numbers from each rank's torch and numpy global streams (advances them, as training would)."""
        import ray

        def draw(self):
            import torch

            return torch.rand(4).tolist() + np.random.rand(4).tolist()

        return ray.get([a.__ray_call__.remote(draw) for a in self.actors], timeout=60)

    def checkpointing(self) -> list[bool]:
        """Whether each rank's transformer recomputes activations (HF gradient checkpointing)."""
        import ray

        def on(self) -> bool:
            module = self.engine.module
            return getattr(module, "body", module).is_gradient_checkpointing

        return ray.get([a.__ray_call__.remote(on) for a in self.actors], timeout=60)

    def kill(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)


def _kill_all(*groups) -> None:
    for g in groups:
        if g is not None:
            g.kill()


def _weights(group: Group) -> dict:
    """Rank 0's full weights (every rank takes part: the ZeRO-3 gather is collective; the others return None)."""
    from safetensors.torch import load

    exported = group.call("export_weights")
    assert all(e is None for e in exported[1:])
    return load(exported[0])


def _base_weights(model_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(model_dir, "model.safetensors"))


def _update_distance(a: dict, b: dict, base: dict) -> float:
    """‖a − b‖ / ‖a − base‖ over all weights: how far two runs' steps differ, relative to the step itself."""
    import torch

    diff = torch.sqrt(sum(((a[k] - b[k]).double() ** 2).sum() for k in base))
    step = torch.sqrt(sum(((a[k] - base[k]).double() ** 2).sum() for k in base))
    assert step > 0, "the optimizer step did not move the weights"
    return float(diff / step)


def _assert_same_metrics(actual: list[dict], expected: list[dict], rtol=RTOL, atol=ATOL) -> None:
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected)):
        assert a.keys() == e.keys()
        for k in e:
            assert a[k] == pytest.approx(e[k], rel=rtol, abs=atol), f"step {step} {k}: {a[k]} vs {e[k]}"


def _assert_rows_close(actual: list, expected: list, atol=1e-5) -> None:
    assert [len(r) for r in actual] == [len(r) for r in expected]
    flat = lambda rows: np.concatenate([np.asarray(r, np.float64) for r in rows])  # noqa: E731
    np.testing.assert_allclose(flat(actual), flat(expected), rtol=0, atol=atol)


def _lr_at(step: int) -> float:
    from workers.trainer import lr_factor

    return LR * lr_factor(step, SCHEDULE["lr_warmup_steps"], SCHEDULE["lr_schedule"], SCHEDULE["lr_decay_steps"],
                          SCHEDULE["min_lr_ratio"])


@pytest.fixture(scope="module")
def vocab(tiny_model_dir) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(tiny_model_dir).vocab_size


def _assert_group_logprobs(group: Group, solo: Group, tokens) -> list:
    """The group's logprobs of `tokens`: the same whole list on every rank, close to the 1-rank group's (returned)."""
    (reference,) = solo.call("logprobs", tokens)
    on_ranks = group.call("logprobs", tokens)
    assert all(rows == on_ranks[0] for rows in on_ranks)
    _assert_rows_close(on_ranks[0], reference)
    return reference


def test_zero2_group_is_the_one_rank_model(ray_session, tiny_model_dir, vocab, tmp_path):
    """ZeRO-2, policy: 2 ranks × micro 8, 1 rank × micro 16 (with gradient checkpointing) and 2 ranks packed with
    micro-batches cut by a token budget against 1 rank × micro 8: same logprobs, same weights after one optimizer
    step, same losses and metrics over four, same LR schedule."""
    from workers.trainer import PolicyWorker

    solo = split = duo = budget = None
    try:
        solo = Group(PolicyWorker, 1, tiny_model_dir, _trainer(), algo=_algo(), norm_len=8)
        split = Group(PolicyWorker, 1, tiny_model_dir, _trainer(micro_batch_size=16, gradient_checkpointing=True),
                      algo=_algo(), norm_len=8)
        duo = Group(PolicyWorker, 2, tiny_model_dir, _trainer(), algo=_algo(), norm_len=8)
        # ~130 tokens a micro-batch: a 32-sample step of ~25-token samples is cut into ~6 (3 per rank), unevenly.
        # Padded forwards: the split alone is under test here (packed = padded is tests/workers/test_packing.py's).
        budget = Group(PolicyWorker, 2, tiny_model_dir, _trainer(packing=False, max_tokens_per_micro_batch=130),
                       algo=_algo(), norm_len=8)
        assert split.checkpointing() == [True] and solo.checkpointing() == [False]

        # 37 rows over 2 ranks: shares of 19 and 18 (+1 padding row), micro-batches of 8 padded differently.
        _assert_group_logprobs(duo, solo, _tokens(37, seed=1, vocab=vocab))
        _assert_group_logprobs(budget, solo, _tokens(37, seed=1, vocab=vocab))

        tokens = _tokens(32 + 96, seed=2, vocab=vocab)
        (lp,) = solo.call("logprobs", tokens)
        table = _experience(tokens, lp, seed=3)
        first, rest = table.slice(0, 32), table.slice(32)

        # One optimizer step: the gradient (norm) and the weights it leads to.
        (one,) = solo.call("train", first, 1, SEED, 0.05)
        (one_split,) = split.call("train", first, 1, SEED, 0.05)
        one_duo = duo.call("train", first, 1, SEED, 0.05)
        one_budget = budget.call("train", first, 1, SEED, 0.05)
        assert len(one) == 1 and one[0]["ppo/grad_norm"] > 0
        assert one_duo[0] == one_duo[1] and one_budget[0] == one_budget[1]  # every rank returns the global metrics
        _assert_same_metrics(one_split, one)
        _assert_same_metrics(one_duo[0], one)
        _assert_same_metrics(one_budget[0], one)
        base, w_solo = _base_weights(tiny_model_dir), _weights(solo)
        assert _update_distance(w_solo, _weights(split), base) < WEIGHT_RTOL
        assert _update_distance(w_solo, _weights(duo), base) < WEIGHT_RTOL
        assert _update_distance(w_solo, _weights(budget), base) < WEIGHT_RTOL

        # Three more steps: the loss trajectory, and the LR of each step (warmup 0.5, 1, then the cosine).
        (more,) = solo.call("train", rest, 2, SEED + 1, 0.05)
        more_duo = duo.call("train", rest, 2, SEED + 1, 0.05)
        (more_split,) = split.call("train", rest, 2, SEED + 1, 0.05)
        more_budget = budget.call("train", rest, 2, SEED + 1, 0.05)
        assert more_duo[0] == more_duo[1]
        _assert_same_metrics(more_duo[0], more)
        _assert_same_metrics(more_split, more)
        # Its micro-batches group other samples than solo's (as split's do), so each step rounds differently: seen
        # 2.4e-7 on a policy loss of -6.2e-4 (split's 7e-8; the first step's weights agree like split's, 4.4e-5).
        _assert_same_metrics(more_budget[0], more, atol=1e-6)
        lrs = [m["ppo/lr"] for m in one + more]
        assert lrs == pytest.approx([LR * 0.5, LR, LR, LR * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi / 4)))], rel=1e-9)
        assert lrs == pytest.approx([_lr_at(s) for s in range(4)], rel=1e-12)
        losses = [m["ppo/policy_loss"] for m in one + more]
        assert len(set(losses)) == 4  # the weights move: four different losses, not one repeated

        # The HF export: written once (rank 0), the same weights as the in-memory export.
        from safetensors.torch import load_file

        duo.call("export_hf", str(tmp_path / "export"))
        exported = load_file(str(tmp_path / "export" / "hf" / "model.safetensors"))
        w_duo = _weights(duo)
        assert exported.keys() == w_duo.keys()
        assert all(bool((exported[k] == w_duo[k]).all()) for k in w_duo)

        # Checkpoint round trip in the same processes: save (version 2), one more update, back to version 2 and the
        # same update again: the same metrics (LR included: the scheduler went back one step too).
        ckpt = str(tmp_path / "checkpoint-2")
        duo.call("save_checkpoint", ckpt)
        step = duo.call("train", first, 3, SEED + 2, 0.05)
        assert step[0][0]["ppo/lr"] == pytest.approx(_lr_at(4), rel=1e-12)
        assert duo.call("ensure_version", 2, ckpt) == [True, True]
        assert duo.call("train", first, 3, SEED + 2, 0.05) == step
    finally:
        _kill_all(solo, split, duo, budget)


def test_zero3_group_trajectory_and_checkpoint_survive_sigkill(ray_session, tiny_model_dir, vocab, tmp_path):
    """ZeRO-3, policy: 2 ranks follow 1 rank; then the 2-rank group saves a checkpoint, its processes are SIGKILLed,
    a new group loads it and its next steps equal the uninterrupted group's: weights, Adam states, the LR scheduler's
    step and every rank's random streams came back."""
    import psutil

    from workers.trainer import PolicyWorker

    trainer = _trainer(zero_stage=3)
    solo = duo = resumed = None
    try:
        solo = Group(PolicyWorker, 1, tiny_model_dir, trainer, algo=_algo(), norm_len=8)
        duo = Group(PolicyWorker, 2, tiny_model_dir, trainer, algo=_algo(), norm_len=8)
        # 33 rows: shares of 17 and 16 rows, 3 and 2 micro-batches of 8. ZeRO-3 gathers the parameters of every
        # forward with the other rank, so the short share runs a padding forward too (without it: a hang).
        _assert_group_logprobs(duo, solo, _tokens(33, seed=8, vocab=vocab))
        tokens = _tokens(32 + 64, seed=4, vocab=vocab)
        lp = _assert_group_logprobs(duo, solo, tokens)
        table = _experience(tokens, lp, seed=5)
        first, rest = table.slice(0, 32), table.slice(32)

        (one,) = solo.call("train", first, 1, SEED, 0.05)
        one_duo = duo.call("train", first, 1, SEED, 0.05)
        assert one_duo[0] == one_duo[1]
        _assert_same_metrics(one_duo[0], one)
        base = _base_weights(tiny_model_dir)
        assert _update_distance(_weights(solo), _weights(duo), base) < WEIGHT_RTOL

        ckpt = str(tmp_path / "checkpoint-1")
        duo.rng_draws()  # streams used since the actors started: a reseeded process would not be where they are
        duo.call("save_checkpoint", ckpt)
        # Uninterrupted: draw from the random streams (as dropout would), then two more steps.
        draws = duo.rng_draws()
        (more,) = solo.call("train", rest, 2, SEED + 1, 0.05)
        more_duo = duo.call("train", rest, 2, SEED + 1, 0.05)
        assert more_duo[0] == more_duo[1]
        _assert_same_metrics(more_duo[0], more)
        assert [m["ppo/lr"] for m in one + more] == pytest.approx([_lr_at(s) for s in range(3)], rel=1e-12)
        w_uninterrupted = _weights(duo)
        solo.kill()
        solo = None

        pids = duo.pids()
        duo.kill()  # ray.kill: SIGKILL to the actor processes, no restart
        duo = None
        deadline = time.monotonic() + 30
        while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            assert time.monotonic() < deadline, f"actor processes {pids} still alive after ray.kill"
            time.sleep(0.2)

        resumed = Group(PolicyWorker, 2, tiny_model_dir, trainer, algo=_algo(), norm_len=8)
        assert resumed.call("ensure_version", 1, ckpt) == [True, True]
        # Each rank's torch and numpy streams continue where the save left them (a fresh actor's are reseeded).
        assert resumed.rng_draws() == draws
        again = resumed.call("train", rest, 2, SEED + 1, 0.05)
        assert again[0] == again[1]
        # Exactly: the same computation on the same state, not a tolerance. The LR continues at steps 1, 2 (a fresh
        # scheduler would restart the warmup at 0.5·lr).
        assert again[0] == more_duo[0]
        w_resumed = _weights(resumed)
        assert all(bool((w_resumed[k] == w_uninterrupted[k]).all()) for k in w_uninterrupted)

        # A retried update: back to version 1 in the same processes, over a ZeRO-3 model that has trained since.
        assert resumed.call("ensure_version", 1, ckpt) == [True, True]
        assert resumed.rng_draws() == draws
        assert resumed.call("train", rest, 2, SEED + 1, 0.05)[0] == more_duo[0]
    finally:
        _kill_all(solo, duo, resumed)


def test_critic_group_values_and_training(ray_session, tiny_model_dir, vocab):
    """ZeRO-3, critic: 2 ranks (with gradient checkpointing: recomputation under ZeRO-3's parameter gathers) give
    the 1-rank values and value-loss trajectory, metrics equal on both ranks."""
    from transformers import AutoTokenizer

    from workers.trainer import CriticWorker

    pad = AutoTokenizer.from_pretrained(tiny_model_dir).pad_token_id
    trainer = _trainer(zero_stage=3)
    solo = duo = None
    try:
        solo = Group(CriticWorker, 1, tiny_model_dir, trainer, algo=_algo(), pad_token_id=pad)
        duo = Group(CriticWorker, 2, tiny_model_dir, _trainer(zero_stage=3, gradient_checkpointing=True),
                    algo=_algo(), pad_token_id=pad)
        assert duo.checkpointing() == [True, True]
        # The critic runs full sequences: distinct prompts. Uneven shares, as in the policy's ZeRO-3 test.
        odd = _tokens(33, seed=9, vocab=vocab, group=1)
        (reference,) = solo.call("values", odd)
        on_ranks = duo.call("values", odd)
        assert on_ranks[0] == on_ranks[1]
        _assert_rows_close(on_ranks[0], reference)

        tokens = _tokens(64, seed=6, vocab=vocab, group=1)
        (values,) = solo.call("values", tokens)
        on_ranks = duo.call("values", tokens)
        assert on_ranks[0] == on_ranks[1]
        _assert_rows_close(on_ranks[0], values)
        table = _experience(tokens, [[0.0] * len(v) for v in values], seed=7)
        (steps,) = solo.call("train", table, 1, SEED, 0.0)
        steps_duo = duo.call("train", table, 1, SEED, 0.0)
        assert len(steps) == 2 and steps_duo[0] == steps_duo[1]
        _assert_same_metrics(steps_duo[0], steps)
        assert [m["critic/lr"] for m in steps] == pytest.approx([_lr_at(0), _lr_at(1)], rel=1e-12)
        (after,) = solo.call("values", tokens)
        _assert_rows_close(duo.call("values", tokens)[0], after)
        assert not np.allclose(np.concatenate(after), np.concatenate(values))  # the critic trained
    finally:
        _kill_all(solo, duo)


def test_one_rank_zero0_drops_the_gradient_all_reduce_bit_for_bit(ray_session, tiny_model_dir, vocab):
    """A 1-rank ZeRO-0 group does not all_reduce its gradients with itself at each optimizer step (workers/trainer.py
    `_build`): two optimizer steps of two micro-batches each give the same metrics and weights, bit for bit, as the
    same group with DeepSpeed's all_reduce put back."""
    import ray

    from workers.trainer import PolicyWorker

    solo = None
    try:
        solo = Group(PolicyWorker, 1, tiny_model_dir, _trainer(zero_stage=0, mini_batch_size=16, micro_batch_size=8),
                     algo=_algo(), norm_len=8)
        (actor,) = solo.actors
        tokens = _tokens(32, seed=11, vocab=vocab)
        (lp,) = solo.call("logprobs", tokens)
        table = _experience(tokens, lp, seed=12)

        def trained(all_reduce: bool) -> tuple[list[dict], bytes]:
            def rebuild(self) -> bool:  # version 0 again: the same initial weights and optimizer
                self._build()
                skipped = not self.engine.enable_backward_allreduce
                self.engine.enable_backward_allreduce = all_reduce or not skipped
                return skipped

            assert ray.get(actor.__ray_call__.remote(rebuild), timeout=600)
            (before,) = solo.call("export_weights")
            (steps,) = solo.call("train", table, 1, SEED, 0.05)
            (weights,) = solo.call("export_weights")
            assert weights != before  # the steps trained
            return steps, weights

        skipped, kept = trained(False), trained(True)
        assert len(skipped[0]) == 2 and skipped[0][0]["ppo/grad_norm"] > 0
        assert skipped[0] == kept[0]  # losses, gradient norms, clip fractions: exactly
        assert skipped[1] == kept[1]  # every weight, bit for bit
    finally:
        _kill_all(solo)
