"""LoRA against full fine-tuning of the policy, same run otherwise: iteration time, checkpoint bytes, weight-sync
seconds; and, with --vllm-lora, the two ways to get an adapter into vLLM (merged weights reloaded in place, which
ppoflow does, against vLLM's own LoRA: the adapter loaded by name, requests naming it).

Each variant is one `ppoflow train` process (its own local Ray and Prefect) of --iterations iterations, a checkpoint
(DeepSpeed state + HF export) every iteration and none deleted, evaluation off. Read back from the commit markers:
- iter_s: mean wall seconds of an iteration's stages (generate, score, advantages, update, sync) over iterations 2..N
  (the first warms up kernels and caches);
- update_s / checkpoint_s / sync_s: the update's training seconds, what the update waited for the checkpoint, the
  sync stage's seconds (perf/train_s, perf/checkpoint_s, perf/sync_s), same iterations;
- ckpt_bytes: the policy's part of the last checkpoint: its DeepSpeed state (`policy/`: weights and Adam states, or
  the adapter and its Adam states) plus its HF export (`hf/`: the model, or the adapter); `merged/` (the LoRA run's
  full weights, written with the final iteration only) is reported apart as merged_bytes.

CPU (the quickstart, 2 cores; a shared machine gives orders of magnitude only):
    .venv/bin/python bench/lora.py --iterations 6 --json bench/results/lora.json
    .venv/bin/python bench/lora.py --vllm-lora-only          # merged reload vs vLLM's LoRA, no training
GPU (one GPU, a random-init model of Qwen2.5-0.5B's shape and vocabulary, configs/gpu-0.5b.yaml's settings), from the
repo root with the carried wheels (bench/gpu_run.sh installs them and runs a named script):
    bash bench/gpu_run.sh bench/lora.py --gpu --iterations 3 --json $OUT/lora-gpu.json
Results: bench/RESULTS.md ("LoRA"), bench/results/lora.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QWEN05_SHAPE = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                    intermediate_size=4864, max_position_embeddings=1024)
"""Qwen2.5-0.5B's transformer blocks; with QWEN_VOCAB (the tiny tokenizer padded to it) the model has its real size."""
QWEN_VOCAB = 151_936


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="configs/gpu-0.5b.yaml on a random-init 0.5B-shape model")
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--rank", type=int, default=16, help="policy.lora.rank (alpha = 2 x rank)")
    p.add_argument("--lora-lr", type=float, default=None, help="policy.lr of the LoRA run (default: 10 x the full)")
    p.add_argument("--set", action="append", default=[], help="override for both runs (repeatable)")
    p.add_argument("--workdir", default=None, help="runs (and the GPU model) go here; default: a temporary folder")
    p.add_argument("--vllm-lora", action="store_true", help="also measure vLLM's LoRA against a merged reload")
    p.add_argument("--vllm-lora-only", action="store_true", help="only that measurement (CPU: the tiny model)")
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def train(config: str, run_id: str, sets: list[str], work: Path) -> float:
    cmd = [sys.executable, "-m", "ppoflow.cli", "train", "--config", config, "--run-id", run_id]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PREFECT_HOME": str(work / f"{run_id}.prefect")}
    started = time.perf_counter()
    with open(work / f"{run_id}.log", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if rc != 0:  # the log's tail here: on the GPU host only what the command prints comes back
        tail = (work / f"{run_id}.log").read_text(errors="replace").splitlines()[-40:]
        raise SystemExit("\n".join(tail) + f"\n{run_id}: exit {rc}; see {work / f'{run_id}.log'}")
    return time.perf_counter() - started


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def measure(run: Path, iterations: int) -> dict:
    """The variant's numbers, from the run's commit markers and checkpoint folders."""
    import numpy as np

    from stages.common import iteration_summary
    from storage.run import STAGES, RunStore

    store = RunStore(str(run))
    rows = [iteration_summary(store, n) for n in range(2 if iterations > 1 else 1, iterations + 1)]
    last = run / "checkpoints" / f"iter-{iterations:06d}"
    mean = lambda key: float(np.mean([r[key] for r in rows]))  # noqa: E731
    return {"iter_s": float(np.mean([sum(r[f"time/{s}_s"] for s in STAGES) for r in rows])),
            "update_s": mean("perf/train_s"), "checkpoint_s": mean("perf/checkpoint_s"), "sync_s": mean("perf/sync_s"),
            "sync_bytes": int(mean("perf/sync_bytes")),
            "ckpt_bytes": folder_bytes(last / "policy") + folder_bytes(last / "hf"),
            "ckpt_state_bytes": folder_bytes(last / "policy"), "hf_bytes": folder_bytes(last / "hf"),
            "merged_bytes": folder_bytes(last / "merged"),
            "reward_last": rows[-1].get("rollout/reward_mean"),
            "logprob_diff_mean_max": max(r["rollout/logprob_diff_mean"] for r in rows)}


def vllm_lora_vs_merged(base: str, adapter: str, merged: str, rank: int, prompts: int = 64,
                        new_tokens: int = 16) -> dict:
    """Seconds to bring a new policy into vLLM and to sample from it, both ways, on one engine each:
    - merged: `collective_rpc` reload of the merged weights in place (workers/vllm_ext.py, what the sync does);
    - lora: vLLM's LoRA (`enable_lora`), the adapter loaded on its first request that names it (a LoRARequest with
      a new id per version), every request then running base + B A on the fly.
    Also whether both sample the same greedy tokens (they compute the same function up to rounding). Generation
    seconds are the fastest of three calls; `lora_load_s` is the first call naming a new adapter minus that."""
    from safetensors.torch import load_file, save
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    on_gpu = _on_gpu()
    common = dict(model=base, seed=0, dtype="bfloat16" if on_gpu else "float32", max_model_len=256,
                  enforce_eager=True, enable_chunked_prefill=False)
    if not on_gpu:
        common["kv_cache_memory_bytes"] = 1 << 30
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens)
    requests = [{"prompt_token_ids": [5 + (i * 7 + j) % 50 for j in range(12)]} for i in range(prompts)]
    out: dict = {}

    t0 = time.perf_counter()
    llm = LLM(**common, worker_extension_cls="workers.vllm_ext.WeightSyncExtension")
    out["merged_engine_start_s"] = time.perf_counter() - t0
    weights = save({k: v.contiguous() for k, v in load_file(f"{merged}/model.safetensors").items()})
    t0 = time.perf_counter()
    llm.collective_rpc("ppoflow_load_weights", args=(weights,))
    llm.reset_prefix_cache()
    out["merged_load_s"] = time.perf_counter() - t0
    out["merged_generate_s"], outputs = _fastest(lambda: llm.generate(requests, params, use_tqdm=False))
    merged_tokens = [o.outputs[0].token_ids for o in outputs]
    del llm
    _free()

    t0 = time.perf_counter()
    try:
        llm = LLM(**common, enable_lora=True, max_lora_rank=max(8, rank), max_loras=1)
    except Exception as err:  # noqa: BLE001 - the platform may not support LoRA at all: that is the result
        out["lora_error"] = f"{type(err).__name__}: {err}"[:500]
        return out
    out["lora_engine_start_s"] = time.perf_counter() - t0
    for version in (1, 2):  # a new adapter id per policy version: vLLM caches adapters by id
        request = LoRARequest(f"policy-v{version}", version, adapter)
        t0 = time.perf_counter()
        lora_tokens = [o.outputs[0].token_ids
                       for o in llm.generate(requests, params, lora_request=request, use_tqdm=False)]
        out[f"lora_first_generate_v{version}_s"] = time.perf_counter() - t0
    out["lora_generate_s"], _ = _fastest(lambda: llm.generate(requests, params, lora_request=request,
                                                                use_tqdm=False))
    out["lora_load_s"] = out["lora_first_generate_v2_s"] - out["lora_generate_s"]
    out["same_greedy_tokens"] = sum(a == b for a, b in zip(merged_tokens, lora_tokens)) / len(requests)
    return out


