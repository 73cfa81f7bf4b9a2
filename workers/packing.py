"""Padding-free forwards for the trainers: sequences packed into one row, attention that cannot cross a boundary,
log-probs and entropy from the hidden states in chunks, and micro-batches cut by a token budget.

- `pack`: a micro-batch's prompt+response sequences concatenated into one row, position ids restarting at each
  sequence, and the flat positions that predict response tokens. No pad token is computed.
- Attention: `ppoflow_varlen` (registered with transformers) runs flash-attention's variable-length kernel
  (torch.nn.attention.varlen) from the sequences' cumulative lengths on CUDA; elsewhere, and for any call that is
  not packed, SDPA, which on a packed row gets transformers' block-diagonal causal mask (built from the restarting
  position ids). Same code on CPU and GPU; only the kernel differs.
- `token_logprobs`: log π(a_t) = logit − logsumexp over the vocabulary, from the hidden states in chunks of
  LOGITS_CHUNK_TOKENS rows, each chunk's logits rebuilt in the backward from the hidden rows and their logsumexp,
  so the (tokens × vocabulary) float32 logits never exist at once: with Qwen2.5's 151,936-token vocabulary they
  would be ~0.6 MB a token. The entropy rides along, with a gradient only when the loss uses it.
- `token_budget_split`: an optimizer step's samples cut into micro-batches of at most a token budget, a whole
  multiple of the group's ranks, balanced so every rank gets about the same tokens (longest first onto the lightest).

Run alone: nothing to run; tests/workers/test_packing.py compares the packed path with the padded one.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

LOGITS_CHUNK_TOKENS = 1024
"""Rows of hidden states turned into logits at once: 1024 × 151,936 × 4 bytes = 0.6 GB of float32 logits at a
Qwen2.5 vocabulary, the most that is ever alive (bf16 copy aside)."""

VARLEN_ATTENTION = "ppoflow_varlen"
"""The attention implementation name trainers load models with on CUDA (`register_varlen_attention`)."""

_PACKED = contextvars.ContextVar("ppoflow_packed_forward", default=False)  # inside `packed_forward`


@contextlib.contextmanager
def packed_forward():
    """Mark a forward as packed: under `ppoflow_varlen` transformers then builds no (T × T) mask, since the varlen
    kernel reads the boundaries from the cumulative lengths."""
    token = _PACKED.set(True)
    try:
        yield
    finally:
        _PACKED.reset(token)


@dataclass
class Packed:
    """One micro-batch as one row. T = Σ_i (p_i + a_i) tokens; N = Σ_i a_i response tokens."""

    input_ids: torch.Tensor  # (1, T) every sequence's prompt then response, back to back
    position_ids: torch.Tensor  # (1, T) 0..p_i+a_i-1 within each sequence
    cu_seqlens: torch.Tensor  # (B+1,) int32, start of each sequence in the row, then T
    max_len: int  # longest sequence
    predict: torch.Tensor  # (N,) row positions whose output predicts a response token (p_i − 1 + t)
    targets: torch.Tensor  # (N,) the response token each of them predicts
    rows: torch.Tensor  # (N,) the sample each response token belongs to
    cols: torch.Tensor  # (N,) its index t within the response
    resp_lens: list[int]  # a_i

    def forward_kwargs(self) -> dict:
        """What a packed forward passes the model besides the ids: the restarting positions (from which transformers
        builds SDPA's block-diagonal mask; it looks for them only without a KV cache, hence use_cache off) and the
        cumulative lengths, which transformers hands to the attention function (the varlen kernel's)."""
        return {"position_ids": self.position_ids, "use_cache": False, "cu_seq_lens_q": self.cu_seqlens,
                "cu_seq_lens_k": self.cu_seqlens, "max_length_q": self.max_len, "max_length_k": self.max_len}

    def unflatten(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token values (N,) → the losses' layout (B, A_max), 0-filled, and its mask."""
        import torch

        a_max = max(max(self.resp_lens), 1)
        out = flat.new_zeros((len(self.resp_lens), a_max))
        out = out.index_put((self.rows, self.cols), flat)
        mask = torch.zeros((len(self.resp_lens), a_max), dtype=torch.bool, device=flat.device)
        mask[self.rows, self.cols] = True
        return out, mask


def pack(prompt_ids: list, response_ids: list, device=None) -> Packed:
    """`Packed` of the samples prompt_ids[i] + response_ids[i], built on the CPU and moved to `device` once."""
    import torch

    lens = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    ids = torch.tensor([t for p, r in zip(prompt_ids, response_ids) for t in (*p, *r)], dtype=torch.long)
    positions = torch.cat([torch.arange(n) for n in lens])
    predict, rows, cols = [], [], []
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        first = starts[i] + len(p) - 1
        predict += range(first, first + len(r))
        rows += [i] * len(r)
        cols += range(len(r))
    predict = torch.tensor(predict, dtype=torch.long)
    return Packed(input_ids=ids[None].to(device), position_ids=positions[None].to(device),
                  cu_seqlens=torch.tensor(starts, dtype=torch.int32).to(device), max_len=max(lens),
                  predict=predict.to(device), targets=ids[predict + 1].to(device),
                  rows=torch.tensor(rows, dtype=torch.long).to(device),
                  cols=torch.tensor(cols, dtype=torch.long).to(device), resp_lens=[len(r) for r in response_ids])


def _chunk_logprobs(head, hidden, targets, with_entropy: bool, entropy_grad: bool):
    import torch

    from algorithms.losses import entropy_from_logits

    logits = head(hidden).float()
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    if not with_entropy:
        return logp, None
    if entropy_grad:
        return logp, entropy_from_logits(logits, lse)
    with torch.no_grad():
        return logp, entropy_from_logits(logits, lse)


@functools.cache
def _linear_logprobs(compiled: bool = False):
    """The autograd Function of `token_logprobs`'s training path (built on first use: torch is imported late); with
    `compiled`, its two passes over a chunk's logits go through torch.compile."""
    import torch

    from algorithms.losses import entropy_from_logits

    def softmax_stats(hidden, weight, targets, with_entropy: bool):
        """(n, H) hidden rows → log p(target), logsumexp, entropy (empty when not asked): (n,) float32 each."""
        logits = torch.nn.functional.linear(hidden, weight).float()
        lse = torch.logsumexp(logits, dim=-1)
        logp = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
        return logp, lse, entropy_from_logits(logits, lse) if with_entropy else logp.new_zeros(0)

    def logits_grad(hidden, weight, targets, lse, grad_logp):
        """∂/∂z of Σ g·log p(target), (n, V) in the hidden rows' dtype: g · (onehot(target) − softmax(z))."""
        grad = torch.nn.functional.linear(hidden, weight).float()  # a new tensor: the in-place steps are safe
        grad.sub_(lse[:, None]).exp_().mul_(-grad_logp[:, None])  # −softmax(z) · g
        grad.scatter_add_(-1, targets[:, None], grad_logp[:, None].to(grad.dtype))  # + onehot(target) · g
        return grad.to(hidden.dtype)

    if compiled:
        # Eager, each step is a pass over the chunk's (rows × vocabulary) float32 logits (cast, max, exp, sum,
        # gather; sub, exp, mul, scatter, cast back), the fp32 work that leads the update's GPU profile besides the
        # GEMMs; inductor fuses them into fewer passes over the GEMM's output. dynamic: the last chunk of a
        # micro-batch is shorter, and must not recompile.
        softmax_stats, logits_grad = (torch.compile(f, dynamic=True) for f in (softmax_stats, logits_grad))

    class LinearLogprobs(torch.autograd.Function):
        """log softmax(hidden · Wᵀ)[target] per row, float32, and the entropy (no gradient; empty when not asked).
        Keeps the hidden rows and each row's logsumexp for the backward, which rebuilds the softmax from them in one
        pass: ∂ log p(target)/∂z = onehot(target) − softmax(z). A checkpoint would rerun the whole forward (the
        entropy too) and then the logsumexp's own backward: on a 152k vocabulary that fp32 work, not the GEMMs,
        led a 0.5B update's profile (bench/RESULTS.md, issue 23)."""

        @staticmethod
        def forward(ctx, hidden, weight, targets, with_entropy: bool):
            logp, lse, entropy = softmax_stats(hidden, weight, targets, with_entropy)
            ctx.save_for_backward(hidden, weight, targets, lse)
            ctx.mark_non_differentiable(entropy)
            return logp, entropy

        @staticmethod
        def backward(ctx, grad_logp, _grad_entropy):
            hidden, weight, targets, lse = ctx.saved_tensors
            grad = logits_grad(hidden, weight, targets, lse, grad_logp)
            return (grad @ weight if ctx.needs_input_grad[0] else None,
                    grad.t() @ hidden if ctx.needs_input_grad[1] else None, None, None)

    return LinearLogprobs


def token_logprobs(head, hidden: torch.Tensor, targets: torch.Tensor, with_entropy: bool = False,
                   entropy_grad: bool = False, chunk: int = LOGITS_CHUNK_TOKENS, compiled: bool = False):
    """log softmax(head(hidden))[targets] for rows of hidden states (N, H) → (N,) float32, and the entropy (N,)
    when asked (with a gradient only if `entropy_grad`), LOGITS_CHUNK_TOKENS rows at a time, so that no more than
    one chunk's logits exist at once. Under autograd a plain bias-free linear head goes through `LinearLogprobs`
    (only the hidden rows and a logsumexp per row kept for the backward); any other head (a ZeRO-3-partitioned
    weight, which only the module's own forward gathers; an adapter-wrapped head) and an entropy with a gradient
    run the same arithmetic checkpointed, its logits recomputed in the backward. `compiled` (`trainer.compile`):
    `LinearLogprobs`'s passes over the logits through torch.compile; the other paths stay eager."""
    import torch
    from torch.utils.checkpoint import checkpoint

    training = torch.is_grad_enabled() and hidden.requires_grad
    fused = (training and not entropy_grad and type(head) is torch.nn.Linear and head.bias is None
             and not hasattr(head.weight, "ds_id"))  # ds_id: a DeepSpeed ZeRO-3 parameter
    logps, entropies = [], []
    for start in range(0, hidden.shape[0], chunk):
        args = (head, hidden[start:start + chunk], targets[start:start + chunk], with_entropy, entropy_grad)
        if fused:
            logp, entropy = _linear_logprobs(compiled).apply(args[1], head.weight, args[2], with_entropy)
        elif training:
            logp, entropy = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            logp, entropy = _chunk_logprobs(*args)
        logps.append(logp)
        entropies.append(entropy)
    if not logps:
        return hidden.new_zeros(0, dtype=torch.float32), (hidden.new_zeros(0, dtype=torch.float32)
                                                           if with_entropy else None)
    return torch.cat(logps), torch.cat(entropies) if with_entropy else None


def token_budget_split(indices, lengths, budget: int, ranks: int) -> list:
    """The samples `indices` (with token counts `lengths[i]`) of one optimizer step as micro-batches of at most
    `budget` tokens where possible (a sample longer than the budget goes alone), their number a multiple of `ranks`
    (every rank of a group must run as many forwards: ZeRO-3 gathers parameters in each) and at most the number of
    samples, filled longest first onto the lightest micro-batch so the ranks' token loads come out nearly equal.
    Deterministic: ties keep the given order. Micro-batch j goes to rank j mod ranks; one is empty only when there
    are fewer samples than ranks."""
    import math

    import numpy as np

    n = len(indices)
    limit = max(ranks, n - n % ranks)
    count = min(limit, ranks * max(1, math.ceil(sum(int(lengths[i]) for i in indices) / (budget * ranks))))
    order = sorted(indices, key=lambda i: -int(lengths[i]))  # stable: ties in the given order
    while True:
        bins, loads = [[] for _ in range(count)], [0] * count
        for i in order:
            j = min(range(count), key=lambda b: (loads[b], b))
            bins[j].append(i)
            loads[j] += int(lengths[i])
        if count >= limit or all(load <= budget or len(b) == 1 for b, load in zip(bins, loads)):
            return [np.asarray(b, dtype=np.int64) for b in bins]
        count = min(limit, count + ranks)


_VARLEN: list[bool] = []  # whether `ppoflow_varlen` is registered and works here (decided once per process)


def register_varlen_attention() -> bool:
    """Register `ppoflow_varlen` with transformers; False when torch has no varlen kernel, no CUDA, or a kernel whose
    results differ from SDPA's on a packed check (a torch whose API moved), where the trainers keep SDPA. Decided
    once per process."""
    if not _VARLEN:
        _VARLEN.append(_register_varlen())
    return _VARLEN[0]


def _register_varlen() -> bool:
    import inspect

    import torch

    if not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return False
    # torch's varlen API changed between releases: `is_causal=True` (2.9-2.11) or a (-1, 0) window (later).
    causal = ({"is_causal": True} if "is_causal" in inspect.signature(varlen_attn).parameters
              else {"window_size": (-1, 0)})

    def kernel(q, k, v, cu, max_len, scale=None):
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, **causal)

    # Two sequences (5 and 3 tokens) packed, against SDPA on each alone: the kernel must agree before it is used.
    try:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(8, 4, 64, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        got = kernel(q, k, v, torch.tensor([0, 5, 8], dtype=torch.int32, device="cuda"), 5)
        want = torch.cat([torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=True).transpose(0, 1)
            for a, b in ((0, 5), (5, 8))])
        if not torch.allclose(got.float(), want.float(), atol=2e-2):
            return False
    except Exception:  # noqa: BLE001 - a kernel missing from this build, an API that moved: keep SDPA
        return False
    register_attention(VARLEN_ATTENTION, kernel)
    return True


def register_attention(name: str, kernel) -> None:
    """Register attention `name` with transformers: packed forwards (those given cumulative lengths; inside
    `packed_forward` no mask is built for them) call `kernel(q, k, v, cu_seqlens, max_len, scale)` on (T, H, D)
    tensors, causal within each sequence; every other forward (a padded batch, a KV-cache forward) is SDPA with the
    mask transformers builds for it."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # Only a packed forward passes cumulative lengths (`Packed.forward_kwargs`), and the kernel is right whenever
        # they are given. The context variable is not read here: dynamo cannot trace ContextVar.get, so a compiled
        # decoder layer (trainer.compile) would break its graph around every attention call.
        cu = kwargs.get("cu_seq_lens_q")
        if cu is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, **kwargs)
        # (1, H, T, D) → (T, H, D); grouped KV heads repeated to the query heads
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
        if k.shape[1] != q.shape[1]:
            k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
        out = kernel(q.contiguous(), k.contiguous(), v.contiguous(), cu, kwargs["max_length_q"], scale=scaling)
        return out[None], None

    def mask(*args, **kwargs):  # packed: the kernel reads the boundaries from the lengths; no (T × T) mask built
        return None if _PACKED.get() else sdpa_mask(*args, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, mask)
