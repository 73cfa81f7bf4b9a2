"""The transformers engine on the tiny local model: vLLM's sampling contract, seeds, logprobs, in-place weight updates.

Most tests call `HFEngine` in-process (one engine for the module, ~2 s to start); one goes through a Ray actor; one
slow test runs the PPO flow on it end to end. Run alone:
    .venv/bin/pytest -q tests/workers/test_hf_engine.py -p no:cacheprovider -m "not slow"   # ~35 s on 2 cores
    .venv/bin/pytest -q tests/workers/test_hf_engine.py -p no:cacheprovider                # + the PPO run, ~2.5 min
"""

import json
import math
from pathlib import Path

import pytest


def _request(prompt_ids, seed, n=4, temperature=1.0, max_new_tokens=24, stop=None, top_k=-1, top_p=1.0):
    return {"prompt_ids": prompt_ids, "n": n, "temperature": temperature, "top_p": top_p, "top_k": top_k,
            "max_new_tokens": max_new_tokens, "seed": seed, "stop": stop}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    # Different lengths, so every batch of them is left-padded.
    texts = ["What is 2 + 3?", "What is 17 + 25 + 1000?", "Hi"]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


@pytest.fixture(scope="module", autouse=True)
def _restore_threads():
    """The engines here run on one thread (on a busy 2-core machine a second OpenMP thread that loses its core
    stalls every op, ~15x slower); the count is process-wide, so the tests after these get theirs back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from workers.hf_engine import HFEngine

    return HFEngine(tiny_model_dir, seed=0, max_model_len=256, num_threads=1)


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    """The plain HF model the engine's logprobs are checked against (its own copy of the weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _forward_logprobs(model, prompt, response):
    """log p(response[i] | prompt + response[:i]) from one unpadded forward pass, as the trainer computes it."""
    import torch

    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    return logp[len(prompt) - 1 :].gather(-1, torch.tensor(response)[:, None])[:, 0]


def test_samples_have_aligned_ids_logprobs_and_finish_reasons(engine, prompts, tokenizer):
    max_new = 64
    # 32 samples of up to 64 tokens from a random-init model (279 tokens): ~20% of them stop at eos.
    results = engine.generate([_request(p, seed=100 * i, n=32, max_new_tokens=max_new) for i, p in enumerate(prompts)])

    assert len(results) == len(prompts)
    finish_reasons = set()
    for samples in results:
        assert len(samples) == 32
        for s in samples:
            assert set(s) == {"response_ids", "logprobs", "text", "finish_reason"}
            assert 1 <= len(s["response_ids"]) == len(s["logprobs"]) <= max_new
            assert all(math.isfinite(lp) and lp <= 0.0 for lp in s["logprobs"])
            assert s["text"] == tokenizer.decode(s["response_ids"], skip_special_tokens=True)
            finish_reasons.add(s["finish_reason"])
            if s["finish_reason"] == "stop":
                # eos is kept as the last response token, with its logprob, and skipped in the text
                assert s["response_ids"][-1] == tokenizer.eos_token_id
                assert tokenizer.eos_token_id not in s["response_ids"][:-1]
            else:
                assert s["finish_reason"] == "length"
                assert len(s["response_ids"]) == max_new
                assert tokenizer.eos_token_id not in s["response_ids"]
    assert finish_reasons == {"stop", "length"}


def test_stop_string_cuts_text_but_keeps_the_token(engine, prompts, tokenizer):
    [samples] = engine.generate([_request(prompts[0], seed=7, n=8, max_new_tokens=64, stop=["e", "zz"])])
    stopped = [s for s in samples if s["finish_reason"] == "stop" and s["response_ids"][-1] != tokenizer.eos_token_id]
    assert stopped, "no sample hit the stop string 'e'; pick another seed"
    for s in stopped:
        full = tokenizer.decode(s["response_ids"], skip_special_tokens=True)
        assert s["text"] == full[: full.index("e")]
        assert "e" not in tokenizer.decode(s["response_ids"][:-1], skip_special_tokens=True)  # the last token did it


def test_same_seed_same_samples_regardless_of_batch(engine, prompts):
    base = _request(prompts[0], seed=1234)
    [alone] = engine.generate([base])
    # Other prompt lengths (more left padding), greedy and filtered rows beside it, a different batch size.
    batch = engine.generate([_request(prompts[1], seed=1, temperature=0.0), base,
                             _request(prompts[2], seed=2, n=2, top_k=5, top_p=0.8)])
    [other_seed] = engine.generate([_request(prompts[0], seed=4321)])
    [shifted] = engine.generate([_request(prompts[0], seed=1236, n=1)])

    assert [s["response_ids"] for s in batch[1]] == [s["response_ids"] for s in alone]
    for a, b in zip(batch[1], alone):
        assert a["text"] == b["text"] and a["finish_reason"] == b["finish_reason"]
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 1e-5
    assert [s["response_ids"] for s in other_seed] != [s["response_ids"] for s in alone]
    assert shifted[0]["response_ids"] == alone[2]["response_ids"]  # sample i is sample 0 of seed + i
    assert len({tuple(s["response_ids"]) for s in alone}) == len(alone)
    assert engine.generate([base]) == [alone]  # and the same call again is the same, bit for bit


