"""Device placement of the trainers' batch tensors (workers/trainer.py), checked without a GPU.

The "meta" device stands in for cuda: a helper that builds a tensor on the CPU instead of the requested (the model's)
device shows up here, where on a GPU it would fail inside a loss with a device mismatch.
"""

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
