"""ppoflow's GRPO next to TRL's GRPOTrainer with vLLM colocated on one GPU, in one invocation (issue 21's side by side).

Both run, one after the other, each in a process of its own, on the same random-init model of a real shape (built by
bench/gpu_ppo.py, `--shape qwen2.5-0.5b`: 494M parameters, Qwen2.5's 151,936-token vocabulary, bf16 on disk), the
same prompt file (the doubling task, chat template applied), P prompts x 8 samples per iteration, at most
--max-new-tokens new tokens at temperature 1, and the GRPO of bench/trl_compare.py (`grpo_sets` / `trl_grpo_config`:
group-normalised advantages, k3 KL to the reference in the loss with beta 0.04, lr 2e-4, P x 8 / --mini-batch
optimizer steps per iteration, --micro-batch samples per forward pass, one pass). Random weights sample nearly uniform
tokens, so every response runs to the length limit on both sides: the rewards mean nothing, the throughput does.

- ppoflow: bench/gpu_ppo.py (the whole flow: the vLLM engine, the DeepSpeed policy and the reference as Ray actors on
  fractions of the GPU, placement hybrid, the engine slept while the trainers work, CUDA-IPC weight sync, every stage
  committed as Parquet), `--gpu-memory-utilization` for vLLM, checkpoint.every=10 (configs/gpu-0.5b.yaml's cadence;
  the run's last iteration writes the final checkpoint anyway).
- TRL: bench/trl_compare.py's `--trl-worker --device gpu`: GRPOTrainer with `use_vllm=True, vllm_mode="colocate"`,
  the same vLLM memory share, `vllm_enable_sleep_mode=True`, bf16 autocast, no gradient checkpointing (ppoflow's
  policy has none), nothing saved.

Timed: an iteration is one generation and its optimizer steps. ppoflow's from its commit markers (its first iteration
has no earlier commit to start from; its last one also writes the run's final checkpoint, which TRL, saving nothing,
has no counterpart of: both are left out of the headline, the JSON has every iteration); TRL's from a callback at
every (P x 8 / mini-batch)th optimizer step, the first (warm-up) iteration left out. Tokens/s/GPU is verl's: the
iteration's prompt + response tokens (each system's own count of its samples) / (iteration seconds x GPUs).
Start-up (actors, vLLM's compile and CUDA graphs) is printed apart.

Run on the GPU host (repo root; the archive of `WITH_TRL=1 bash gpu/pack.sh .carry-trl` beside it, carried):
    CARRY=.carry-trl bash bench/gpu_session.sh trl_gpu           # -> $OUT/trl_gpu.json, logs beside it
    source gpu/env.sh && python3 bench/trl_gpu.py --json /tmp/trl_gpu.json [--prompts 64 --max-new-tokens 256]
A side that fails or runs past its time limit is reported with its log's last lines; the other side's row stays.
Results: bench/RESULTS.md, issue 21's GPU section.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from trl_compare import GROUP, grpo_sets  # noqa: E402  (bench/ is not a package)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", default="qwen2.5-0.5b", choices=["qwen2.5-0.5b", "qwen2.5-1.5b", "custom"],
                   help="bench/gpu_ppo.py --shape (custom: tiny shapes for a CPU check of this script)")
    p.add_argument("--prompts", type=int, default=64, help="prompts per iteration (8 samples each)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--iterations", type=int, default=4,
                   help="ppoflow's iterations (timed: 2..N-1, the first has no start mark and the last writes the "
                        "final checkpoint)")
    p.add_argument("--trl-iterations", type=int, default=3, help="TRL's iterations (timed: 2..N)")
    p.add_argument("--mini-batch", type=int, default=64, help="samples per optimizer step")
    p.add_argument("--micro-batch", type=int, default=16, help="samples per forward/backward pass")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3, help="vLLM's share of the GPU, both sides")
    p.add_argument("--only", choices=["ppoflow", "trl"], help="run one side (trl needs --workdir of an earlier run)")
    p.add_argument("--ppoflow-timeout", type=float, default=260,
                   help="seconds for ppoflow's process, start-up included")
    p.add_argument("--trl-timeout", type=float, default=250, help="seconds for TRL's process, start-up included")
    p.add_argument("--gpu-ppo-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for bench/gpu_ppo.py (repeatable; e.g. --gpu-ppo-arg=--hidden=64 with "
                        "--shape custom)")
    p.add_argument("--json", help="write the table, the settings and every iteration here")
    p.add_argument("--workdir", help="model, prompts, runs and logs (default: a temporary folder, deleted after)")
    args = p.parse_args(argv)
    if args.prompts <= 0 or args.prompts * GROUP % args.mini_batch or args.mini_batch % args.micro_batch:
        p.error(f"--prompts {args.prompts} x {GROUP} samples must be a positive multiple of --mini-batch "
                f"{args.mini_batch}, itself a multiple of --micro-batch {args.micro_batch}")
    if args.iterations < 3 or args.trl_iterations < 2:
        p.error("--iterations must be >= 3 and --trl-iterations >= 2: each side needs a timed iteration")
    return args


def tail(path: Path, lines: int = 25) -> str:
    """The last lines of a log, without blank lines and Python's warning noise."""
    if not path.is_file():
        return f"(no log at {path})"
    kept = [line for line in path.read_text(errors="replace").splitlines()
            if line.strip() and "Warning" not in line and "warn(" not in line]
    return "\n".join(kept[-lines:])


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> tuple[int | str, float]:
    """Run `cmd` with its output to `log`; (exit status or "timeout", seconds)."""
    t0 = time.perf_counter()
    print(f"trl_gpu: {' '.join(cmd)}  (log {log}, limit {timeout:g} s)", flush=True)
    with log.open("w") as f:
        # A session of its own: on a timeout the whole group (Ray's workers, vLLM's) goes, not only the parent.
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc: int | str = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc = "timeout"
    return rc, time.perf_counter() - t0


