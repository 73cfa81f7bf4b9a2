"""`trainer.compile` (workers/trainer.py `_compile_layers`, workers/packing.py `LinearLogprobs` compiled): the
compiled packed forward and backward equal the eager ones; micro-batches of other token counts reuse the compiled
graphs instead of recompiling; the DeepSpeed trainers train the same with it under ZeRO 0-2, with LoRA, and for the
critic; ZeRO-3 is refused naming the field.

Tolerances (float32 on CPU, where inductor's fused reductions sum in another order than the eager kernels):
log-probs and entropy 1e-5 absolute, gradients 1e-5 relative (‖Δg‖ ≤ 1e-5‖g‖), trainer metrics 1e-5
relative and the weights after the update as tests/workers/test_trainer_group.py compares them (1e-4 of the
update itself). Seen on CPU: log-probs within 1e-6, gradients within 5e-7 relative.

Compiling dominates: each test compiles its graphs once and reuses them (the file took ~2.5 min with a cold inductor
cache on a shared 2-core host, well under a minute with a warm one). The trainers run in this process (DeepSpeed on a
1-rank gloo group), not in Ray actors.

Run alone:  .venv/bin/pytest -q tests/workers/test_trainer_compile.py
"""

import numpy as np
import pytest
import torch

from tests.workers.test_trainer_group import (SEED, WEIGHT_RTOL, _assert_rows_close, _assert_same_metrics,
                                              _experience, _tokens, _trainer, _update_distance)
from workers.packing import register_attention
from workers.trainer import _compile_layers, packed_logprobs


def _batches(vocab: int, sizes=(3, 5, 8)):
    """Micro-batches of `sizes` samples of random lengths: packed rows of different token counts and boundaries."""
    rng = np.random.default_rng(11)
    return [([rng.integers(3, vocab, rng.integers(2, 12)).tolist() for _ in range(n)],
             [rng.integers(3, vocab, rng.integers(1, 9)).tolist() for _ in range(n)]) for n in sizes]


