"""A LoRA policy (policy.lora; workers/trainer.py PolicyWorker with PEFT) on real DeepSpeed in Ray actors, on the tiny
random-init Qwen2 in float32: the reference is the policy with its adapter disabled; only the adapter trains; a
ZeRO-2 group of 2 ranks is the 1-rank ZeRO-0 model; the engines' weights are the adapter merged into the base; the
checkpoint holds the adapter and its optimizer state only and round-trips exactly; the HF export is the adapter, the
merged export the full weights. Tolerances as in tests/workers/test_trainer_group.py.

Run alone:  .venv/bin/pytest -q tests/workers/test_lora.py
"""

import os

import pytest

from tests.workers.test_trainer_group import (SEED, Group, _algo, _assert_rows_close, _assert_same_metrics,
                                              _experience, _kill_all, _tokens, _trainer)


def _lora_trainer(**overrides):
    from workers.config import LoraConfig, PolicyConfig

    return PolicyConfig(**_trainer(**overrides).model_dump(), lora=LoraConfig(rank=4, alpha=8))


def test_lora_config_rules(tiny_model_dir):
    from pydantic import ValidationError

    from stages.config import ConfigError, load_config
    from workers.config import LoraConfig, PolicyConfig

    with pytest.raises(ValidationError, match="zero_stage: 3 is not supported with a LoRA adapter"):
        PolicyConfig(zero_stage=3, lora=LoraConfig())
    base = {"model": {"path": tiny_model_dir}, "data": {"prompts": "p.jsonl"}}
    with pytest.raises(ConfigError, match="model.ref_path: with policy.lora the reference is the policy's base"):
        load_config(base=base, overrides=["model.ref_path=/elsewhere", "policy.lora.rank=4"])
    with pytest.raises(ConfigError, match="model.ref_path: policy.lora.init_adapter needs model.ref_path"):
        load_config(base=base, overrides=["policy.lora.init_adapter=/some/adapter"])
    ok = load_config(base=base, overrides=["policy.lora.rank=4", "policy.zero_stage=2"])
    assert ok.policy.lora.rank == 4 and ok.critic.model_dump().get("lora") is None  # the critic trains in full


@pytest.mark.slow
def test_lora_policy_reference_training_sync_and_checkpoint(ray_session, tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load, load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from workers.trainer import PolicyWorker, ReferenceWorker

    vocab = AutoConfig.from_pretrained(tiny_model_dir).vocab_size
    solo = duo = None
    try:
        solo = Group(PolicyWorker, 1, tiny_model_dir, _lora_trainer(zero_stage=0), algo=_algo(), norm_len=8)
        duo = Group(PolicyWorker, 2, tiny_model_dir, _lora_trainer(zero_stage=2), algo=_algo(), norm_len=8)
        tokens = _tokens(32, seed=2, vocab=vocab)
        reference = ReferenceWorker(tiny_model_dir, "float32", _trainer())
        base_lp = reference.logprobs(tokens)

        # B = 0 at the start: the policy is the base model, and the adapter-disabled forward is the reference.
        (lp,) = solo.call("logprobs", tokens)
        (ref_lp,) = solo.call("logprobs", tokens, None, False)
        assert lp == ref_lp
        _assert_rows_close(ref_lp, base_lp, atol=1e-5)
        assert duo.call("logprobs", tokens, None, False) == [ref_lp, ref_lp]

        table = _experience(tokens, lp, seed=3)
        (one,) = solo.call("train", table, 1, SEED, 0.05)
        one_duo = duo.call("train", table, 1, SEED, 0.05)
        assert one[0]["ppo/grad_norm"] > 0 and one_duo[0] == one_duo[1]
        _assert_same_metrics(one_duo[0], one)

        # Training moved the adapter only: the reference is unchanged, bit for bit.
        (lp1,) = solo.call("logprobs", tokens)
        assert solo.call("logprobs", tokens, None, False) == [ref_lp]
        assert max(abs(a - b) for x, y in zip(lp1, lp) for a, b in zip(x, y)) > 1e-4

        # The engines' weights: HF names, the base everywhere but the adapted layers, where W + (alpha/r)·B A; a
        # plain HF model holding them computes the policy's logprobs.
        base_w = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
        merged = load(solo.call("export_weights")[0])
        plan = solo.call("weight_sync_plan")[0]
        assert {e["name"] for e in plan} <= set(merged) and set(base_w) <= set(merged)
        moved = {k for k in base_w if not torch.equal(merged[k], base_w[k])}
        assert moved and all(k.endswith("_proj.weight") for k in moved), moved
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        plain.load_state_dict(merged)
        reference.model = plain.eval()
        _assert_rows_close(reference.logprobs(tokens), lp1, atol=1e-5)
        w_duo = load(duo.call("export_weights")[0])
        step = torch.sqrt(sum(((merged[k] - base_w[k]).double() ** 2).sum() for k in moved))
        diff = torch.sqrt(sum(((merged[k] - w_duo[k]).double() ** 2).sum() for k in moved))
        assert diff / step < 1e-4

        # Checkpoint: the adapter and its Adam states, not the frozen base; back to version 1, the same update.
        ckpt = str(tmp_path / "ckpt-1")
        duo.call("save_checkpoint", ckpt)
        duo.call("export_hf", ckpt, None, False, True)
        state_bytes = sum(f.stat().st_size for f in (tmp_path / "ckpt-1" / "policy").rglob("*") if f.is_file())
        model_bytes = os.path.getsize(os.path.join(tiny_model_dir, "model.safetensors"))
        assert state_bytes < model_bytes / 2, (state_bytes, model_bytes)
        two = duo.call("train", table, 2, SEED + 1, 0.05)
        assert duo.call("ensure_version", 1, ckpt) == [True, True]
        assert load(duo.call("export_weights")[0]).keys() == w_duo.keys()
        assert duo.call("train", table, 2, SEED + 1, 0.05) == two

        # The HF export is the adapter alone (PEFT loads it on the base); the merged export is the full weights.
        hf, merged_dir = tmp_path / "ckpt-1" / "hf", tmp_path / "ckpt-1" / "merged"
        assert (hf / "adapter_model.safetensors").exists() and not (hf / "model.safetensors").exists()
        assert (hf / "adapter_model.safetensors").stat().st_size < model_bytes / 4
        exported = AutoModelForCausalLM.from_pretrained(str(merged_dir)).state_dict()
        assert all(torch.equal(exported[k], w_duo[k]) for k in w_duo)
        import peft

        via_peft = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(hf))
        folded = via_peft.merge_and_unload().state_dict()
        assert all(torch.allclose(folded[k], w_duo[k], atol=1e-6) for k in w_duo)
    finally:
        _kill_all(solo, duo)
