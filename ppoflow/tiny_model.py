"""Build the quickstart's tiny chat model from nothing: a byte-level BPE tokenizer, a 1.1M-parameter Qwen2, a short SFT.

No model or dataset can be downloaded on the CPU hosts, so the quickstart's policy is made here, on the doubling task of
`ppoflow.tasks.arith`, and saved the way a Hugging Face checkpoint is (safetensors, config, generation_config, tokenizer
with a chat template). Everything downstream (DeepSpeed, vLLM, the reward) then loads it by path exactly as it would a
user's model, so the quickstart exercises the real path.

- Tokenizer: byte-level BPE with Qwen2's pre-tokenizer regex (digits stay single tokens, which arithmetic needs), the
  256 byte symbols as base alphabet (so no text ever maps to unk) and the few merges the task text yields ("What",
  " is", "user", "assistant"). Specials `<|endoftext|>` (pad, bos), `<|im_start|>`, `<|im_end|>` (eos); a Qwen-style
  chat template without Qwen's default system prompt, which would triple the prompt.
- Model: Qwen2, hidden 128, 4 layers, 2 heads of 64 (vLLM's CPU attention takes head sizes 32, 64, 80, ... 512),
  tied embeddings, float32.
- SFT: loss on the answer tokens and `<|im_end|>` only, AdamW at a constant rate after a short warmup. Every
  SFT_EVAL_EVERY steps greedy exact match is measured on a validation split; SFT stops once it reaches
  SFT_TARGET_ACCURACY, so the policy is right on part of the questions and RL has room to improve; `sft_steps` caps
  the run. The final number is logged on a third, held-out split. Questions come from a seed apart from the prompt
  files' default, and the three splits never share a question. Seen for seeds 0-7 (one thread each): stops after
  60-160 steps, 17-37 s, held-out exact match 22-50%. `sft_steps=0` keeps the random init (fast tests).
- The tool-use model (`tools=True`, the multi-turn benchmark's): the same shape, its tokenizer trained on the
  multiplication task of `ppoflow.tasks.calc` (merges for "<calc", "tool", ...), SFT on `calc` tool episodes (the
  call copies the question, the answer copies the tool's output; the tool's tokens are not learned) with direct
  answers beside them, so that the SFT'd model calls the tool on about TOOL_FRACTION of its samples (`sft_tools`).

Run alone:
  python -m ppoflow.tiny_model models/tiny            # ~30 s on 2 cores; logs loss and exact match
  python -m ppoflow.tiny_model /tmp/t --sft-steps 0   # random init, ~5 s
  python -m ppoflow.tiny_model models/tiny-calc --tools   # the tool-use model (4-digit multiplication, calc tool)
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import torch

from ppoflow.tasks import arith, calc

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# Qwen2's pre-tokenizer split: contractions, words, single digits, punctuation runs, newlines, spaces.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2's ChatML template without its default system message.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

MODEL_SHAPE = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=2,  # head_dim = 128 / 2 = 64
    num_key_value_heads=2,
    max_position_embeddings=256,
)

SFT_STEPS = 200
"""Cap on SFT steps (~55 s at ~0.27 s a step on one thread); the target accuracy stopped it at 60-160 in 8 seeds."""
SFT_BATCH = 64
SFT_LR = 3e-3
SFT_WARMUP = 20
SFT_EVAL_EVERY = 10
SFT_TARGET_ACCURACY = 0.3
"""Stop SFT once validation exact match reaches this; it climbs 5-35 points per SFT_EVAL_EVERY steps there."""
HELDOUT_N = 100

TOOL_FRACTION = 0.3
"""Share of its samples on which the SFT'd tool model calls the tool (the rest answer directly)."""
TOOL_SFT_STEPS = 200
"""SFT steps of the tool model (a fixed number: it stops at no target)."""
TOOL_SFT_BATCH = 32
"""Tool episodes per SFT step of the tool model (direct answers come on top, see `sft_tools`)."""
TOOL_SFT_LR = 1e-3
"""The tool model's SFT rate: the copies were learned at 1e-3 in ~100 steps and not at all in 600 at SFT_LR (3e-3),
which learned the call's copy but never the answer's (bench/RESULTS.md, multi-turn section)."""
_SFT_SEED_OFFSET = 1_000  # keeps SFT's questions on a different seed from write_prompts' default 0


