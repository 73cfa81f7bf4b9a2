"""GPU benchmark: the whole PPO flow on one GPU with hybrid placement, on a random-init model of a real shape.

What it runs: `flows.ppo.ppo_train` in-process, with configs/quickstart.yaml (PPO with GAE and a critic, on the
doubling task of ppoflow/tasks/arith.py; `--set algo.estimator=group_norm` for GRPO) plus overrides: the engine
(`--backend vllm`, the default, or `hf`), bf16, and the engine, the DeepSpeed policy and critic and the reference
model as Ray actors that each hold a fraction of one GPU (`--gpu-fraction` each; the reference takes the policy's
share) in one placement group (placement hybrid): the engine sleeps while the trainers work (`--sleep`) and gets the
new weights from the policy rank's GPU memory through CUDA IPC. The model is built here, nothing is downloaded:
`--shape qwen2.5-0.5b` (hidden 896 × 24 layers, 14 heads / 2 KV, MLP 4864) or `qwen2.5-1.5b` (1536 × 28, 12 / 2,
8960), with Qwen2.5's 151,936-token vocabulary (ppoflow's tokenizer padded to it) and tied embeddings; or `custom`.
Random weights sample nearly uniform tokens, so most responses run to --max-new-tokens: the rewards mean nothing,
the throughput numbers do.

What it measures (read back from the run's commit markers, as `ppoflow runs show` does), per iteration: each stage's
seconds, generation tokens/s (`perf/gen_tokens_per_s`), update tokens/s and the trainers' MFU (6 × parameters × tokens
per second of training, policy and critic), checkpoint seconds the update waited for and bytes, sync seconds and
route, mean reward, the engine-vs-trainer logprob gap (`rollout/logprob_diff_mean`; from iteration 2 on it checks the
weight sync; bf16 puts it near 1.0, not at it), tokens/s/GPU end to end (verl's definition: prompt + response tokens
of the iteration / (its seconds × GPUs)). Then: peak GPU memory (nvidia-smi every 0.5 s: every process on the GPU;
overall and per stage), worker startup seconds, parameters, the device. After the run, in processes of their own:
`--standalone` the same vLLM alone on the last rollout's prompts and sampling parameters (the ceiling the engine is
compared with: `gen_ratio`), and `--hf-generate` the HF engine against plain `model.generate` on the same batch. The
table is also written as JSON to $OUT/`--json-name` when OUT is set.

Disk: checkpoints follow `checkpoint.every` (--set checkpoint.every=K) and only the newest complete one is kept
(storage.keep_checkpoints=1) unless --keep-checkpoints; the work folder (a temporary one unless --workdir) is
deleted at the end unless --keep-workdir.

Run (GPU host, repo root, .carry/ from gpu/pack.sh beside it):  bash bench/gpu_run.sh [--iterations 3 --prompts 64 ...]
CPU smoke check (tiny shapes, every actor on the CPU):
    .venv/bin/python bench/gpu_ppo.py --shape custom --backend hf --hidden 64 --layers 2 --iterations 1 --prompts 8 \
        --max-new-tokens 8 --no-standalone
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
STAGES = ("generate", "score", "advantages", "update", "sync")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", default="qwen2.5-0.5b", choices=["qwen2.5-0.5b", "qwen2.5-1.5b", "custom"],
                   help="model: a published Qwen2.5 shape with its 151,936-token vocabulary (random init), or custom "
                        "(--hidden, --layers, ... with ppoflow's tiny tokenizer unless --vocab)")
    p.add_argument("--vocab", type=int, default=None, help="custom shape: pad the tokenizer to this vocabulary")
    p.add_argument("--backend", choices=["vllm", "hf"], default="vllm", help="generation.backend")
    p.add_argument("--sleep", action=argparse.BooleanOptionalAction, default=True,
                   help="generation.enable_sleep_mode (the engine frees the GPU while the trainers work)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3,
                   help="vLLM: the engine's share of the GPU's memory (weights + KV cache)")
    p.add_argument("--standalone", action=argparse.BooleanOptionalAction, default=True,
                   help="vLLM: after the run, the same vLLM alone on the last rollout's prompts and sampling "
                        "parameters, in a process of its own (the ceiling the engine is compared with)")
    p.add_argument("--hf-generate", action="store_true",
                   help="after the run: the HF engine and plain `model.generate` on the same batch (tokens/s)")
    p.add_argument("--json-name", default="gpu_ppo.json", help="file name of the table under $OUT")
    p.add_argument("--iterations", type=int, default=3, help="PPO iterations")
    p.add_argument("--prompts", type=int, default=64, help="data.prompts_per_iteration")
    p.add_argument("--samples", type=int, default=4, help="generation.n_samples_per_prompt")
    p.add_argument("--max-new-tokens", type=int, default=128, help="generation.max_new_tokens")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size")
    p.add_argument("--layers", type=int, default=24, help="transformer layers")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default: hidden / 64)")
    p.add_argument("--kv-heads", type=int, default=4, help="KV heads (capped at --heads)")
    p.add_argument("--intermediate", type=int, default=None, help="MLP size (default: 5.5 x hidden, rounded)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="model.dtype")
    p.add_argument("--gpu-fraction", type=float, default=0.25,
                   help="num_gpus of the engine, the policy and the critic each; the reference shares the policy's")
    p.add_argument("--mini-batch", type=int, default=64, help="policy/critic mini_batch_size (capped at the batch)")
    p.add_argument("--micro-batch", type=int, default=16, help="policy/critic/reference micro_batch_size")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=0, help="policy/critic zero_stage")
    p.add_argument("--gpus", type=int, default=1,
                   help="GPUs: above 1, that many engines and policy/critic ranks (num_ranks), rank r and engine r "
                        "sharing GPU r (placement hybrid), the trainers' groups talking over NCCL")
    p.add_argument("--offload", choices=["none", "optimizer", "optimizer_and_params"], default="none",
                   help="policy/critic offload (ZeRO-Offload)")
    p.add_argument("--peak-tflops", type=float, default=989.4,
                   help="dense bf16 peak of one GPU, for MFU (H100/H200 SXM: 989.4)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override, applied last (repeatable), e.g. --set algo.estimator=group_norm")
    p.add_argument("--workdir", default=None, help="model, prompts and runs go here (default: a temporary folder)")
    p.add_argument("--keep-workdir", action="store_true", help="don't delete the work folder at the end")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep every checkpoint (default: storage.keep_checkpoints=1, the newest complete one only)")
    return p.parse_args(argv)


def model_shape(args: argparse.Namespace, max_model_len: int) -> dict:
    """Qwen2 shape entries for ppoflow.tiny_model.make_tiny_model: a published Qwen2.5 shape (bench/train_throughput.py
    SHAPES), or --hidden, --layers, ... (head size 64 as in Qwen2.5-0.5B)."""
    from train_throughput import SHAPES

    if args.shape != "custom":
        return {**SHAPES[args.shape], "max_position_embeddings": max(1024, max_model_len)}
    heads = args.heads or max(1, args.hidden // 64)
    kv_heads = min(args.kv_heads, heads)
    if args.hidden % heads or heads % kv_heads:
        raise SystemExit(f"--hidden {args.hidden} must be a multiple of --heads {heads}, itself a multiple of "
                         f"--kv-heads {kv_heads}")
    return dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads,
                intermediate_size=args.intermediate or max(128, round(args.hidden * 5.5 / 128) * 128),
                max_position_embeddings=max(1024, max_model_len))


def count_parameters(model_dir: Path) -> int:
    """Parameters stored in the safetensors files (a tied LM head is stored, and counted, once); header reads only."""
    from safetensors import safe_open

    total = 0
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def _nvidia_smi(*query: str) -> list[str] | None:
    """One line per GPU of `nvidia-smi --query-gpu=...`, or None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(query)}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    return [line.strip() for line in out.splitlines() if line.strip()]