def wait_for_free_gpu(limit_s: float = 20.0, below_mib: int = 4096) -> None:
    """The next side starts on a GPU the last one has left: its actors may take a few seconds to exit."""
    if shutil.which("nvidia-smi") is None:
        return
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True).stdout.split()
        if out and int(out[0]) < below_mib:
            return
        time.sleep(1)
    print(f"trl_gpu: the GPU still holds {out[0] if out else '?'} MiB after {limit_s:g} s; going on", flush=True)


def run_ppoflow(args: argparse.Namespace, workdir: Path) -> dict:
    out = workdir / "ppoflow-out"
    cmd = [sys.executable, str(REPO / "bench/gpu_ppo.py"), "--shape", args.shape, "--iterations", str(args.iterations),
           "--prompts", str(args.prompts), "--samples", str(GROUP), "--max-new-tokens", str(args.max_new_tokens),
           "--mini-batch", str(args.mini_batch), "--micro-batch", str(args.micro_batch),
           "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--no-standalone",
           "--workdir", str(workdir), "--keep-workdir", "--json-name", "ppoflow.json", *args.gpu_ppo_arg]
    for s in [*grpo_sets(args.prompts, args.max_new_tokens, args.mini_batch, args.micro_batch), "checkpoint.every=10"]:
        cmd += ["--set", s]
    rc, wall = run_logged(cmd, workdir / "ppoflow.log", args.ppoflow_timeout, {**os.environ, "OUT": str(out)})
    engine = "HF engine" if "--backend=hf" in args.gpu_ppo_arg else "vLLM (Ray actor, hybrid)"  # hf: a CPU check
    result = {"system": "ppoflow", "engine": engine, "rc": rc, "wall_s": round(wall, 1)}
    table = out / "ppoflow.json"
    if not table.is_file():
        return {**result, "error": tail(workdir / "ppoflow.log")}
    data = json.loads(table.read_text())
    rows = [r for r in data["iterations"] if r.get("tokens_per_s_per_gpu") is not None and r.get("iteration_s")]
    last = max((r["iteration"] for r in data["iterations"]), default=0)
    # The last iteration's span holds the run's final checkpoint (TRL saves nothing): left out while others remain.
    timed = [r for r in rows if r["iteration"] != last] or rows
    result.update(
        iterations=[r["iteration"] for r in timed], seconds=[r["iteration_s"] for r in timed],
        tokens=[round(r["tokens_per_s_per_gpu"] * r["iteration_s"]) for r in timed],
        all_iterations=[{k: r.get(k) for k in ("iteration", "iteration_s", "tokens_per_s_per_gpu", "generate_s",
                                              "update_s", "sync_s", "gen_tokens_per_s", "response_len")}
                        for r in data["iterations"]],
        startup_s=data.get("worker_startup_s"), device=data.get("device"), params=data.get("params"),
        failed=data.get("failed"), peak_gpu_mem_mib=data.get("peak_gpu_mem_mib"))
    if rc != 0 or not timed:
        result["error"] = tail(workdir / "ppoflow.log")
    return result


