"""The tiny model builder: what it saves loads through the Auto classes (and vLLM) like any HF checkpoint.

`tiny_model_dir` (tests/conftest.py) is the random-init build, `make_tiny_model(out, sft_steps=0)` with seed 0.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ppoflow import tiny_model
from ppoflow.tasks import arith


def _templated(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )


def test_loads_with_auto_classes_as_a_small_tied_qwen2(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = model.config
    assert config.model_type == "qwen2"
    assert model.dtype == torch.float32
    assert config.hidden_size // config.num_attention_heads == 64  # a head size vLLM's CPU attention accepts
    assert config.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert config.max_position_embeddings >= 256
    assert 1_000_000 <= sum(p.numel() for p in model.parameters()) <= 3_000_000
    assert config.vocab_size == len(tokenizer)
    for source in (config, model.generation_config):
        assert source.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert source.pad_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
        assert source.bos_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")


def test_chat_template_renders_with_and_without_generation_prompt(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rendered = _templated(tokenizer, "What is 2*21?")
    assert rendered == "<|im_start|>user\nWhat is 2*21?<|im_end|>\n<|im_start|>assistant\n"
    conversation = [{"role": "user", "content": "What is 2*21?"}, {"role": "assistant", "content": "42"}]
    assert tokenizer.apply_chat_template(conversation, tokenize=False) == (
        "<|im_start|>user\nWhat is 2*21?<|im_end|>\n<|im_start|>assistant\n42<|im_end|>\n"
    )


def test_special_tokens(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.pad_token == "<|endoftext|>"
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.encode("<|im_start|>", add_special_tokens=False) == [im_start]
    # Decoding a response as the rollout does strips the specials.
    response = tokenizer.encode("42", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert tokenizer.decode(response, skip_special_tokens=True) == "42"


def test_tokenizer_round_trips_task_text_without_unk_and_keeps_prompts_short(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    specials = set(tokenizer.all_special_ids)
    for row in arith.make_prompts(300, seed=11):
        prompt_ids = tokenizer.encode(_templated(tokenizer, row["prompt"]), add_special_tokens=False)
        assert len(prompt_ids) <= 32
        for text in (row["prompt"], row["answer"]):
            ids = tokenizer.encode(text, add_special_tokens=False)
            assert not specials & set(ids), f"{text!r} encodes to a special token (unk is <|endoftext|>): {ids}"
            assert tokenizer.decode(ids) == text
        assert len(tokenizer.encode(row["answer"], add_special_tokens=False)) + 1 <= 8  # + <|im_end|>
    # Digits are single tokens: arithmetic needs them.
    assert len(tokenizer.encode("1234567890", add_special_tokens=False)) == 10
    # Byte-level: text the task never produces still round-trips instead of becoming unk.
    odd = "Ünïcödé ² 🙂\ttabs\r\n"
    assert tokenizer.decode(tokenizer.encode(odd, add_special_tokens=False)) == odd


def test_build_is_deterministic(tiny_model_dir, tmp_path):
    again = tiny_model.make_tiny_model(str(tmp_path / "again"), seed=0, sft_steps=0, log=print)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        with open(os.path.join(tiny_model_dir, name), "rb") as a, open(os.path.join(again, name), "rb") as b:
            assert a.read() == b.read(), name


def _answer_nll(model_dir: str, rows: list[dict]) -> float:
    """Mean negative log-likelihood of answer + <|im_end|> tokens given the templated prompt."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            prompt = tokenizer.encode(_templated(tokenizer, row["prompt"]), add_special_tokens=False)
            answer = tokenizer.encode(row["answer"], add_special_tokens=False) + [tokenizer.eos_token_id]
            logp = model(torch.tensor([prompt + answer])).logits[0].log_softmax(-1)
            for j, token in enumerate(answer):
                total -= logp[len(prompt) - 1 + j, token].item()
                count += 1
    return total / count


def test_short_sft_lowers_the_answer_loss(tiny_model_dir, tmp_path):
    logs = []
    tuned = tiny_model.make_tiny_model(str(tmp_path / "sft"), seed=0, sft_steps=30, log=logs.append)
    assert any("held-out exact match" in line for line in logs)
    rows = arith.make_prompts(64, seed=99)
    before, after = _answer_nll(tiny_model_dir, rows), _answer_nll(tuned, rows)
    # Random init sits near ln(vocab) ~ 5.6 nats; 30 steps already learn the answer format (digits, then <|im_end|>).
    assert after < before - 2.0, (before, after)


_VLLM_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from vllm import LLM, SamplingParams

    if __name__ == "__main__":
        model_dir, prompts = sys.argv[1], json.loads(sys.argv[2])
        llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=256, seed=0)
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, logprobs=0))
        print("RESULT" + json.dumps([[list(o.outputs[0].token_ids), o.outputs[0].finish_reason] for o in outs]))
    """
)


@pytest.mark.slow
def test_vllm_greedy_matches_hf_greedy_and_stops_at_im_end(tmp_path, sft_model_dir):
    model_dir = sft_model_dir  # the SFT'd model: it answers and stops, so both must stop at <|im_end|>
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [_templated(tokenizer, row["prompt"]) for row in arith.make_prompts(8, seed=123)]
    hf = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        hf.append(model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :].tolist())

    # vLLM in its own process: it spawns engine processes and reads its settings from the environment at import.
    script = tmp_path / "run_vllm.py"
    script.write_text(_VLLM_SCRIPT)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CACHE_ROOT=str(tmp_path / "vllm-cache"))
    done = subprocess.run(
        [sys.executable, str(script), model_dir, json.dumps(prompts)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))[len("RESULT") :])
    for (vllm_ids, finish_reason), hf_ids in zip(result, hf):
        assert vllm_ids == hf_ids
        assert finish_reason == "stop" and vllm_ids[-1] == tokenizer.eos_token_id


def test_tool_model_sft_shows_the_episodes_the_rollouts_build(tmp_path):
    """The tool model's SFT examples are token for token the episodes the episode loop builds (workers/episodes.py,
    with the real ToolEnv) when the policy samples the canonical call and answer."""
    from ppoflow.envs.tools import ToolEnv
    from ppoflow.tasks import calc
    from workers.episodes import Episode, run_episodes

    logs = []
    out = tiny_model.make_tiny_model(str(tmp_path / "calc"), seed=0, sft_steps=2, tools=True, log=logs.append)
    assert any("tool sft step    2" in line and "call" in line for line in logs), logs
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer.encode("<calc>", add_special_tokens=False)) <= 2  # merged: the task's text trained it
    row = calc.make_prompts(1, seed=5)[0]
    prompt, response, mask = tiny_model.encode_tool_episode(tokenizer, row)

    texts = [calc.tool_call(row), row["answer"]]

    def engine(requests):  # the policy's turns: the canonical texts, each closed by <|im_end|>
        text = texts.pop(0)
        ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
        return [[{"response_ids": ids, "logprobs": [0.0] * len(ids), "text": text, "finish_reason": "stop"}]]

    sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 24, "stop": None}
    episode = Episode(ToolEnv(tools=["calc"]), 0, 0, 1, sampling, prompt)
    run_episodes([episode], engine, tokenizer, max_turns=3, max_total_tokens=96, max_model_len=256, chat=True)
    assert (episode.ids, episode.mask) == (response, mask)
    assert episode.final_text == row["answer"] and episode.finish_reason == "stop"
