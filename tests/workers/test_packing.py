"""Padding-free forwards (workers/packing.py): a packed micro-batch gives the padded path's log-probs, entropy, values
and gradients to float rounding; the chunked log-probs never need the whole logits; token-budget micro-batches are
whole, within budget, a multiple of the ranks and balanced. The same split inside a trainer group (1 rank vs 2) is in
tests/workers/test_trainer_group.py.

Run alone:  .venv/bin/pytest -q tests/workers/test_packing.py
"""

import numpy as np
import pytest
import torch

from workers.packing import pack, token_budget_split, token_logprobs
from workers.trainer import _collate, _response_slice, packed_logprobs, response_logprobs


def _samples(seed: int, vocab: int, n: int = 7):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, vocab, rng.integers(2, 12)).tolist() for _ in range(n)]
    responses = [rng.integers(3, vocab, rng.integers(1, 9)).tolist() for _ in range(n)]
    return prompts, responses


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packed_equals_padded_logprobs_entropy_and_gradients(model, seed):
    prompts, responses = _samples(seed, model.config.vocab_size)
    weights = torch.randn(len(prompts), 8, generator=torch.Generator().manual_seed(seed))

    def run(packed: bool):
        model.zero_grad()
        if packed:
            logp, mask, entropy = packed_logprobs(model, prompts, responses, with_entropy=True, entropy_grad=True)
        else:
            logp, mask, entropy = response_logprobs(model, *_collate(prompts, responses, 0), with_entropy=True)
        w = weights[:, : logp.shape[1]]
        (torch.where(mask, logp * w + 0.1 * entropy * w, 0).sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logp.detach(), mask, entropy.detach(), grads

    lp_pad, mask_pad, ent_pad, g_pad = run(False)
    lp_pack, mask_pack, ent_pack, g_pack = run(True)
    assert torch.equal(mask_pad, mask_pack)
    assert torch.allclose(lp_pack[mask_pack], lp_pad[mask_pad], atol=1e-5, rtol=0)
    assert torch.allclose(ent_pack[mask_pack], ent_pad[mask_pad], atol=1e-5, rtol=0)
    assert g_pad.keys() == g_pack.keys()
    for name, g in g_pad.items():
        assert torch.linalg.vector_norm(g_pack[name] - g) <= 1e-5 * torch.linalg.vector_norm(g) + 1e-8, name


def test_packed_critic_values_equal_padded(tiny_model_dir):
    from workers.trainer import _value_model

    torch.manual_seed(0)
    critic = _value_model(tiny_model_dir, torch.float32).eval()
    prompts, responses = _samples(5, critic.body.config.vocab_size)
    with torch.no_grad():
        ids, attn, p_lens, a_lens = _collate(prompts, responses, 0)
        padded, mask = _response_slice(critic(ids, attn)[:, :-1], p_lens, a_lens)
        batch = pack(prompts, responses)
        packed, packed_mask = batch.unflatten(critic(batch.input_ids, **batch.forward_kwargs())[0][batch.predict])
    assert torch.equal(mask, packed_mask)
    assert torch.allclose(packed[mask], padded[mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("entropy_grad", [False, True], ids=["fused", "checkpointed"])
def test_chunked_logprobs_equal_whole_and_keep_no_logits_for_the_backward(entropy_grad):
    """Chunk by chunk, by the fused Function (entropy without a gradient) or under checkpointing (entropy in the
    loss): the same values and gradients, the head's weight included, as one whole softmax; what autograd keeps for
    the backward is the hidden states, not a chunk's logits."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 1000, bias=False)
    hidden = torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 1000, (300,))
    weights = torch.rand(300)  # a loss that weighs tokens differently, as the PPO loss does
    logp, entropy = token_logprobs(head, hidden, targets, with_entropy=True, entropy_grad=entropy_grad, chunk=64)
    (logp * weights).sum().backward()
    grad, grad_w = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad = head.weight.grad = None
    whole = torch.log_softmax(head(hidden).float(), -1)
    whole_logp = whole.gather(-1, targets[:, None]).squeeze(-1)
    (whole_logp * weights).sum().backward()
    assert torch.allclose(logp, whole_logp, atol=1e-5) and torch.allclose(hidden.grad, grad, atol=1e-5)
    assert torch.allclose(head.weight.grad, grad_w, atol=1e-5)
    assert torch.allclose(entropy, -(whole.exp() * whole).sum(-1), atol=1e-4)
    assert entropy.requires_grad == entropy_grad

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        token_logprobs(head, hidden, targets, with_entropy=True, entropy_grad=entropy_grad, chunk=64)
    assert max(saved) < 64 * 1000, saved  # no chunk's (64 × vocab) logits kept for the backward


def test_fused_logprobs_in_bfloat16_follow_the_checkpointed_path():
    """The trainers' dtype on GPUs: the fused backward (softmax rebuilt from the saved logsumexp, cast to bf16 for
    the two GEMMs) gives the gradients the checkpointed autograd path gives, to bf16 rounding."""
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 2000, bias=False).to(torch.bfloat16)
    hidden = torch.randn(200, 32, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 2000, (200,))
    grads = []
    for entropy_grad in (False, True):  # fused, then checkpointed (the entropy's gradient is not used below)
        logp, _ = token_logprobs(head, hidden, targets, with_entropy=True, entropy_grad=entropy_grad, chunk=64)
        logp.sum().backward()
        grads.append((logp.detach(), hidden.grad.float(), head.weight.grad.float()))
        hidden.grad = head.weight.grad = None
    (lp_f, gh_f, gw_f), (lp_c, gh_c, gw_c) = grads
    assert torch.equal(lp_f, lp_c)
    assert torch.allclose(gh_f, gh_c, rtol=2e-2, atol=1e-3) and torch.allclose(gw_f, gw_c, rtol=2e-2, atol=1e-3)


def test_token_budget_split_is_whole_bounded_a_multiple_of_the_ranks_and_balanced():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n, ranks = int(rng.integers(4, 40)), int(rng.integers(1, 4))
        lengths = rng.integers(5, 300, n)
        budget = int(rng.integers(50, 1500))
        indices = rng.permutation(n)
        bins = token_budget_split(indices, lengths, budget, ranks)
        assert sorted(i for b in bins for i in b) == list(range(n))  # every sample once
        assert len(bins) % ranks == 0 and len(bins) <= max(ranks, n)
        loads = [int(lengths[b].sum()) for b in bins]
        over = [b for b, load in zip(bins, loads) if load > budget and len(b) > 1]
        assert not over or len(bins) >= n - n % ranks  # over budget only when there are no more samples to spread
        per_rank = [sum(loads[r::ranks]) for r in range(ranks)]
        assert max(per_rank) - min(per_rank) <= max(lengths)  # balanced to within one sample
        assert [b.tolist() for b in token_budget_split(indices, lengths, budget, ranks)] == [b.tolist() for b in bins]


def test_a_varlen_kernel_plugs_into_the_model_as_packed_attention(tiny_model_dir):
    """The attention plumbing of `ppoflow_varlen` (cumulative lengths through transformers to the kernel, GQA, the
    layout), with a reference kernel in place of flash-attention's, which needs CUDA: SDPA on each sequence alone.
    Packed log-probs through it equal the padded path's."""
    from transformers import AutoModelForCausalLM

    from workers.packing import register_attention

    calls = []

    def kernel(q, k, v, cu, max_len, scale=None):
        calls.append(len(cu) - 1)
        bounds = cu.tolist()
        return torch.cat([torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=True,
            scale=scale).transpose(0, 1) for a, b in zip(bounds, bounds[1:])])

    register_attention("ppoflow_test_varlen", kernel)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                 attn_implementation="ppoflow_test_varlen")
    prompts, responses = _samples(7, model.config.vocab_size)
    with torch.no_grad():
        packed, mask = packed_logprobs(model, prompts, responses)
        padded, _ = response_logprobs(model, *_collate(prompts, responses, 0))  # SDPA: not packed
    assert calls == [len(prompts)] * model.config.num_hidden_layers  # every layer, packed, through the kernel
    assert torch.allclose(packed[mask], padded[mask], atol=1e-5, rtol=0)