class MemorySampler(threading.Thread):
    """Used memory of the benchmark's GPUs every `period` s, from nvidia-smi (the fullest GPU's): it counts every
    process on a GPU (the actors sharing it and any CUDA context of the driver), which is what hybrid placement has to
    fit."""

    def __init__(self, gpu_indices: list[int], period: float = 0.5):
        super().__init__(name="gpu-memory-sampler", daemon=True)
        self.gpu_indices, self.period = set(gpu_indices), period
        self.samples: list[tuple[float, int]] = []  # (unix time, MiB used)
        self._halt = threading.Event()  # not `_stop`: threading.Thread has one

    def read(self) -> int | None:
        """MiB used on the fullest of the benchmark's GPUs (each must fit its share)."""
        used = []
        for line in _nvidia_smi("index", "memory.used") or []:
            index, mib = (x.strip() for x in line.split(","))
            if int(index) in self.gpu_indices:
                used.append(int(mib))
        return max(used) if used else None

    def run(self) -> None:
        while not self._halt.is_set():
            used = self.read()
            if used is not None:
                self.samples.append((time.time(), used))
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def peak(self, start: float = -math.inf, end: float = math.inf) -> int | None:
        inside = [mib for t, mib in self.samples if start <= t <= end]
        return max(inside) if inside else None