def _graphs() -> int:
    """Graphs dynamo has compiled since the last `torch._dynamo.reset()` (each one compiled once by inductor, its
    backward with it)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _fresh_dynamo() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_compiled_packed_step_equals_eager_and_compiles_once(tiny_model_dir, checkpointing):
    """Three packed micro-batches (different token counts, sequence counts and longest sequences) through compiled
    decoder layers and the compiled LM-head arithmetic: the log-probs, entropy and every parameter's gradient equal
    the eager model's, also when the layers are recomputed in the backward (HF gradient checkpointing around the
    compiled layer); the graphs compiled for the first micro-batch serve the other two; no graph breaks."""
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    _fresh_dynamo()
    eager, compiled = (AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                            attn_implementation="sdpa").train() for _ in range(2))
    if checkpointing:  # enabled before compiling, as _DeepSpeedWorker._build does
        for model in (eager, compiled):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _compile_layers(compiled, "policy.compile")
    graphs = []
    for prompts, responses in _batches(eager.config.vocab_size):
        out = {}
        for name, model in (("eager", eager), ("compiled", compiled)):
            model.zero_grad()
            logp, mask, entropy = packed_logprobs(model, prompts, responses, with_entropy=True,
                                                  compiled=name == "compiled")
            w = torch.linspace(-1, 1, logp.numel()).reshape(logp.shape)  # tokens weighed differently, as PPO does
            torch.where(mask, logp * w, 0).sum().backward()
            out[name] = (logp.detach()[mask], entropy[mask],
                         {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        graphs.append(_graphs())
        (lp_e, ent_e, g_e), (lp_c, ent_c, g_c) = out["eager"], out["compiled"]
        assert torch.allclose(lp_c, lp_e, atol=1e-5, rtol=0) and torch.allclose(ent_c, ent_e, atol=1e-5, rtol=0)
        assert g_e.keys() == g_c.keys() and len(g_e) == len(list(eager.parameters()))
        for name, g in g_e.items():
            assert torch.linalg.vector_norm(g_c[name] - g) <= 1e-5 * torch.linalg.vector_norm(g) + 1e-8, name
    # One graph for every decoder layer, one for the head's forward pass over the logits, one for its backward.
    assert graphs == [3, 3, 3], graphs
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compiled_unpacked_forwards_run_full_sequences_in_one_graph(tiny_model_dir):
    """Without packing (the CPU default) a compiled model's forwards run the padded full sequences, never the shared
    prompts' KV cache (whose per-layer index compiled every layer apart, up to dynamo's limit): one graph for
    padded micro-batches of any shape, the eager values and gradients; the reference (policy.compile) too."""
    import pyarrow as pa
    from transformers import AutoModelForCausalLM

    from workers.config import TrainerConfig
    from workers.trainer import ReferenceWorker, _shares_prompts, forward_logprobs

    assert _shares_prompts(TrainerConfig()) and not _shares_prompts(TrainerConfig(compile=True))
    _fresh_dynamo()
    eager, compiled = (AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                            attn_implementation="sdpa") for _ in range(2))
    _compile_layers(compiled, "policy.compile")
    for prompts, responses in _batches(eager.config.vocab_size):
        out = []
        for model in (eager, compiled):
            model.zero_grad()
            logp, mask = forward_logprobs(model, prompts, responses, 0, None, "padded")
            (logp * mask).sum().backward()
            out.append((logp.detach()[mask], torch.cat([p.grad.flatten() for p in model.parameters()])))
        (lp_e, g_e), (lp_c, g_c) = out
        assert torch.allclose(lp_c, lp_e, atol=1e-5, rtol=0)
        assert torch.linalg.vector_norm(g_c - g_e) <= 1e-5 * torch.linalg.vector_norm(g_e)
        assert _graphs() == 1

    prompts, responses = (sum(lists, []) for lists in zip(*_batches(eager.config.vocab_size)))
    table = pa.table({"prompt_ids": prompts, "response_ids": responses})
    eager_ref, compiled_ref = (ReferenceWorker(tiny_model_dir, "float32", TrainerConfig(micro_batch_size=4, compile=on))
                               for on in (False, True))
    _assert_rows_close(compiled_ref.logprobs(table), eager_ref.logprobs(table))
    assert _graphs() == 2  # the reference's forwards without gradients: one more graph, for every micro-batch


def test_compiled_layers_take_the_varlen_kernel_without_graph_breaks(tiny_model_dir):
    """The GPU's packed attention path (`ppoflow_varlen`: the kernel called from the cumulative lengths) inside a
    compiled layer, with a reference kernel registered as an opaque custom op, as torch's varlen_attn is: one graph
    for every layer and micro-batch, no break (reading the packed-forward context variable there broke it)."""
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    @torch.library.custom_op("ppoflow_test::varlen_attention", mutates_args=())
    def varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int) -> torch.Tensor:
        bounds = cu.tolist()
        return torch.cat([torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=True).transpose(0, 1)
            for a, b in zip(bounds, bounds[1:])])

    @varlen.register_fake
    def _(q, k, v, cu, max_len):
        return torch.empty_like(q)

    register_attention("ppoflow_test_compiled_varlen", lambda q, k, v, cu, max_len, scale=None:
                       varlen(q, k, v, cu, max_len))
    _fresh_dynamo()
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                 attn_implementation="ppoflow_test_compiled_varlen")
    _compile_layers(model, "policy.compile")
    with torch.no_grad():
        for prompts, responses in _batches(model.config.vocab_size):
            got, mask = packed_logprobs(model, prompts, responses)
            want, _ = packed_logprobs(sdpa, prompts, responses)
            assert torch.allclose(got[mask], want[mask], atol=1e-5, rtol=0)
    assert _graphs() == 1 and not counters["graph_break"], dict(counters["graph_break"])


def test_compile_config_rules():
    from pydantic import ValidationError

    from workers.config import PolicyConfig, TrainerConfig

    with pytest.raises(ValidationError, match="compile: torch.compile of the decoder layers needs zero_stage 0, 1"):
        TrainerConfig(zero_stage=3, compile=True)
    with pytest.raises(ValidationError, match="compile: .*set compile: false or zero_stage: 2"):
        PolicyConfig(zero_stage=3, compile=True)
    assert TrainerConfig().compile is False and TrainerConfig(zero_stage=2, compile=True).compile
    with pytest.raises(ValueError, match=r"critic.compile: Linear has no transformers decoder layers"):
        _compile_layers(torch.nn.Linear(2, 2), "critic.compile")


def test_compile_is_a_run_config_field(tiny_model_dir):
    """`policy.compile=true` from the command line; ZeRO-3 refused with the field's full path."""
    from stages.config import ConfigError, load_config

    base = {"model": {"path": tiny_model_dir}, "data": {"prompts": "p.jsonl"}}
    cfg = load_config(base=base, overrides=["policy.compile=true", "policy.zero_stage=2"])
    assert cfg.policy.compile and not cfg.critic.compile
    with pytest.raises(ConfigError, match="policy.compile: torch.compile of the decoder layers needs zero_stage"):
        load_config(base=base, overrides=["policy.compile=true", "policy.zero_stage=3"])


