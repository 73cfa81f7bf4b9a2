"""The trainers train on a multi-turn episode's policy tokens only: its environment tokens (holes, response_mask 0)
carry junk in every per-token column the losses read, and the losses, their denominators and the metrics come out as
computed here over the policy tokens alone.

Real DeepSpeed in Ray actors on the tiny random-init model. The experience's old logprobs (and the reference's) are
the policy's own at the policy tokens, so the PPO ratio is 1 there and the first step's losses have closed forms:
    policy: −Σ_policy A_t / N_policy (token-mean), KL loss 0, approx KL 0, clip fraction 0;
    critic (old values = its own): ½·Σ_policy (V_t − R_t)² / N_policy.
Junk at the holes (±30 logprobs, 1e3 advantages, values and returns) would move each of them by orders of magnitude.

Run alone:  .venv/bin/pytest -q tests/workers/test_multiturn_trainers.py
"""

import numpy as np
import pytest

pytestmark = pytest.mark.slow

SEED = 3


def test_losses_count_policy_tokens_only(ray_session, tiny_model_dir):
    import pyarrow as pa
    import ray
    from transformers import AutoConfig, AutoTokenizer

    from algorithms.config import AlgoConfig
    from workers.config import TrainerConfig
    from workers.trainer import CriticWorker, PolicyWorker

    vocab = AutoConfig.from_pretrained(tiny_model_dir).vocab_size
    pad = AutoTokenizer.from_pretrained(tiny_model_dir).pad_token_id
    rng = np.random.default_rng(SEED)
    n = 8
    prompts = [rng.integers(3, vocab, rng.integers(3, 8)).tolist() for _ in range(n)]
    masks = []
    for i in range(n):  # turns of 1-5 policy tokens and 2-6 environment tokens; every other sample single-turn
        m = []
        for turn in range(rng.integers(1, 4) if i % 2 else 1):
            m += [0] * (int(rng.integers(2, 7)) if turn else 0) + [1] * int(rng.integers(1, 6))
        masks.append(m)
    responses = [rng.integers(3, vocab, len(m)).tolist() for m in masks]
    tokens = pa.table({"prompt_ids": pa.array(prompts, pa.list_(pa.int32())),
                       "response_ids": pa.array(responses, pa.list_(pa.int32())),
                       "response_mask": pa.array([m if 0 in m else None for m in masks], pa.list_(pa.int8()))})

    trainer = TrainerConfig(lr=1e-3, zero_stage=0, mini_batch_size=n, micro_batch_size=n // 2, num_threads=1,
                            num_cpus=0.5)
    algo = AlgoConfig(estimator="gae", kl_in_reward=False, kl_coef=0.1, kl_estimator="k3", is_correction="tis",
                      loss_agg="token-mean", ppo_epochs=1)
    policy = ray.remote(PolicyWorker).options(num_cpus=0.5).remote(tiny_model_dir, trainer, "float32", SEED,
                                                                   algo=algo, norm_len=16)
    critic = ray.remote(CriticWorker).options(num_cpus=0.5).remote(tiny_model_dir, trainer, "float32", SEED,
                                                                   algo=algo, pad_token_id=pad)
    try:
        logprobs, values = ray.get([policy.logprobs.remote(tokens), critic.values.remote(tokens)], timeout=900)

        def column(real, junk):
            """Per sample: `real(i, t)` at policy tokens, `junk` at environment tokens, as float32 lists."""
            return pa.array([[float(real(i, t)) if m[t] else junk for t in range(len(m))] for i, m in
                             enumerate(masks)], pa.list_(pa.float32()))

        advantages = [rng.normal(0, 1, len(m)) for m in masks]
        returns = [rng.normal(0, 1, len(m)) for m in masks]
        table = tokens.append_column("old_logprobs", column(lambda i, t: logprobs[i][t], 30.0)) \
            .append_column("ref_logprobs", column(lambda i, t: logprobs[i][t], -30.0)) \
            .append_column("engine_logprobs", column(lambda i, t: logprobs[i][t], 30.0)) \
            .append_column("advantages", column(lambda i, t: advantages[i][t], 1e3)) \
            .append_column("values", column(lambda i, t: values[i][t], 1e3)) \
            .append_column("returns", column(lambda i, t: returns[i][t], -1e3))
        [p_step], [c_step] = ray.get([policy.train.remote(table, 1, SEED, 0.1), critic.train.remote(table, 1, SEED)],
                                     timeout=900)
    finally:
        ray.kill(policy, no_restart=True)
        ray.kill(critic, no_restart=True)

    real = [(i, t) for i, m in enumerate(masks) for t in range(len(m)) if m[t]]
    assert len(real) < sum(map(len, masks))  # there are holes
    adv = np.array([table["advantages"][i][t].as_py() for i, t in real], np.float64)
    assert p_step["ppo/policy_loss"] == pytest.approx(-adv.mean(), rel=1e-4, abs=1e-6)
    assert p_step["ppo/kl_loss"] == pytest.approx(0.0, abs=1e-6)
    assert p_step["ppo/approx_kl"] == pytest.approx(0.0, abs=1e-6) and p_step["ppo/clipfrac"] == 0.0
    assert p_step["ppo/is_weight_mean"] == pytest.approx(1.0, abs=1e-5) and np.isfinite(p_step["ppo/grad_norm"])
    v = np.array([table["values"][i][t].as_py() for i, t in real], np.float64)
    r = np.array([table["returns"][i][t].as_py() for i, t in real], np.float64)
    assert c_step["critic/value_loss"] == pytest.approx(0.5 * ((v - r) ** 2).mean(), rel=1e-4)
    assert np.isfinite(c_step["critic/grad_norm"])