def _timestamp(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def collect(run_uri: str, config, sampler: MemorySampler | None, flops_per_token: float = 0.0,
            peak_flops: float = 0.0, gpus: int = 1) -> tuple[list[dict], dict]:
    """Per-iteration rows and run-level numbers, from what the run committed."""
    from overhead import iteration_times

    from stages.common import iteration_summary
    from storage.run import RunStore

    store = RunStore(run_uri)
    rows, stage_peaks = [], {s: None for s in STAGES}
    for n in range(1, config.iterations + 1):
        summary = iteration_summary(store, n)
        row = {"iteration": n, **{f"{s}_s": summary.get(f"time/{s}_s") for s in STAGES}}
        row.update(gen_tokens_per_s=summary.get("perf/gen_tokens_per_s"),
                   response_len=summary.get("rollout/response_len"),
                   reward=summary.get("rollout/reward_mean"),
                   logprob_diff=summary.get("rollout/logprob_diff_mean"),
                   logprob_abs_diff_max=summary.get("rollout/logprob_abs_diff_max"),
                   checkpoint_s=summary.get("perf/checkpoint_s"),
                   # the weight transfer alone (export, object store, load); sync_s is the whole stage
                   weight_sync_s=summary.get("perf/sync_s"), sync_bytes=summary.get("perf/sync_bytes"))
        if store.stage_marker(n, "sync") is not None:
            row["sync_route"] = ",".join(sorted(set(store.read_stage(n, "sync")["method"].to_pylist())))
        if (span := iteration_times(store, n)) is not None:
            row["iteration_s"] = span["span"]
        # Orchestration overhead (Prefect, Parquet, bookkeeping): the iteration's span between commits minus its
        # stages' own seconds, as bench/overhead.py computes it on the CPU (None for the first iteration).
        if (times := iteration_times(store, n)) is not None:
            row["overhead_pct"] = 100.0 * (times["span"] - times["stages"]) / times["span"]
        update = store.stage_marker(n, "update")
        if store.stage_marker(n, "advantages") is not None and update is not None:
            experience = store.read_stage(n, "advantages").select(["prompt_ids", "response_ids"])
            tokens = sum(len(p) + len(r) for p, r in zip(experience["prompt_ids"].to_pylist(),
                                                         experience["response_ids"].to_pylist()))
            row["update_tokens"] = tokens * config.algo.ppo_epochs
            if times is not None:  # verl's tokens/s/GPU: the iteration's prompt + response tokens over its seconds
                row["tokens_per_s_per_gpu"] = tokens / times["span"] / gpus
            row["update_tokens_per_s"] = row["update_tokens"] / max(update["seconds"], 1e-9)
            # The training alone (no checkpoint): tokens/s and model FLOPs utilisation of the trainers' GPUs.
            train_s = update.get("metrics", {}).get("perf/train_s")
            if train_s:
                row["train_tokens_per_s"] = row["update_tokens"] / train_s
                row["mfu"] = row["train_tokens_per_s"] * flops_per_token / peak_flops if peak_flops else None
            # The checkpoint's files as they are on disk now: None for one already rotated away (keep_checkpoints).
            ckpt = update.get("checkpoint")
            files = store.checkpoint_files(n) if ckpt else []
            row["checkpoint_bytes"] = None if ckpt and not files else sum(f["bytes"] for f in files)
        if sampler is not None:
            for stage in STAGES:
                marker = store.stage_marker(n, stage)
                if marker is not None:
                    end = _timestamp(marker["committed_at"])
                    peak = sampler.peak(end - marker["seconds"], end)
                    row[f"{stage}_peak_mib"] = peak
                    if peak is not None:
                        stage_peaks[stage] = max(stage_peaks[stage] or 0, peak)
            peaks = [row[f"{s}_peak_mib"] for s in STAGES if row.get(f"{s}_peak_mib") is not None]
            row["peak_mib"] = max(peaks) if peaks else None
        rows.append(row)
    started = [e for e in store.events() if e.get("stage") == "workers" and e.get("action") == "started"]
    return rows, {"worker_startup_s": started[0]["seconds"] if started else None,
                  "peak_gpu_mem_by_stage_mib": stage_peaks}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict], run: dict) -> None:
    columns = [  # header, key, format, scale
        ("iter", "iteration", "d", 1), ("gen_s", "generate_s", ".1f", 1), ("score_s", "score_s", ".1f", 1),
        ("adv_s", "advantages_s", ".2f", 1), ("update_s", "update_s", ".1f", 1), ("sync_s", "sync_s", ".2f", 1),
        ("gen_tok/s", "gen_tokens_per_s", ".0f", 1), ("upd_tok/s", "update_tokens_per_s", ".0f", 1),
        ("train_tok/s", "train_tokens_per_s", ".0f", 1), ("MFU_%", "mfu", ".1f", 100),
        ("ckpt_s", "checkpoint_s", ".1f", 1), ("ckpt_GB", "checkpoint_bytes", ".2f", 1e-9),
        ("sync_MB", "sync_bytes", ".1f", 1e-6), ("tok/s/GPU", "tokens_per_s_per_gpu", ".0f", 1),
        ("resp_len", "response_len", ".1f", 1), ("reward", "reward", ".3f", 1),
        ("lp_diff", "logprob_diff", ".4f", 1), ("ovh_%", "overhead_pct", ".1f", 1), ("peak_MiB", "peak_mib", "d", 1),
    ]
    widths = [max(len(h), 8) for h, *_ in columns]
    print("  ".join(h.rjust(w) for (h, *_), w in zip(columns, widths)))
    for row in rows:
        cells = []
        for (_, key, spec, scale), w in zip(columns, widths):
            value = row.get(key)
            if value is not None and scale != 1:
                value = value * scale
            cells.append(_fmt(value, spec).rjust(w))
        print("  ".join(cells))
    peak, total, before = run.get("peak_gpu_mem_mib"), run.get("gpu_mem_total_mib"), run.get("gpu_mem_before_mib")
    by_stage = ", ".join(f"{s} {_fmt(v, 'd')}" for s, v in run.get("peak_gpu_mem_by_stage_mib", {}).items())
    print(f"peak GPU memory: {_fmt(peak, 'd')} MiB of {_fmt(total, 'd')} ({_fmt(before, 'd')} used before the run); "
          f"per stage: {by_stage}")
    print(f"worker startup: {_fmt(run.get('worker_startup_s'), '.1f')} s   ray.init: {run['ray_init_s']:.1f} s   "
          f"model build: {run['model_build_s']:.1f} s   flow: {_fmt(run.get('flow_s'), '.1f')} s")
    m = run["model"]
    print(f"model: {run['params']:,} parameters (Qwen2 hidden {m['hidden_size']} x {m['num_hidden_layers']} layers, "
          f"{m['num_attention_heads']} heads / {m['num_key_value_heads']} KV, MLP {m['intermediate_size']}, "
          f"vocab {m['vocab_size']}, {run['dtype']})   device: {run['device']}   "
          f"num_gpus engine/policy+reference/critic: {run['gpu_fractions']}")
    st = run["settings"]
    print(f"GPUs {st['gpus']}: {st['num_ranks']} rank(s) per trainer group, ZeRO-{st['zero_stage']}, offload "
          f"{st['offload']}; MFU = train tokens/s x 6 x params x (2 with the critic) / (GPUs x peak bf16)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ppoflow-gpu-bench-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # Before anything imports Prefect or starts Ray: Ray's workers inherit this environment, and Prefect reads its
    # settings from it. A private PREFECT_HOME keeps the temporary API's database out of the home folder.
    for key, value in {
        "PREFECT_HOME": str(workdir / "prefect"), "PREFECT_MEMO_STORE_PATH": str(workdir / "prefect" / "memo.toml"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_UI_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false",
    }.items():
        os.environ.setdefault(key, value)
    sys.path.insert(0, str(REPO))  # `python bench/gpu_ppo.py` puts bench/, not the repo, on the path
    os.chdir(REPO)  # Ray puts the driver's working directory on its workers' path: the actors import workers.*

    import torch

    from ppoflow.tasks.arith import N_QUESTIONS, write_prompts
    from stages.config import RunConfig, load_config

    cuda = torch.cuda.is_available()  # no CUDA context in the driver: only the actors should hold GPU memory
    fraction = args.gpu_fraction if cuda else 0.0
    base = load_config(str(QUICKSTART), [])  # for the fields kept from the quickstart
    max_model_len = base.data.max_prompt_tokens + args.max_new_tokens
    shape = model_shape(args, max_model_len)
    batch = args.prompts * args.samples
    mini = min(args.mini_batch, batch)
    micro = min(args.micro_batch, mini)

    t0 = time.perf_counter()
    vocab = 151_936 if args.shape != "custom" else args.vocab
    model_dir = workdir / f"qwen2-h{shape['hidden_size']}-l{shape['num_hidden_layers']}-v{vocab}-{args.dtype}"
    if not (model_dir / "config.json").is_file():  # a --workdir reused across runs keeps its model
        # In a process of its own, on the GPU when there is one (a 1.5B random init takes seconds there, a minute on
        # the CPU), so that no CUDA context stays in this driver to count in the memory samples.
        build = (f"from ppoflow.tiny_model import make_tiny_model; make_tiny_model({str(model_dir)!r}, sft_steps=0, "
                 f"shape={shape!r}, dtype={args.dtype!r}, vocab_size={vocab!r}, device={'cuda' if cuda else 'cpu'!r})")
        subprocess.run([sys.executable, "-c", build], cwd=REPO, check=True)
    # Enough distinct prompts that no iteration repeats one (the task has 10,000 questions in all).
    n_train = min(max(2048, args.prompts * args.iterations), N_QUESTIONS - 256)
    prompts = write_prompts(str(workdir / "data"), n_train=n_train, n_eval=256)
    model_build_s = time.perf_counter() - t0
    params = count_parameters(model_dir)
    print(f"gpu_ppo: model {model_dir} with {params:,} parameters; prompts {prompts['train']}", flush=True)

    run_id = f"gpu-ppo-{datetime.now():%Y%m%d-%H%M%S}"
    ncpu = os.cpu_count() or 2
    overrides = [
        f"run_id={run_id}", f"iterations={args.iterations}",
        f"model.path={model_dir}", f"model.dtype={args.dtype}",
        f"data.prompts={prompts['train']}", f"data.prompts_per_iteration={args.prompts}",
        f"generation.backend={args.backend}", f"generation.n_samples_per_prompt={args.samples}",
        f"generation.max_new_tokens={args.max_new_tokens}", f"generation.max_model_len={max_model_len}",
        f"generation.num_gpus={fraction}", f"generation.enable_sleep_mode={str(args.sleep and cuda).lower()}",
        f"generation.gpu_memory_utilization={args.gpu_memory_utilization}", "generation.weight_sync=broadcast",
        # One GPU shared by all (the engine and every trainer take a fraction of it): hybrid placement, so the
        # engine shares the policy's bundle and receives its weights through CUDA IPC (broadcast's route there).
        *(["generation.placement=hybrid"] if cuda else []),
        *(f"{role}.{key}={value}" for role in ("policy", "critic") for key, value in (
            ("num_gpus", fraction), ("mini_batch_size", mini), ("micro_batch_size", micro), ("num_threads", 2),
            ("zero_stage", args.zero_stage), ("num_ranks", args.gpus), ("offload", args.offload))),
        *([f"generation.num_engines={args.gpus}"] if args.gpus > 1 else []),
        f"ray.num_cpus={ncpu}", "tracking.logger=none", f"storage.root={workdir / 'runs'}",
        *([] if args.keep_checkpoints else ["storage.keep_checkpoints=1"]),
    ]
    if "eval" in RunConfig.model_fields:  # evaluation is not part of what this measures
        overrides.append("eval.prompts=null")
    config = load_config(str(QUICKSTART), overrides + args.set)
    # The reference actor asks for the policy's share, so it counts twice here.
    gpus = {"engine": config.generation.num_gpus, "policy": config.policy.num_gpus,
            "reference": config.policy.num_gpus, "critic": config.critic.num_gpus if config.uses_critic else 0.0}
    if sum(gpus.values()) > 1.0 + 1e-9:
        raise SystemExit(f"the actors ask for {sum(gpus.values()):g} GPUs ({gpus}) of one GPU; lower --gpu-fraction")

    from storage.run import run_uri as make_run_uri

    run_uri = make_run_uri(config.storage.root, run_id)
    visible = (os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(map(str, range(args.gpus)))).split(",")
    gpu_indices = [int(v) for v in visible[:args.gpus] if v.strip().isdigit()] or [0]  # Ray hands them out in order
    gpu_index = gpu_indices[0]
    sampler = MemorySampler(gpu_indices) if cuda and shutil.which("nvidia-smi") else None
    gpu_before = sampler.read() if sampler else None
    if sampler:
        sampler.start()

    import ray
    from prefect.testing.utilities import prefect_test_harness

    from flows.ppo import ppo_train

    t0 = time.perf_counter()
    # Started here rather than by the flow so that Ray is told about the GPU explicitly; the flow's connect() then
    # finds it running and joins it.
    ray.init(address="local", num_cpus=ncpu, num_gpus=args.gpus if cuda else 0, namespace=config.ray.namespace,
             include_dashboard=False,
             log_to_driver=True)
    ray_init_s = time.perf_counter() - t0
    failed, flow_s = False, None
    try:
        with prefect_test_harness(server_startup_timeout=120):
            t0 = time.perf_counter()
            ppo_train(config=config)
            flow_s = time.perf_counter() - t0
    except BaseException:  # noqa: BLE001 - report what was committed before the failure, then fail
        traceback.print_exc()
        failed = True
    finally:
        ray.shutdown()
        if sampler:
            sampler.stop()

    # Training FLOPs per token: 6·N for forward + backward (Kaplan et al. 2020), for the policy and, trained on the
    # same tokens, the critic (the same body; its head is one linear layer); 8·N with gradient checkpointing's extra
    # forward is not counted (MFU counts model FLOPs, not hardware FLOPs).
    flops_per_token = 6 * params * (2 if config.uses_critic else 1)
    rows, run = collect(run_uri, config, sampler, flops_per_token, args.peak_tflops * 1e12 * args.gpus if cuda else 0,
                        gpus=args.gpus)
    name_total = (_nvidia_smi("index", "name", "memory.total") or []) if cuda else []
    info = next((line.split(", ") for line in name_total if line.split(", ")[0] == str(gpu_index)), None)
    run.update(
        # Asked of torch only now: a CUDA context in the driver would have counted in the memory samples.
        device=torch.cuda.get_device_name(0) if cuda else f"cpu ({ncpu} cores)",
        gpu_mem_total_mib=int(info[2]) if info else None, gpu_mem_before_mib=gpu_before,
        peak_gpu_mem_mib=sampler.peak() if sampler else None, params=params, dtype=args.dtype,
        model={**shape, "vocab_size": json.loads((model_dir / "config.json").read_text())["vocab_size"]},
        gpu_fractions=f"{gpus['engine']:g}/{gpus['policy']:g}+{gpus['reference']:g}/{gpus['critic']:g}",
        ray_init_s=ray_init_s, model_build_s=model_build_s, flow_s=flow_s, failed=failed, run_uri=run_uri,
        settings={"iterations": args.iterations, "prompts_per_iteration": args.prompts, "samples": args.samples,
                  "max_new_tokens": args.max_new_tokens, "mini_batch": mini, "micro_batch": micro,
                  "zero_stage": config.policy.zero_stage, "estimator": config.algo.estimator, "gpus": args.gpus,
                  "num_ranks": config.policy.num_ranks, "offload": config.policy.offload,
                  "ppo_epochs": config.algo.ppo_epochs, "extra_overrides": args.set},
    )
    def write_json() -> None:  # after the run and again after each extra: a later step that hangs loses nothing
        if os.environ.get("OUT"):
            out = Path(os.environ["OUT"]) / args.json_name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({**run, "iterations": rows,
                                       "memory_samples": sampler.samples if sampler else []}, indent=1) + "\n")
            print(f"gpu_ppo: wrote {out}", flush=True)

    print()
    print_table(rows, run)
    write_json()
    if cuda and args.backend == "vllm" and args.standalone and not failed:
        run["standalone"] = _in_subprocess("standalone_vllm", str(model_dir), run_uri, config.iterations,
                                           config.generation.model_dump(mode="json"), config.model.dtype)
        write_json()
    if cuda and args.hf_generate:
        run["hf_vs_generate"] = _in_subprocess("hf_vs_generate", str(model_dir), args.prompts, args.samples,
                                               args.max_new_tokens, config.model.dtype)
        write_json()
    if "standalone" in run or "hf_vs_generate" in run:
        print_table(rows, run)
    if not args.keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"gpu_ppo: kept {workdir}")
    return 1 if failed else 0