def run_trl(args: argparse.Namespace, workdir: Path) -> dict:
    result = {"system": "TRL GRPOTrainer", "engine": "vLLM colocate"}
    models = sorted(workdir.glob("qwen2-*/config.json"))
    prompts = workdir / "data" / "train.jsonl"
    if not models or not prompts.is_file():
        return {**result, "rc": "not run", "error": f"no model or prompts in {workdir} (ppoflow's run builds them)"}
    from stages.config import load_config

    max_model_len = load_config(str(REPO / "configs/quickstart.yaml"), []).data.max_prompt_tokens + args.max_new_tokens
    out = workdir / "trl.json"
    cmd = [sys.executable, str(REPO / "bench/trl_compare.py"), "--trl-worker", "--device", "gpu",
           "--iterations", str(args.trl_iterations), "--out", str(out), "--model", str(models[0].parent),
           "--prompts-file", str(prompts), "--prompts", str(args.prompts), "--max-new-tokens", str(args.max_new_tokens),
           "--mini-batch", str(args.mini_batch), "--micro-batch", str(args.micro_batch),
           "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--max-model-len", str(max_model_len)]
    out.unlink(missing_ok=True)  # a reused --workdir's earlier result must not pass for this run's
    rc, wall = run_logged(cmd, workdir / "trl.log", args.trl_timeout)
    result.update(rc=rc, wall_s=round(wall, 1))
    if rc != 0:
        result["error"] = tail(workdir / "trl.log")
    # The worker rewrites its file after every iteration: one cut by the limit still has the iterations it timed.
    data = json.loads(out.read_text()) if out.is_file() else {"iterations": []}
    if len(data["iterations"]) < 2:
        return {**result, "error": result.get("error") or f"no timed iteration in {out}"}
    result.update(system=f"TRL {data['version']} GRPOTrainer", iterations=list(range(2, len(data["iterations"]) + 1)),
                  seconds=data["iterations"][1:], tokens=data["tokens"][1:], startup_s=data.get("init_s"),
                  device=data.get("device"), all_seconds=data["iterations"], all_tokens=data["tokens"],
                  completion_mean_length=data.get("completion_mean_length"),
                  peak_torch_gib=data.get("peak_torch_gib"), partial=rc != 0)
    return result


def summarize(r: dict) -> dict:
    """Mean seconds, tokens and verl's tokens/s/GPU (one GPU) over the timed iterations; {} when none ran."""
    if not r.get("seconds"):
        return {}
    seconds, tokens = sum(r["seconds"]), sum(r["tokens"])
    return {"s_per_iteration": seconds / len(r["seconds"]), "tokens_per_iteration": tokens / len(r["tokens"]),
            "tokens_per_s_per_gpu": tokens / seconds}


