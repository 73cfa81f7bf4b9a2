"""Update throughput at real shapes: the policy's (and the critic's) PPO update, through the trainer classes a run
uses (workers/trainer.py, DeepSpeed), on one device, packed or padded, with micro-batches cut by a token budget or
by a sample count, eager or with `compile` (torch.compile of the decoder layers and the LM head's softmax; --compile).
Reports train tokens/s, model FLOPs utilisation, peak memory and the warm-up step's seconds (compilation included);
with --profile, the top CUDA kernels of one optimizer step.

Models: random-init Qwen2 with the published Qwen2.5 shapes (0.5B: hidden 896 × 24 layers, 14 heads / 2 KV, MLP 4864;
1.5B: 1536 × 28, 12 / 2, 8960), the 151,936-token vocabulary included (ppoflow.tiny_model pads its tokenizer to it),
tied embeddings, built here; nothing is downloaded. Experience: random token ids (prompts of --prompt tokens,
responses of --response tokens, lengths varied ±50% so that padding costs what it does in a real batch), random
advantages and logprobs: the update's arithmetic does not depend on the values.

MFU = 6 · N · tokens / seconds / peak, N the parameters (the tied embedding counted once, as the LM head it is),
tokens the prompt + response tokens of the update (every token goes through the model forward and backward); the
attention's own FLOPs are not counted (the usual 6N rule). peak: --peak-tflops (dense bf16 of an H100/H200: 989.4).

Run on the GPU host (bench/gpu_run.sh installs the stack):
    bash bench/gpu_run.sh bench/train_throughput.py --shape qwen2.5-0.5b,qwen2.5-1.5b --mode packed,padded
    compiled against eager, one row each:  ... --mode packed-budget --compile off,on
CPU smoke check (tiny shapes):  .venv/bin/python bench/train_throughput.py --shape tiny --samples 16 --response 32
Results: bench/RESULTS.md ("GPU: update throughput at real shapes"), bench/results/train_throughput.json (`summary`'s
keys and the rows).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VOCAB = 151_936
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, rope_theta=1_000_000.0, rms_norm_eps=1e-6),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, rope_theta=1_000_000.0, rms_norm_eps=1e-6),
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1,
                 num_key_value_heads=1),
}


def build_model(shape: str, workdir: Path, max_len: int) -> Path:
    """The shape's random-init model with Qwen2.5's vocabulary (bf16 on GPUs), built once per work folder."""
    import torch

    from ppoflow.tiny_model import make_tiny_model

    cuda = torch.cuda.is_available()
    out = workdir / f"{shape}-{'bf16' if cuda else 'fp32'}"
    if not (out / "config.json").is_file():
        make_tiny_model(str(out), sft_steps=0, shape={**SHAPES[shape], "max_position_embeddings": max(max_len, 1024)},
                        dtype="bfloat16" if cuda else "float32", vocab_size=VOCAB if shape != "tiny" else None,
                        device="cuda" if cuda else "cpu", log=lambda *_: None)
    return out


def experience(n: int, prompt: int, response: int, vocab: int, seed: int = 0):
    """n samples of random tokens, lengths uniform in ±50% of the given ones, with the update's columns."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    p_lens = rng.integers(max(1, prompt // 2), prompt * 3 // 2 + 1, n)
    r_lens = rng.integers(max(1, response // 2), response * 3 // 2 + 1, n)
    per_token = lambda scale, shift=0.0: pa.array(  # noqa: E731
        [(rng.normal(0, scale, a) + shift).astype(np.float32).tolist() for a in r_lens], pa.list_(pa.float32()))
    return pa.table({
        "prompt_ids": [rng.integers(3, vocab, a).tolist() for a in p_lens],
        "response_ids": [rng.integers(3, vocab, a).tolist() for a in r_lens],
        "old_logprobs": per_token(0.5, -3.0), "engine_logprobs": per_token(0.5, -3.0),
        "ref_logprobs": per_token(0.5, -3.0), "advantages": per_token(1.0), "values": per_token(1.0),
        "returns": per_token(1.0),
    })


def run_case(args, shape: str, mode: str, role: str, compiled: str, workdir: Path) -> dict:
    """One (shape, packing, role, compile on/off) update: a warm-up step (which compiles), then the timed update
    over the whole table."""
    import torch
    from safetensors import safe_open

    sys.path.insert(0, str(REPO))
    from algorithms.config import AlgoConfig
    from workers.config import TrainerConfig
    from workers.trainer import CriticWorker, PolicyWorker

    cuda = torch.cuda.is_available()
    model = build_model(shape, workdir, args.prompt * 2 + args.response * 2)
    params = 0
    for f in model.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            params += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    budget = args.tokens_per_micro_batch if mode.endswith("budget") else None
    trainer = TrainerConfig(lr=1e-6, zero_stage=args.zero, mini_batch_size=args.samples // args.steps,
                            micro_batch_size=args.micro, num_threads=2, packing=mode.startswith("packed"),
                            max_tokens_per_micro_batch=budget, gradient_checkpointing=args.checkpointing,
                            share_prompts=False, compile=compiled == "on")
    algo = AlgoConfig(estimator="gae" if role == "critic" else "group_norm", kl_in_reward=False, kl_coef=0.0)
    dtype = "bfloat16" if cuda else "float32"
    if role == "policy":
        worker = PolicyWorker(str(model), trainer, dtype, 0, algo=algo, norm_len=args.response)
    else:
        worker = CriticWorker(str(model), trainer, dtype, 0, algo=algo, pad_token_id=0)
    table = experience(args.samples, args.prompt, args.response, VOCAB if shape != "tiny" else 279)
    tokens = sum(len(p) + len(r) for p, r in zip(table["prompt_ids"].to_pylist(), table["response_ids"].to_pylist()))
    t0 = time.perf_counter()
    worker.train(table.slice(0, trainer.mini_batch_size), 1, 0, 0.0)  # warm-up: kernels, allocator, optimizer state
    warmup = time.perf_counter() - t0  # with --compile: the compilation, what a run pays at its first update
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    worker.train(table, 2, 1, 0.0)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    row = {"shape": shape, "mode": mode, "role": role, "params": params, "vocab": VOCAB if shape != "tiny" else 279,
           "samples": args.samples, "tokens": tokens, "seconds": round(seconds, 3),
           "tokens_per_s": round(tokens / seconds, 1),
           "mfu": round(6 * params * tokens / seconds / (args.peak_tflops * 1e12), 4) if cuda else None,
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
           "zero_stage": args.zero, "tokens_per_micro_batch": budget, "micro_batch": args.micro,
           "checkpointing": args.checkpointing, "compile": compiled == "on", "warmup_s": round(warmup, 1)}
    if args.profile and cuda:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            worker.train(table.slice(0, trainer.mini_batch_size), 3, 2, 0.0)
            torch.cuda.synchronize()
        events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:15]
        total = sum(e.device_time_total for e in prof.key_averages()) or 1
        row["top_kernels"] = [{"name": e.key[:90], "cuda_ms": round(e.device_time_total / 1e3, 2),
                               "share": round(e.device_time_total / total, 3), "calls": e.count} for e in events]
    worker.engine.destroy()
    return row


def summary(rows: list[dict]) -> dict:
    """Issue 23's keys from a sweep's rows: per shape the best policy row's MFU, tokens/s and peak memory
    (`mfu_0_5b`, `tokens_per_s_1_5b`, `peak_gib_1_5b`, ...), and the largest model's vocabulary (`vocab`)."""
    out: dict = {}
    measured = [r for r in rows if r.get("mfu") is not None and r["role"] == "policy"]
    for shape in sorted({r["shape"] for r in measured}):
        best = max((r for r in measured if r["shape"] == shape), key=lambda r: r["mfu"])
        tag = shape.removeprefix("qwen2.5-").replace(".", "_")
        out.update({f"mfu_{tag}": best["mfu"], f"tokens_per_s_{tag}": best["tokens_per_s"],
                    f"peak_gib_{tag}": best["peak_gib"], f"mode_{tag}": best["mode"],
                    f"compile_{tag}": best.get("compile", False)})
    if measured:
        out["vocab"] = max(measured, key=lambda r: r["params"])["vocab"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", default="qwen2.5-0.5b,qwen2.5-1.5b", help=f"comma list of {sorted(SHAPES)}")
    p.add_argument("--mode", default="packed-budget,padded",
                   help="comma list: packed-budget (packed, micro-batches by --tokens-per-micro-batch), packed "
                        "(packed, --micro samples a micro-batch), padded (--micro samples, right-padded)")
    p.add_argument("--role", default="policy", help="comma list: policy, critic")
    p.add_argument("--samples", type=int, default=512, help="experience rows of the timed update")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps the rows are split into")
    p.add_argument("--prompt", type=int, default=128, help="mean prompt tokens")
    p.add_argument("--response", type=int, default=256, help="mean response tokens")
    p.add_argument("--micro", type=int, default=8, help="samples per micro-batch (padded, packed)")
    p.add_argument("--tokens-per-micro-batch", type=int, default=16384, help="token budget (packed-budget)")
    p.add_argument("--zero", type=int, default=1, help="ZeRO stage")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    p.add_argument("--compile", nargs="?", const="on", default="off",
                   help="trainer.compile: off, on (the bare flag), or off,on for one row each")
    p.add_argument("--profile", action="store_true", help="top CUDA kernels of one step per case")
    p.add_argument("--peak-tflops", type=float, default=989.4)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ppoflow-train-bench"))
    p.add_argument("--json", default=os.environ.get("OUT") and os.path.join(os.environ["OUT"],
                                                                            "train_throughput.json"))
    p.add_argument("--one", nargs=4, metavar=("SHAPE", "MODE", "ROLE", "COMPILE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if bad := set(args.compile.split(",")) - {"off", "on"}:
        p.error(f"--compile: {', '.join(sorted(bad))}: expected off, on or off,on")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.one:  # a case in a process of its own: its memory, its DeepSpeed state
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29512"), RANK="0",
                          LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        print("ROW " + json.dumps(run_case(args, *args.one, workdir)), flush=True)
        return 0
    import subprocess

    rows = []
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    cases = [(shape, role, mode, compiled) for shape in args.shape.split(",") for role in args.role.split(",")
             for mode in args.mode.split(",") for compiled in args.compile.split(",")]
    for shape, role, mode, compiled in cases:
        out = subprocess.run([sys.executable, __file__, *passthrough, "--one", shape, mode, role, compiled],
                             capture_output=True, text=True, cwd=REPO)
        found = [line[4:] for line in out.stdout.splitlines() if line.startswith("ROW ")]
        if found:
            rows.append(json.loads(found[-1]))
        else:
            rows.append({"shape": shape, "mode": mode, "role": role, "compile": compiled == "on",
                         "failed": (out.stderr or out.stdout).strip()[-1500:]})
        r = rows[-1]
        print(f"{shape:>13} {role:>6} {mode:>13} {'compiled' if compiled == 'on' else 'eager':>8}: " + (
            f"{r['tokens_per_s']:>9.0f} tok/s  MFU {100 * (r['mfu'] or 0):5.1f}%  peak {r['peak_gib']} GiB  "
            f"({r['tokens']} tokens in {r['seconds']} s; warm-up {r['warmup_s']} s)" if "failed" not in r
            else "FAILED " + r["failed"][-400:]), flush=True)
        for k in r.get("top_kernels", []):
            print(f"      {k['share']:6.1%} {k['cuda_ms']:9.1f} ms {k['calls']:6d}x  {k['name']}")
        if args.json:  # after every case: a sweep stopped by its time limit keeps the rows it finished
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({**summary(rows), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