def _in_subprocess(function: str, *args, timeout: float = 240) -> dict:
    """Run this module's `function(*args)` in a fresh process (a clean GPU: the run's actors are gone) and return
    the dict it prints last; {"failed": ...} when it fails or runs past `timeout` seconds."""
    code = (f"import json, sys; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'bench')!r}]; import gpu_ppo; "
            f"print('RESULT ' + json.dumps(gpu_ppo.{function}(*{args!r})))")
    try:
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"failed": f"timed out after {timeout:g} s"}
    found = [line[7:] for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if not found:
        return {"failed": (out.stderr or out.stdout).strip()[-2000:]}
    print(f"gpu_ppo: {function}: {found[-1]}", flush=True)
    return json.loads(found[-1])


def standalone_vllm(model_dir: str, run_uri: str, iteration: int, generation: dict, dtype: str) -> dict:
    """The ceiling: vLLM alone (no Ray, no ppoflow), configured as the run's engine, on the prompts and sampling
    parameters of the run's last rollout; generated tokens per second of the timed call (after a warm-up call)."""
    import os

    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from storage.run import RunStore

    rollout = RunStore(run_uri).read_stage(iteration, "generate")
    groups: dict[int, list[int]] = {}
    for g, p in zip(rollout["group_id"].to_pylist(), rollout["prompt_ids"].to_pylist()):
        groups.setdefault(g, p)
    n = len(rollout) // len(groups)
    llm = LLM(model=model_dir, dtype=dtype, seed=0, max_model_len=generation["max_model_len"],
              gpu_memory_utilization=generation["gpu_memory_utilization"],
              enforce_eager=bool(generation["enforce_eager"]),
              enable_prefix_caching=generation["enable_prefix_caching"])
    prompts = [TokensPrompt(prompt_token_ids=p) for p in groups.values()]
    params = [SamplingParams(n=n, temperature=generation["temperature"], top_p=generation["top_p"],
                             top_k=generation["top_k"], max_tokens=generation["max_new_tokens"], seed=1000 + i * n,
                             logprobs=0) for i in range(len(prompts))]
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"requests": len(prompts), "n": n, "tokens": tokens, "seconds": round(seconds, 3),
            "tok_s": round(tokens / seconds, 1)}