def _fastest(call, repeats: int = 3) -> tuple[float, object]:
    """The fastest of `repeats` calls (seconds) and the last result: the least disturbed by other work."""
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = call()
        best = min(best, time.perf_counter() - t0)
    return best, result


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _free() -> None:
    import gc

    gc.collect()
    if _on_gpu():
        import torch

        torch.cuda.empty_cache()


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ppoflow-lora-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"machine": f"{platform.node()} ({'GPU' if args.gpu else 'CPU'}, {os.cpu_count()} cores)",
                    "date": time.strftime("%Y-%m-%d"), "iterations": args.iterations, "rank": args.rank}
    if args.gpu:
        from ppoflow.tasks.arith import write_prompts
        from ppoflow.tiny_model import make_tiny_model

        model = work / "model-0.5b"
        if not (model / "config.json").exists():
            make_tiny_model(str(model), sft_steps=0, shape=QWEN05_SHAPE, dtype="bfloat16", vocab_size=QWEN_VOCAB,
                            device="cuda")
        prompts = write_prompts(str(work / "arith"))
        config = str(REPO / "configs" / "gpu-0.5b.yaml")
        # configs/gpu-0.5b.yaml cut to fit one 10-minute command for both variants: 32 prompts x 4 samples of up to
        # 128 tokens, two optimizer steps per iteration
        sets = [f"model.path={model}", f"data.prompts={prompts['train']}", "generation.max_new_tokens=128",
                "data.max_prompt_tokens=128", "generation.max_model_len=256", "data.prompts_per_iteration=32",
                "generation.n_samples_per_prompt=4", "policy.mini_batch_size=64",
                # the GPU host's carried stack has no TensorBoard; Ray may use the host's cores
                "tracking.logger=none", f"ray.num_cpus={os.cpu_count() or 2}"]
        full_lr = 1e-6
    else:
        config = str(REPO / "configs" / "quickstart.yaml")
        sets, full_lr = [], 2e-4
    sets += [f"iterations={args.iterations}", "eval.prompts=null", "checkpoint.every=1",
             "storage.keep_checkpoints=null", "checkpoint.background=false", f"storage.root={work}", *args.set]
    lora = [f"policy.lora.rank={args.rank}", f"policy.lora.alpha={2 * args.rank}",
            f"policy.lr={args.lora_lr or 10 * full_lr}", "policy.lora.merged_export=final"]
    if not args.vllm_lora_only:
        for name, extra in (("full", []), ("lora", lora)):
            wall = train(config, name, sets + extra, work)
            m = measure(work / name, args.iterations)
            m["wall_s"] = wall
            result.update({f"{k}_{name}": v for k, v in m.items()})
            print(f"{name}: {json.dumps(m)}", flush=True)
    if args.vllm_lora or args.vllm_lora_only:
        run = work / "lora"
        if not run.exists():  # a short LoRA run gives the adapter and its merged export
            train(config, "lora", sets + lora + ["iterations=1"], work)
        last = sorted((run / "checkpoints").glob("iter-*"))[-1]
        base = json.loads((last / "hf" / "adapter_config.json").read_text())["base_model_name_or_path"]
        result["vllm"] = vllm_lora_vs_merged(base, str(last / "hf"), str(last / "merged"), args.rank)
        print(f"vllm: {json.dumps(result['vllm'])}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)
    sys.exit(main())