def make_tiny_model(
    out_dir: str,
    *,
    seed: int = 0,
    sft_steps: int | None = None,
    log: Callable[[str], None] = print,
    shape: dict | None = None,
    dtype: str = "float32",
    vocab_size: int | None = None,
    device: str = "cpu",
    tools: bool = False,
    tool_fraction: float = TOOL_FRACTION,
) -> str:
    """Train a tokenizer, build a tiny Qwen2, run up to `sft_steps` of SFT and save it all to `out_dir`.

    `shape` overrides entries of MODEL_SHAPE (bench/gpu_ppo.py builds Qwen2.5-0.5B and -1.5B shapes this way);
    `vocab_size` pads the tokenizer to that many entries (`train_tokenizer`), e.g. Qwen2.5's 151,936, so the LM head
    costs what a real one does; `dtype` ("float32" or "bfloat16") is the dtype the weights are saved in. The model is
    built (on `device`: "cuda" initialises a billion-parameter shape in seconds) and trained in float32 either way
    and cast just before saving.

    `tools`: the tool-use model instead of the quickstart's: tokenizer and SFT on the 4-digit multiplication task of
    `ppoflow.tasks.calc`, `calc` tool episodes and direct answers, so that the model calls the tool on about
    `tool_fraction` of its samples (`sft_tools`).

    `sft_steps`: None for SFT_STEPS (a cap), or TOOL_SFT_STEPS with `tools`."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    shape = {**MODEL_SHAPE, **(shape or {})}

    # Threads and the RNG are process-wide: set them for the build and restore them after. One core is left to the
    # rest of the stack: an OpenMP thread that loses its core stalls the others at every barrier, and on a loaded
    # 2-core host 2 threads ran 4-7x slower per step than 1. A 1M-parameter model gains nothing past a few threads.
    threads = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # not on macOS
    torch.set_num_threads(max(1, min(cores - 1, 8)))
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            tokenizer = train_tokenizer(seed, model_max_length=shape["max_position_embeddings"], vocab_size=vocab_size,
                                        tools=tools)
            pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
            config = Qwen2Config(
                vocab_size=len(tokenizer),
                **shape,
                tie_word_embeddings=True,
                bos_token_id=pad_id,  # as in Qwen2: <|endoftext|> is both; the template adds no bos
                eos_token_id=eos_id,
                pad_token_id=pad_id,
                dtype="float32",
            )
            with torch.device(device):
                model = Qwen2ForCausalLM(config)
            model.generation_config = GenerationConfig(bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id)
            n_params = sum(p.numel() for p in model.parameters())
            log(f"tiny_model: Qwen2 with {n_params:,} parameters, vocab {len(tokenizer)}")
            if tools:
                sft_tools(model, tokenizer, seed=seed, log=log, tool_fraction=tool_fraction,
                          steps=TOOL_SFT_STEPS if sft_steps is None else sft_steps)
            elif sft_steps is None or sft_steps > 0:
                sft(model, tokenizer, seed=seed, steps=SFT_STEPS if sft_steps is None else sft_steps, log=log)
    finally:
        torch.set_num_threads(threads)

    model = model.to("cpu")
    if dtype != "float32":
        model = model.to({"bfloat16": torch.bfloat16}[dtype])
        model.config.dtype = dtype  # what from_pretrained reports; the safetensors carry the dtype themselves
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    log(f"tiny_model: saved to {out_dir}")
    return out_dir


def make_tiny_reward_model(out_dir: str, *, seed: int = 0, log: Callable[[str], None] = print) -> str:
    """Save a tiny reward model to `out_dir`: a random-init `Qwen2ForSequenceClassification` (MODEL_SHAPE, one label,
    pad_token_id set) with the tiny tokenizer, in HF format, so tests load it as a user's reward model is loaded
    (`AutoModelForSequenceClassification.from_pretrained`). Its scores mean nothing but differ between texts."""
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tokenizer = train_tokenizer(seed)
        config = Qwen2Config(vocab_size=len(tokenizer), **MODEL_SHAPE, num_labels=1, dtype="float32",
                             bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        model = Qwen2ForSequenceClassification(config)
        # HF initialises the score head with std 0.02, which makes every reward ~0; a unit-scale head spreads them.
        torch.nn.init.normal_(model.score.weight, std=1.0 / MODEL_SHAPE["hidden_size"] ** 0.5)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    log(f"tiny_model: reward model saved to {out_dir}")
    return out_dir


def train_tokenizer(seed: int, model_max_length: int = MODEL_SHAPE["max_position_embeddings"],
                    vocab_size: int | None = None, tools: bool = False):
    """Byte-level BPE trained on the task's text; returns a `PreTrainedTokenizerFast` with the chat template.

    `model_max_length` is recorded in the tokenizer config: the model's context length. `vocab_size` (larger than the
    few hundred entries the task's text yields) pads the BPE vocabulary with filler tokens `<|t{id}|>` up to that
    size: no text encodes to them, and a model that samples one (a random-init model samples them all) decodes it
    as that string. In the BPE model itself, not as added tokens: a tokenizer with 150k added tokens loads ~15x
    slower. `tools`: trained on the multiplication task's text, tool calls and `tool` turns instead
    (`ppoflow.tasks.calc`)."""
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # NFC as in Qwen2: AutoTokenizer rebuilds a qwen2 checkpoint's tokenizer as Qwen2Tokenizer, which adds NFC anyway.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # vocab_size is a ceiling: merges stop when the corpus has no pair left (~20 merges), and digits never merge
    # because the split isolates each one.
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=[PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = ["user", "assistant", "system"]
    for row in arith.make_prompts(1_000, seed) if not tools else calc.make_prompts(1_000, seed):
        texts += [row["prompt"], row["answer"]] + ([calc.tool_call(row), "tool"] if tools else [])
    tok.train_from_iterator(texts, trainer)
    if vocab_size is not None and vocab_size > tok.get_vocab_size():
        data = json.loads(tok.to_str())
        vocab = data["model"]["vocab"]
        vocab.update({f"<|t{i}|>": i for i in range(tok.get_vocab_size(), vocab_size)})
        tok = Tokenizer.from_str(json.dumps(data))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
    )


def encode_example(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """Templated prompt ids and response ids (the answer then `<|im_end|>`) for one task row."""
    # Render, then encode the string, as vLLM does with a prompt string, so SFT sees the very ids rollouts will.
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": row["prompt"]}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    response_ids = tokenizer.encode(row["answer"], add_special_tokens=False) + [tokenizer.eos_token_id]
    return prompt_ids, response_ids


def sft(model, tokenizer, *, seed: int, steps: int, log: Callable[[str], None]) -> list[float]:
    """SFT until validation exact match reaches SFT_TARGET_ACCURACY or `steps` steps; returns the per-step losses."""
    # One permutation of every question split three ways: held-out questions are never trained on nor used to stop.
    questions = arith.make_prompts(arith.N_QUESTIONS, seed + _SFT_SEED_OFFSET)
    heldout, valid, train = questions[:HELDOUT_N], questions[HELDOUT_N : 2 * HELDOUT_N], questions[2 * HELDOUT_N :]
    examples = [encode_example(tokenizer, row) for row in train]

    optimizer = torch.optim.AdamW(model.parameters(), lr=SFT_LR, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / SFT_WARMUP))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        model.train()
        idx = torch.randint(len(examples), (SFT_BATCH,), generator=generator).tolist()
        input_ids, labels, attention_mask = _collate([examples[i] for i in idx], tokenizer.pad_token_id)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        warmup.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % SFT_EVAL_EVERY == 0 or step == steps:
            valid_accuracy = exact_match(model, tokenizer, valid)
            log(
                f"tiny_model: sft step {step:4d} loss {losses[-1]:.4f} valid exact match {valid_accuracy:.0%} "
                f"({time.perf_counter() - start:.1f}s)"
            )
            if valid_accuracy >= SFT_TARGET_ACCURACY:
                break
    heldout_accuracy = exact_match(model, tokenizer, heldout)
    log(
        f"tiny_model: sft done in {time.perf_counter() - start:.1f}s after {len(losses)} steps, final loss "
        f"{losses[-1]:.4f}, held-out exact match {heldout_accuracy:.1%} on {len(heldout)} questions"
    )
    return losses


def encode_tool_episode(tokenizer, row: dict) -> tuple[list[int], list[int], list[int]]:
    """Prompt ids, response ids and response mask of the `calc` tool episode of a multiplication row, token for
    token what the episode loop (workers/episodes.py) builds when the policy samples this canonical text: the call
    and `<|im_end|>` (mask 1), the tool's message as the chat template renders it (mask 0), the answer and
    `<|im_end|>` (mask 1)."""
    from workers.episodes import observation_text

    prompt_ids, answer_ids = encode_example(tokenizer, row)
    call_ids = tokenizer.encode(calc.tool_call(row), add_special_tokens=False) + [tokenizer.eos_token_id]
    tool_ids = tokenizer.encode(observation_text(tokenizer, [{"role": "tool", "content": row["answer"]}], True),
                                add_special_tokens=False)
    return prompt_ids, call_ids + tool_ids + answer_ids, [1] * len(call_ids) + [0] * len(tool_ids) + [1] * len(
        answer_ids)


def sft_tools(model, tokenizer, *, seed: int, steps: int, tool_fraction: float, log: Callable[[str], None]) -> None:
    """SFT of the tool model, `steps` steps over multiplication questions. Each step holds TOOL_SFT_BATCH tool episodes,
    learned on the policy's tokens (the call and the answer, not the tool's output), and direct answers learned on
    their first token only, as many as make a `tool_fraction` of the first tokens a call: the policy learns the two
    copies from every episode and to call the tool on about `tool_fraction` of its samples. A direct answer's other
    digits are not learned: no model this size multiplies, and fitting the noise would slow the copies down. Logs how
    often the greedy policy copies the question into the call and the tool's output into the answer."""
    questions = calc.make_prompts(20_000, seed + _SFT_SEED_OFFSET)
    heldout, train = questions[:HELDOUT_N], questions[HELDOUT_N:]
    direct = round(TOOL_SFT_BATCH * (1 - tool_fraction) / tool_fraction)
    rng = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=TOOL_SFT_LR, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / SFT_WARMUP))
    start = time.perf_counter()
    for step in range(1, steps + 1):
        model.train()
        batch = []  # (prompt ids, response ids, labels over the response)
        for n, i in enumerate(torch.randint(len(train), (TOOL_SFT_BATCH + direct,), generator=rng).tolist()):
            if n < TOOL_SFT_BATCH:
                prompt, response, mask = encode_tool_episode(tokenizer, train[i])
                batch.append((prompt, response, [t if m else -100 for t, m in zip(response, mask)]))
            else:
                prompt, response = encode_example(tokenizer, train[i])
                batch.append((prompt, response, response[:1] + [-100] * (len(response) - 1)))
        input_ids, labels, attention_mask = _collate([(p, r) for p, r, _ in batch], tokenizer.pad_token_id)
        for row, (prompt, _, learned) in enumerate(batch):
            labels[row, len(prompt): len(prompt) + len(learned)] = torch.tensor(learned)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        warmup.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps:
            call, answer = tool_copy_accuracy(model, tokenizer, heldout)
            log(f"tiny_model: tool sft step {step:4d} loss {loss.item():.4f} held-out greedy copies: call {call:.0%}, "
                f"answer {answer:.0%} ({time.perf_counter() - start:.1f}s)")