def hf_vs_generate(model_dir: str, prompts: int, samples: int, max_new_tokens: int, dtype: str) -> dict:
    """The HF engine (workers/hf_engine.py) against plain `model.generate` on the same batch: `prompts` prompts of the
    doubling task × `samples` samples, sampled at temperature 1 to exactly `max_new_tokens` tokens each (eos ignored
    by plain generate through min_new_tokens; a random-init model rarely samples it anyway)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ppoflow.tasks.arith import make_prompts
    from workers.hf_engine import HFEngine

    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                     add_generation_prompt=True) for r in make_prompts(prompts, 0)]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    engine = HFEngine(model_dir, seed=0, dtype=dtype, max_model_len=max(len(i) for i in ids) + max_new_tokens)
    requests = [{"prompt_ids": p, "n": samples, "temperature": 1.0, "top_p": 1.0, "top_k": -1,
                 "max_new_tokens": max_new_tokens, "seed": 1000 + j * samples} for j, p in enumerate(ids)]
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the test's tiny model
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    engine.generate(requests[:2])  # warm-up
    sync()
    t0 = time.perf_counter()
    out = engine.generate(requests)
    sync()
    engine_s = time.perf_counter() - t0
    engine_tokens = sum(len(s["response_ids"]) for r in out for s in r)
    del engine
    if device == "cuda":
        torch.cuda.empty_cache()

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    tok.padding_side = "left"
    batch = tok([t for t in texts for _ in range(samples)], return_tensors="pt", padding=True,
                add_special_tokens=False).to(device)
    kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                  min_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    model.generate(**{k: v[:2] for k, v in batch.items()}, **kwargs)  # warm-up
    sync()
    t0 = time.perf_counter()
    generated = model.generate(**batch, **kwargs)
    sync()
    plain_s = time.perf_counter() - t0
    plain_tokens = (generated.shape[1] - batch["input_ids"].shape[1]) * generated.shape[0]
    return {"batch": prompts * samples, "max_new_tokens": max_new_tokens,
            "hf_engine_tok_s": round(engine_tokens / engine_s, 1),
            "hf_generate_tok_s": round(plain_tokens / plain_s, 1),
            "engine_tokens": engine_tokens, "generate_tokens": plain_tokens}


if __name__ == "__main__":
    sys.exit(main())