def test_logprobs_are_the_raw_distribution_of_a_plain_forward_pass(engine, prompts, hf_model):
    # Temperature, top-k and top-p shape the sampling but not the logprobs (temperature 1, unfiltered); the rows of
    # different prompt lengths share one left-padded batch.
    results = engine.generate([_request(prompts[0], seed=3, n=2, temperature=0.7, top_k=20, top_p=0.9),
                               _request(prompts[1], seed=9, n=2, temperature=1.3),
                               _request(prompts[2], seed=5, n=1, temperature=0.0)])
    for prompt, samples in zip(prompts, results):
        for s in samples:
            expected = _forward_logprobs(hf_model, prompt, s["response_ids"])
            assert max(abs(a - b) for a, b in zip(expected.tolist(), s["logprobs"])) < 1e-5

    # Greedy picks the argmax at every step.
    [greedy] = results[2]
    import torch

    with torch.no_grad():
        logits = hf_model(torch.tensor([prompts[2] + greedy["response_ids"]])).logits[0, len(prompts[2]) - 1 : -1]
    assert logits.argmax(-1).tolist() == greedy["response_ids"]


def test_top_k_and_top_p_restrict_the_choice(engine, prompts, hf_model):
    [[greedy]] = engine.generate([_request(prompts[0], seed=0, n=1, temperature=0.0)])
    for knob in ({"top_k": 1}, {"top_p": 1e-6}):  # one candidate left: sampling at temperature 1 is greedy
        [samples] = engine.generate([_request(prompts[0], seed=11, n=3, **knob)])
        assert all(s["response_ids"] == greedy["response_ids"] for s in samples), knob

    import torch

    [samples] = engine.generate([_request(prompts[0], seed=12, n=4, top_k=3)])
    for s in samples:
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompts[0] + s["response_ids"]])).logits[0, len(prompts[0]) - 1 : -1]
        top3 = logits.topk(3, dim=-1).indices
        assert all(t in row for t, row in zip(s["response_ids"], top3.tolist()))


def test_update_weights_in_place_and_restore(engine, prompts, tiny_model_dir):
    import torch
    from safetensors.torch import load_file, save
    from transformers import AutoModelForCausalLM

    from workers.vllm_ext import state_dict_checksum

    requests = [_request(p, seed=21, n=2) for p in prompts]
    before = engine.generate(requests)

    original = load_file(f"{tiny_model_dir}/model.safetensors")
    gen = torch.Generator().manual_seed(0)
    perturbed = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in original.items()}
    result = engine.update_weights(save(perturbed), 1)
    assert result["version"] == 1 and engine.version() == 1
    assert math.isclose(result["checksum"], state_dict_checksum(perturbed.values()), rel_tol=1e-9)
    assert result["bytes"] > 0 and result["seconds"] < 30

    after = engine.generate(requests)
    assert [s["logprobs"] for r in after for s in r] != [s["logprobs"] for r in before for s in r]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    model.load_state_dict(perturbed, strict=False)  # lm_head is tied to embed_tokens
    for prompt, samples in zip(prompts, after):
        for s in samples:
            expected = _forward_logprobs(model, prompt, s["response_ids"])
            assert max(abs(a - b) for a, b in zip(expected.tolist(), s["logprobs"])) < 1e-5

    restored = engine.update_weights(save(original), 2)
    assert restored["engine_checksum"] != result["engine_checksum"]
    assert engine.generate(requests) == before  # bit for bit

    from_path = engine.update_weights_from_path(tiny_model_dir, 3)
    assert from_path["version"] == 3 and engine.version() == 3
    assert math.isclose(from_path["checksum"], state_dict_checksum(original.values()), rel_tol=1e-9)
    assert from_path["engine_checksum"] == restored["engine_checksum"]
    assert engine.generate(requests) == before

    # A state dict that does not fit is refused before anything is copied.
    partial = {k: v for k, v in perturbed.items() if "layers.0." not in k}
    with pytest.raises(ValueError, match="missing names .*layers.0"):
        engine.update_weights(save(partial), 4)
    with pytest.raises(ValueError, match="unknown names .*'extra.weight'"):
        engine.update_weights(save({**perturbed, "extra.weight": torch.zeros(2)}), 4)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        engine.update_weights_from_path(str(Path(tiny_model_dir) / "nowhere"), 4)
    assert engine.version() == 3 and engine.generate(requests) == before