def _rendezvous_env(monkeypatch) -> None:
    """The trainers set the process group's variables in their own process (an actor's): here that is pytest's, so
    they are put back afterwards."""
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(key, "")


def _algo():
    from algorithms.config import AlgoConfig

    # entropy_coef 0: the update takes the fused LM-head path (LinearLogprobs), the one `compile` compiles; the KL
    # loss and IS correction keep every other term of the loss in.
    return AlgoConfig(estimator="gae", kl_in_reward=False, kl_estimator="k3", entropy_coef=0.0, is_correction="tis",
                      loss_agg="seq-mean-token-mean", ppo_epochs=1)


@pytest.mark.slow
@pytest.mark.parametrize("role,zero_stage,lora", [("policy", 2, False), ("policy", 0, True), ("critic", 1, False)],
                         ids=["policy-zero2", "lora-zero0", "critic-zero1"])
def test_compiled_trainers_train_like_eager(tiny_model_dir, monkeypatch, role, zero_stage, lora):
    """A DeepSpeed trainer with `compile` on and off, packed under a token budget (micro-batches of different token
    counts): the same log-probs (or values), the same metrics at every optimizer step, the same weights after them;
    a second update, on other lengths, compiles nothing new."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from workers.config import LoraConfig, PolicyConfig
    from workers.trainer import CriticWorker, PolicyWorker

    _rendezvous_env(monkeypatch)
    vocab = AutoConfig.from_pretrained(tiny_model_dir).vocab_size
    tokens, later = _tokens(16, seed=4, vocab=vocab), _tokens(16, seed=9, vocab=vocab)
    base = load_file(f"{tiny_model_dir}/model.safetensors")
    runs = {}
    # The 1-rank gloo group stays up for the rest of the session: DeepSpeed keeps a handle on the first one, and a
    # second, after destroy_process_group, is not the group its communication layer knows.
    for compiled in (False, True):
        _fresh_dynamo()
        cfg = PolicyConfig(**_trainer(zero_stage=zero_stage, mini_batch_size=8, packing=True,
                                      max_tokens_per_micro_batch=40, compile=compiled).model_dump(),
                           lora=LoraConfig(rank=4, alpha=8) if lora else None)
        if role == "policy":
            worker = PolicyWorker(tiny_model_dir, cfg, "float32", SEED, algo=_algo(), norm_len=8)
            old = worker.logprobs(tokens)
            # LoRA: also the reference, the same compiled layers with the adapter disabled
            scores = old + (worker.logprobs(tokens, None, False) if lora else [])
        else:
            worker = CriticWorker(tiny_model_dir, cfg, "float32", SEED, algo=_algo(), pad_token_id=0)
            scores = old = worker.values(tokens)
        metrics = worker.train(_experience(tokens, old, seed=5), 1, SEED, kl_coef=0.1)
        graphs = _graphs()
        worker.train(_experience(later, worker.logprobs(later) if role == "policy" else worker.values(later),
                                 seed=6), 2, SEED, kl_coef=0.1)
        assert _graphs() == graphs, "a second update on other lengths compiled again"
        module = worker.engine.module
        weights = ({k: v.detach().clone() for k, v in worker._engine_tensors().items()} if role == "policy"
                   else {f"model.{k}": v.detach().clone() for k, v in module.body.state_dict().items()})
        runs[compiled] = (scores, metrics, weights, graphs)
        worker.engine.destroy()
    (s_e, m_e, w_e, _), (s_c, m_c, w_c, graphs) = runs[False], runs[True]
    assert graphs > 0  # compiled at all
    _assert_rows_close(s_c, s_e)
    _assert_same_metrics(m_c, m_e)
    keys = [k for k in base if k in w_e]
    assert keys
    assert _update_distance(w_c, w_e, {k: base[k] for k in keys}) <= WEIGHT_RTOL