def report(results: list[dict], args: argparse.Namespace) -> dict:
    by = {("trl" if r["system"].startswith("TRL") else "ppoflow"): {**r, **summarize(r)} for r in results}
    trl_tps = by.get("trl", {}).get("tokens_per_s_per_gpu")
    ppo_tps = by.get("ppoflow", {}).get("tokens_per_s_per_gpu")
    print(f"\n{args.shape}, {args.prompts} prompts x {GROUP} samples, <= {args.max_new_tokens} new tokens (random "
          f"weights: every response runs to the limit), {args.prompts * GROUP // args.mini_batch} optimizer steps of "
          f"{args.mini_batch} ({args.micro_batch} per pass) per iteration, vLLM memory share "
          f"{args.gpu_memory_utilization}, one GPU")
    print(f"{'system':<26} {'engine':<26} {'timed its':>9} {'s/iteration':>11} {'tokens/it':>9} {'tok/s/GPU':>9} "
          f"{'vs TRL':>6} {'start-up s':>10} {'process s':>9}")
    for key in ("ppoflow", "trl"):
        r = by.get(key)
        if r is None:
            continue
        if "tokens_per_s_per_gpu" in r:
            ratio = f"{r['tokens_per_s_per_gpu'] / trl_tps:.2f}x" if trl_tps else "-"
            start = f"{r['startup_s']:.0f}" if r.get("startup_s") is not None else "-"
            print(f"{r['system']:<26} {r['engine']:<26} {','.join(map(str, r['iterations'])):>9} "
                  f"{r['s_per_iteration']:>11.2f} {r['tokens_per_iteration']:>9.0f} {r['tokens_per_s_per_gpu']:>9.0f} "
                  f"{ratio:>6} {start:>10} {r.get('wall_s', 0):>9.0f}")
        if r.get("error"):
            print(f"{r['system']:<26} {r['engine']:<26} FAILED (rc {r.get('rc')}); its log's last lines:\n"
                  + "\n".join("    " + line for line in r["error"].splitlines()))
    ratio = ppo_tps / trl_tps if ppo_tps and trl_tps else None
    if ratio is not None:
        print(f"ppoflow / TRL tokens/s/GPU: {ratio:.2f} (target >= 1)")
    return {
        "ppoflow_tokens_per_s_per_gpu": round(ppo_tps, 1) if ppo_tps else None,
        "trl_tokens_per_s_per_gpu": round(trl_tps, 1) if trl_tps else None,
        "ratio": round(ratio, 3) if ratio is not None else None,
        "device": by.get("ppoflow", by.get("trl", {})).get("device"),
        "settings": {"shape": args.shape, "prompts": args.prompts, "group": GROUP,
                     "max_new_tokens": args.max_new_tokens, "mini_batch": args.mini_batch,
                     "micro_batch": args.micro_batch, "gpu_memory_utilization": args.gpu_memory_utilization,
                     "ppoflow_iterations": args.iterations, "trl_iterations": args.trl_iterations,
                     "grpo_sets": grpo_sets(args.prompts, args.max_new_tokens, args.mini_batch, args.micro_batch),
                     "ppoflow_extra": ["checkpoint.every=10", *args.gpu_ppo_arg],
                     "trl_extra": "use_vllm, vllm_mode=colocate, vllm_enable_sleep_mode, bf16 autocast over fp32 "
                                  "weights, gradient_checkpointing=False, save_strategy=no",
                     "note": "random-init weights: every response runs to max_new_tokens on both sides"},
        "systems": by,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="trl-gpu-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        if args.only in (None, "ppoflow"):
            results.append(run_ppoflow(args, workdir))
            wait_for_free_gpu()
        if args.only in (None, "trl"):
            results.append(run_trl(args, workdir))
        table = report(results, args)
        if args.json:
            path = Path(args.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(table, indent=1) + "\n")
            for log in ("ppoflow.log", "trl.log"):  # the whole logs beside the JSON
                if (workdir / log).is_file():
                    shutil.copy(workdir / log, path.parent / f"{path.stem}_{log}")
            print(f"trl_gpu: wrote {path}")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if table["ratio"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