def test_bad_requests_name_the_request(engine, prompts):
    good = _request(prompts[0], seed=0)
    lacking = {k: v for k, v in good.items() if k != "seed"}
    with pytest.raises(ValueError, match=r"request 1 lacks \['seed'\]"):
        engine.generate([good, lacking])
    with pytest.raises(ValueError, match=r"request 2 has 250 prompt ids.*\(at most 232 ids\)"):
        engine.generate([good, good, _request([5] * 250, seed=0, max_new_tokens=24)])
    with pytest.raises(ValueError, match="request 0 needs a non-empty prompt_ids"):
        engine.generate([_request([], seed=0)])
    with pytest.raises(ValueError, match="request 1 needs .* n >= 1"):
        engine.generate([good, _request(prompts[0], seed=0, n=0)])
    assert engine.generate([]) == []
    # the longest prompt that fits is fine
    [[sample]] = engine.generate([_request([5] * 232, seed=0, n=1, max_new_tokens=24)])
    assert len(sample["response_ids"]) <= 24


def test_stats_count_requests_samples_and_tokens(engine, prompts):
    before = engine.stats()
    results = engine.generate([_request(prompts[0], seed=5, n=3), _request(prompts[1], seed=9, n=2)])
    after = engine.stats()

    assert after["requests"] - before["requests"] == 2
    assert after["samples"] - before["samples"] == 5
    tokens = sum(len(s["response_ids"]) for samples in results for s in samples)
    assert after["generated_tokens"] - before["generated_tokens"] == tokens
    assert after["generate_seconds"] > before["generate_seconds"]


def test_bfloat16_engine_follows_a_bfloat16_forward(tiny_model_dir, prompts):
    import torch
    from transformers import AutoModelForCausalLM

    from workers.hf_engine import HFEngine

    bf16 = HFEngine(tiny_model_dir, seed=0, dtype="bfloat16", max_model_len=128, num_threads=1)
    [samples] = bf16.generate([_request(prompts[0], seed=1, n=2, max_new_tokens=16)])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    for s in samples:
        expected = _forward_logprobs(model, prompts[0], s["response_ids"])
        # bf16 rounding differs between a cached decode and one full pass; the logprobs are still float32 values.
        assert max(abs(a - b) for a, b in zip(expected.tolist(), s["logprobs"])) < 0.1


def test_actor_serves_the_same_samples_and_updates(ray_session, tiny_model_dir, engine, prompts):
    import ray
    from safetensors.torch import load_file, save

    from workers.hf_engine import create_hf_engine_actor

    actor = create_hf_engine_actor("test-hf-engine", "ppoflow-tests", num_cpus=1, model_path=tiny_model_dir, seed=0,
                                   max_model_len=256, num_threads=1)
    try:
        assert ray.get(actor.ready.remote(), timeout=120)
        same = create_hf_engine_actor("test-hf-engine", "ppoflow-tests", num_cpus=1, model_path="ignored", seed=1)
        assert ray.get(same.version.remote()) == ray.get(actor.version.remote())  # found by name, not created

        requests = [_request(p, seed=40 + 10 * i) for i, p in enumerate(prompts)]
        remote = ray.get(actor.generate.remote(requests), timeout=120)
        local = engine.generate(requests)  # another process, another thread count: the same samples
        assert [[s["response_ids"] for s in r] for r in remote] == [[s["response_ids"] for s in r] for r in local]

        weights = ray.put(save(load_file(f"{tiny_model_dir}/model.safetensors")))
        result = ray.get(actor.update_weights.remote(weights, 7), timeout=120)  # an object ref, as the sync stage
        assert result["version"] == 7 and ray.get(actor.version.remote()) == 7
        assert ray.get(actor.stats.remote())["samples"] == 12
    finally:
        ray.kill(actor)


def _threads_and_openmp_env(self) -> tuple[int, str | None, str | None]:
    import os

    import torch

    return torch.get_num_threads(), os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT")


