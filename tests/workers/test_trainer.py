"""The trainers' parts that need no DeepSpeed (workers/trainer.py): device placement of batch tensors, checked
without a GPU; the LR schedule; how a model group splits the batches over its ranks; the threads of one call.

The "meta" device stands in for cuda: a helper that builds a tensor on the CPU instead of the requested (the model's)
device shows up here, where on a GPU it would fail inside a loss with a device mismatch. Groups on real DeepSpeed:
tests/workers/test_trainer_group.py.
"""

import numpy as np
import pytest
import torch

from workers import trainer


def test_batch_tensors_follow_the_model_device():
    meta = torch.device("meta")
    ids, attn, p_lens, a_lens = trainer._collate([[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10]], pad_id=0, device=meta)
    assert ids.device == attn.device == meta and (p_lens, a_lens) == ([3, 2], [2, 3])
    assert trainer._padded([[0.5, 1.0], [1.0, 2.0, 3.0]], 3, meta).device == meta
    per_position = torch.zeros((2, 4), device=meta)  # (B, L-1), as the model's outputs
    out, mask = trainer._response_slice(per_position, p_lens, a_lens)
    assert out.device == mask.device == meta and mask.dtype == torch.bool


def test_cpu_batches_are_unchanged():
    ids, attn, p_lens, a_lens = trainer._collate([[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 6, 7], [4, 5, 8, 9, 10]] and attn.sum().item() == 10
    per_position = torch.arange(8, dtype=torch.float32).view(2, 4)  # position j predicts token j+1
    out, mask = trainer._response_slice(per_position, p_lens, a_lens)
    # Row 0: prompt of 3 → positions 2..3; row 1: prompt of 2 → positions 1..3.
    assert trainer._rows(out, mask) == [[2.0, 3.0], [5.0, 6.0, 7.0]]
    assert trainer._padded([[0.5], [1.0, 2.0]], 3).tolist() == [[0.5, 0.0, 0.0], [1.0, 2.0, 0.0]]


def test_a_gpu_rank_finds_its_only_gpu_at_index_0(monkeypatch):
    assert trainer._local_rank(3) == 3  # CPU: unchanged (DeepSpeed ignores it)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # Ray's CUDA_VISIBLE_DEVICES: this actor's GPU only
    assert trainer._local_rank(0) == trainer._local_rank(3) == 0


def test_lr_schedule_warmup_then_cosine():
    factor = lambda s: trainer.lr_factor(s, 4, "cosine", 10, 0.1)  # noqa: E731
    # Linear warmup: the first step already trains, step W-1 is at the peak.
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # Cosine from the peak (step W) to min_lr_ratio (step W+D), then flat.
    assert factor(4) == 1.0
    assert factor(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: the mean of peak and floor
    assert factor(14) == pytest.approx(0.1) and factor(100) == pytest.approx(0.1)
    assert all(factor(s) > factor(s + 1) for s in range(4, 14))
    # Constant: the peak after the warmup; no warmup: the plain lr from step 0.
    assert [trainer.lr_factor(s, 2, "constant", None, 0.1) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert trainer.lr_factor(0, 0, "constant", None, 0.1) == 1.0


def test_cosine_schedule_needs_its_length():
    from pydantic import ValidationError

    from workers.config import TrainerConfig

    with pytest.raises(ValidationError, match="lr_decay_steps") as err:
        TrainerConfig(lr_schedule="cosine")
    assert "lr_schedule cosine needs lr_decay_steps" in str(err.value)
    assert TrainerConfig(lr_schedule="cosine", lr_decay_steps=100).lr_decay_steps == 100
    assert TrainerConfig().lr_schedule == "constant" and TrainerConfig().lr_warmup_steps == 0


def test_group_batch_split_is_checked_before_the_rendezvous():
    from algorithms.config import AlgoConfig
    from workers.config import TrainerConfig

    cfg = TrainerConfig(mini_batch_size=32, micro_batch_size=8)
    # 32 / (8 × 3) is not whole: the constructor fails at once (no DeepSpeed, no waiting for the other ranks).
    with pytest.raises(ValueError, match=r"policy.mini_batch_size \(32\).*policy.micro_batch_size \(8\).*world "
                                         r"size \(3\)"):
        trainer.PolicyWorker("no-model-needed", cfg, "float32", 0, rank=0, world_size=3, algo=AlgoConfig(),
                             norm_len=8)


def _split_only_worker(rank: int, world_size: int):
    """A PolicyWorker without a model, for its batch-split logic alone (its constructor would start DeepSpeed)."""
    from workers.config import TrainerConfig

    w = object.__new__(trainer.PolicyWorker)
    w.cfg = TrainerConfig(mini_batch_size=16, micro_batch_size=4)
    w.rank, w.world_size, w._epochs = rank, world_size, 2
    return w


def _rows(n: int):
    import pyarrow as pa

    return pa.table({"prompt_ids": [[1, 2]] * n, "response_ids": [[3]] * n})


def test_each_rank_takes_every_nth_micro_batch_of_a_step():
    as_lists = lambda mbs: [mb.tolist() for mb in mbs]  # noqa: E731
    solo = list(_split_only_worker(0, 1)._optimizer_steps(_rows(48), seed=5))
    assert len(solo) == 6 and all(len(step) == 4 and step == mine for step, mine in solo)  # 2 epochs × 3 steps
    ranks = [list(_split_only_worker(r, 2)._optimizer_steps(_rows(48), seed=5)) for r in (0, 1)]
    for s, (step, _) in enumerate(solo):
        # Every rank sees the whole step (for the global loss denominators) and takes micro-batches j ≡ rank (mod 2).
        assert all(as_lists(r[s][0]) == as_lists(step) for r in ranks)
        assert as_lists(ranks[0][s][1]) == as_lists(step[0::2]) and as_lists(ranks[1][s][1]) == as_lists(step[1::2])
    # A ragged last step would give the ranks different numbers of micro-batches (a hang under ZeRO-3): refused.
    with pytest.raises(ValueError, match=r"40 experience rows .* policy.mini_batch_size \(16\)"):
        next(_split_only_worker(1, 2)._optimizer_steps(_rows(40), seed=5))


def test_a_call_runs_on_the_threads_it_is_given_and_computes_the_same(tiny_model_dir):
    """`threads` (a stage's share when models compute at once on CPU) holds for the call; None is the configured
    count. The logprobs do not depend on it."""
    import pyarrow as pa

    before = torch.get_num_threads()
    try:
        from workers.config import TrainerConfig

        ref = trainer.ReferenceWorker(tiny_model_dir, "float32", TrainerConfig(micro_batch_size=4, num_threads=2))
        table = pa.table({"prompt_ids": [[5, 6, 7], [8, 9]], "response_ids": [[10, 11], [12, 13, 14]]})
        shared = ref.logprobs(table, threads=1)
        assert torch.get_num_threads() == 1
        alone = ref.logprobs(table)
        assert torch.get_num_threads() == 2
        for a, b in zip(shared, alone):
            assert a == pytest.approx(b, abs=1e-6)
    finally:
        torch.set_num_threads(before)


def test_reference_under_a_token_budget_returns_rows_in_table_order(tiny_model_dir):
    """A token budget groups samples by length (longest first), not in row order: the reference's logprobs still come
    back one list per row, in the table's order, equal to the padded micro-batches'."""
    import pyarrow as pa

    from workers.config import TrainerConfig

    g = np.random.default_rng(3)
    lens = [(3, 2), (9, 7), (2, 1), (6, 8), (4, 3), (11, 2)]
    table = pa.table({"prompt_ids": [g.integers(5, 200, p).tolist() for p, _ in lens],
                      "response_ids": [g.integers(5, 200, r).tolist() for _, r in lens]})
    padded = trainer.ReferenceWorker(tiny_model_dir, "float32", TrainerConfig(micro_batch_size=4))
    budget = trainer.ReferenceWorker(tiny_model_dir, "float32",
                                     TrainerConfig(packing=True, max_tokens_per_micro_batch=16))
    expected, actual = padded.logprobs(table), budget.logprobs(table)
    assert [len(r) for r in actual] == [r for _, r in lens]
    for a, b in zip(actual, expected):
        assert a == pytest.approx(b, abs=1e-5)


def test_shared_prompts_give_the_full_sequences_logprobs_entropy_and_gradients(tiny_model_dir):
    """Groups of samples of one prompt (prompts of different lengths, responses of different lengths, one of a
    single token): each prompt runs once, its responses on copies of its cache; log-probs, entropy and the gradient of
    a loss over them match running every full sequence."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    groups = [([5, 6, 7, 8, 9], [4, 1, 7]), ([10, 11], [2, 6, 5]), ([12, 13, 14, 15], [1, 3, 8])]
    prompts, responses = [], []
    for prompt, lengths in groups:
        for n in lengths:
            prompts.append(prompt)
            responses.append(torch.randint(3, 60, (n,), generator=g).tolist())
    order = torch.randperm(len(prompts), generator=g).tolist()  # a shuffled mini-batch: groups interleave
    prompts, responses = [prompts[i] for i in order], [responses[i] for i in order]

    grads = []
    for share in (False, True):
        model.zero_grad()
        logp, mask, entropy = trainer.sample_logprobs(model, prompts, responses, pad_id=0, share_prompts=share,
                                                      with_entropy=True)
        assert logp.shape == mask.shape == entropy.shape == (len(prompts), 8)
        assert mask.sum(-1).tolist() == [len(r) for r in responses]
        ((logp - 0.1 * entropy) * mask).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        if not share:
            expected = (logp.detach(), mask, entropy.detach())
    assert torch.equal(mask, expected[1])
    assert torch.allclose(logp.detach(), expected[0], atol=1e-5) and logp.detach()[~mask].abs().max() == 0
    assert torch.allclose(entropy.detach(), expected[2], atol=1e-5)
    assert ((grads[1] - grads[0]).norm() / grads[0].norm()).item() < 1e-5


def test_sharing_runs_prompts_then_responses_and_off_runs_the_full_sequences(tiny_model_dir):
    """Shared: one forward of the distinct prompts, one of the responses, also when no prompt repeats (every rank of
    a ZeRO-3 group must run as many forwards); off: one forward of the full sequences."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)),
                                    with_kwargs=True)
    prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]]
    with torch.no_grad():
        full = trainer.sample_logprobs(model, prompts, responses, pad_id=0, share_prompts=False)
        distinct = trainer.sample_logprobs(model, prompts, responses, pad_id=0)
        trainer.sample_logprobs(model, prompts * 2, responses * 2, pad_id=0)
    assert calls == [(2, 5), (2, 3), (2, 3), (2, 3), (4, 3)]
    assert torch.equal(distinct[1], full[1]) and torch.allclose(distinct[0], full[0], atol=1e-5)