@torch.no_grad()
def tool_copy_accuracy(model, tokenizer, rows: list[dict]) -> tuple[float, float]:
    """Greedy, on `rows`: the fraction whose call, once `<calc>` is given, copies the question exactly, and the
    fraction whose answer, after the whole canonical call and tool output, copies the tool's output exactly."""
    model.eval()
    calls, answers = [], []
    for row in rows:
        prompt, response, mask = encode_tool_episode(tokenizer, row)
        opening = tokenizer.encode("<calc>", add_special_tokens=False)
        calls.append((prompt + opening, tokenizer.encode(calc.tool_call(row), add_special_tokens=False)[len(opening):]))
        answer_at = len(response) - mask[::-1].index(0)  # after the last tool token
        answers.append((prompt + response[:answer_at], response[answer_at:-1]))
    out = []
    for pairs in (calls, answers):
        width = max(len(p) for p, _ in pairs)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p, _ in pairs])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in pairs])
        new = max(len(t) for _, t in pairs)
        generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new,
                                   do_sample=False)[:, width:].tolist()
        out.append(sum(g[: len(t)] == t for g, (_, t) in zip(generated, pairs)) / len(pairs))
    return out[0], out[1]


def _collate(batch: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-pad prompt+response; labels are -100 on prompt and padding so only the response is learned."""
    width = max(len(p) + len(r) for p, r in batch)
    input_ids = torch.full((len(batch), width), pad_id)
    labels = torch.full((len(batch), width), -100)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (prompt, response) in enumerate(batch):
        n = len(prompt) + len(response)
        input_ids[i, :n] = torch.tensor(prompt + response)
        labels[i, len(prompt) : n] = torch.tensor(response)
        attention_mask[i, :n] = 1
    return input_ids, labels, attention_mask


@torch.no_grad()
def exact_match(model, tokenizer, rows: list[dict], max_new_tokens: int = 8) -> float:
    """Fraction of rows whose greedy response (special tokens stripped) is exactly the answer."""
    model.eval()
    prompts = [encode_example(tokenizer, row)[0] for row in rows]
    width = max(map(len, prompts))
    # Left padding so that every prompt ends where generation starts.
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False
    )
    responses = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    rewards = arith.reward([row["prompt"] for row in rows], responses, rows)
    return sum(r == arith.CORRECT_REWARD for r in rewards) / len(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Build the quickstart's tiny Qwen2 chat model.")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-steps", type=int, default=None, help="cap; SFT stops at the target accuracy")
    parser.add_argument("--tools", action="store_true", help="the tool-use model (ppoflow/tasks/calc.py)")
    args = parser.parse_args()
    make_tiny_model(args.out_dir, seed=args.seed, sft_steps=args.sft_steps, tools=args.tools)