@pytest.mark.slow
def test_run_factory_gives_hf_engines_generation_num_threads_and_spinning_threads(ray_session, make_config, tmp_path):
    """Threads as generation.num_threads says, and where it is None the host's cores but the driver's split between
    the engines when generation runs alone in its stage (algo.max_staleness 0), Ray's one thread for a 0.5-CPU actor
    when it runs beside the trainers; OpenMP threads that spin between ops (GOMP_SPINCOUNT overrides the PASSIVE
    policy the job gives every actor), since generation runs alone in its stage; but not where two engines have more
    threads than CPUs and may share cores."""
    import os

    import ray

    from workers.engines import create_engines, get_engines, remove_placement_group

    cores = len(os.sched_getaffinity(0))
    for threads, engines, stale, expected in ((None, 1, 0, (max(1, cores - 1), "300000")), (None, 1, 1, (1, "300000")),
                                              (None, 2, 0, (max(1, (cores - 1) // 2), "300000")),
                                              (2, 1, 0, (2, "300000")), (2, 2, 0, (2, None))):
        config = make_config("generation.backend=hf", "generation.num_cpus=0.5", "ray.namespace=ppoflow-tests",
                             f"generation.num_threads={'null' if threads is None else threads}",
                             f"generation.num_engines={engines}", f"algo.max_staleness={stale}")
        run_uri = str(tmp_path / f"threads-{threads}-{engines}-{stale}")
        handles, _, _ = create_engines(run_uri, config)
        try:
            for handle in handles:
                got = ray.get(handle.__ray_call__.remote(_threads_and_openmp_env), timeout=300)
                assert got == (expected[0], "PASSIVE", expected[1])
        finally:
            for h in get_engines(run_uri, "ppoflow-tests"):
                ray.kill(h)
            remove_placement_group(run_uri)


@pytest.mark.gpu
def test_sleep_frees_the_gpu_and_wake_up_restores_the_engine(tiny_model_dir, prompts):
    """Sleep mode as the stages use it (generation.enable_sleep_mode): sleep after sampling, wake the weights for a
    sync, the KV cache before sampling. The HF engine keeps no KV cache between calls, so only the weights move."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from safetensors.torch import load_file, save

    from workers.hf_engine import HFEngine

    engine = HFEngine(tiny_model_dir, seed=0, max_model_len=256)
    assert next(engine._model.parameters()).device.type == "cuda"
    greedy = [_request(p, seed=0, n=1, temperature=0.0, max_new_tokens=16) for p in prompts]
    sampled = [_request(p, seed=11, n=4) for p in prompts]
    before, before_sampled = engine.generate(greedy), engine.generate(sampled)
    weight_bytes = sum(p.numel() * p.element_size() for p in engine._model.parameters())
    torch.cuda.synchronize()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()

    engine.sleep()
    torch.cuda.synchronize()
    assert allocated - torch.cuda.memory_allocated() >= weight_bytes  # every parameter left the GPU
    assert torch.cuda.memory_reserved() < reserved  # and the allocator gave the blocks back
    assert engine.sleeping() == ["kv_cache", "weights"]
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(greedy)
    weights = save(load_file(f"{tiny_model_dir}/model.safetensors"))
    with pytest.raises(RuntimeError, match="asleep"):
        engine.update_weights(weights, 1)

    engine.wake_up(["weights"])  # what the sync stage does
    assert next(engine._model.parameters()).device.type == "cuda"
    assert engine.update_weights(weights, 1)["version"] == 1
    with pytest.raises(RuntimeError, match="kv_cache"):
        engine.generate(greedy)
    engine.wake_up(["kv_cache"])  # what generation does
    after = engine.generate(greedy)
    assert [s[0]["response_ids"] for s in after] == [s[0]["response_ids"] for s in before]
    for a, b in zip(after, before):
        assert max(abs(x - y) for x, y in zip(a[0]["logprobs"], b[0]["logprobs"])) < 1e-5
    assert [[s["response_ids"] for s in r] for r in engine.generate(sampled)] == \
        [[s["response_ids"] for s in r] for r in before_sampled]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_backend", "ray_session")
def test_ppo_run_on_the_hf_engine_commits_both_iterations(make_config):
    from flows.ppo import ppo_train

    config = make_config("run_id=hf-engine", "iterations=2", "generation.backend=hf")
    result = ppo_train(config=config)
    run = Path(result["run_uri"])
    for n in (1, 2):
        for stage in ("generate", "score", "advantages", "update", "sync"):
            marker = json.loads((run / f"iter-{n:06d}" / stage / "_SUCCESS.json").read_text())
            assert marker["config_hash"] == config.config_hash() and marker["rows"] > 0, (n, stage)
    # Iteration 2 sampled from the synced policy, and the engine's logprobs are the trainer's.
    assert json.loads((run / "iter-000002" / "generate" / "_SUCCESS.json").read_text())["policy_version"] == 1
    scored = json.loads((run / "iter-000002" / "score" / "_SUCCESS.json").read_text())
    assert scored["metrics"]["rollout/logprob_abs_diff_max"] < 1e-4
