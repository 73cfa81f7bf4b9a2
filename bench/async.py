"""Asynchronous pipeline benchmark: seconds per iteration and tokens/s at algo.max_staleness S = 0, 1, 2.

Each S is one training run of the same config, `ppoflow train` in a process of its own (its own Ray and its own
actors), on the doubling task of ppoflow/tasks/arith.py with a random-init Qwen2 built here (nothing is downloaded;
random weights run every response to --max-new-tokens, so every iteration does the same work). Engines and trainers
sit on resources of their own (`generation.placement: standard`), the precondition for the overlap:
  cpu  (default) the engine's actor on one CPU with one torch thread (the HF engine), the trainers on the other with
       one thread each (policy, critic, reference; `ray.num_cpus: 2`): run it on 2 cores (`taskset -c 0,1` on a
       larger host) for the issue's CPU shape;
  gpu  one GPU shared by fractions (--gpus 1: the engine, the policy, the reference and the critic 0.25 each), or
       with --gpus 2 the engine on one GPU and the trainers on the other (0.33 each; 0.5 without a critic).
What it reads back from each run's commit markers, over the iterations after --warmup (the first ones start the
workers' caches and, at S ≥ 1, the first rollouts come from the base policy while nothing else runs) but the last
(its update writes the run's final checkpoint, which the others skip: checkpoint.every is set past the run):
  s/iter       wall time between successive sync commits (median; the mean is in the JSON);
  tok/s        response tokens the run committed per second of that span (generation's throughput as the
               training loop sees it);
  gen_s, train_s   the generate stage's own seconds and score + advantages + update's: the two lanes; the
               pipeline can hide the shorter one, so the best speedup is (gen + train + sync) / (max(gen, train) +
               sync + overhead).
speedup_s1 = s/iter at S = 0 / s/iter at S = 1 (and speedup_s2 likewise). With --out the runs go to that JSON file
(updated, not replaced: bench/results/async.json keeps the CPU and the GPU numbers side by side) under `cpu` / `gpu`,
and the speedups under `{device}_speedup_s1`, `..._s2`; runs of an earlier call on the same device with the same
settings count too, so S = 0, 1, 2 may be split over calls (the GPU host's commands end after 10 minutes).

CPU (2 cores, the issue's shape: generation and update take comparable time at these settings, see bench/RESULTS.md):
    taskset -c 0,1 .venv/bin/python bench/async.py --out bench/results/async.json
GPU host (repo root with .carry/ from `bash gpu/pack.sh`; the HF engine, bf16, the ~0.48B shape of bench/gpu_ppo.py),
two calls:
    bash bench/gpu_run.sh bench/async.py --device gpu --gpus 2 --staleness 0 1 --out bench/results/async.json
    bash bench/gpu_run.sh bench/async.py --device gpu --gpus 2 --staleness 2 --out bench/results/async.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("generate", "score", "advantages", "update", "sync")

SHAPES = {  # Qwen2 shapes for ppoflow.tiny_model.make_tiny_model (vocabulary: ppoflow's own tokenizer)
    "cpu": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=352),
    # bench/gpu_ppo.py's ~0.48B: per token about the compute of Qwen2.5-0.5B
    "gpu": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=4,
                intermediate_size=5632),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--gpus", type=int, choices=[1, 2], default=1,
                   help="gpu: 1 (engine and trainers share it by fractions) or 2 (the engine's and the trainers')")
    p.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2], help="algo.max_staleness values to run")
    p.add_argument("--iterations", type=int, default=None, help="per run (default: cpu 8, gpu 6)")
    p.add_argument("--warmup", type=int, default=2, help="first iterations left out of the means")
    p.add_argument("--prompts", type=int, default=None, help="data.prompts_per_iteration (default: cpu 32, gpu 64)")
    p.add_argument("--samples", type=int, default=4, help="generation.n_samples_per_prompt")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: cpu 24, gpu 128")
    p.add_argument("--ppo-epochs", type=int, default=1, help="algo.ppo_epochs (more: a longer update)")
    p.add_argument("--estimator", default="gae", help="algo.estimator (gae trains a critic beside the policy)")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="cpu: leave the actors unpinned (default: the engine on the first core, the trainers on the "
                        "second)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every run, applied last (repeatable)")
    p.add_argument("--workdir", default=None, help="model, prompts and runs (default: a temporary folder)")
    p.add_argument("--out", default=None, help="JSON file to write (or update) with the results")
    return p.parse_args(argv)


def overrides(args: argparse.Namespace, model: Path, prompts: Path, root: Path) -> list[str]:
    """The config of every run but algo.max_staleness: configs/quickstart.yaml plus these."""
    gpu = args.device == "gpu"
    batch = args.prompts * args.samples
    mini = min(64 if not gpu else 128, batch)
    out = [f"model.path={model}", f"data.prompts={prompts}", "eval.prompts=null", f"storage.root={root}",
           f"iterations={args.iterations}", f"data.prompts_per_iteration={args.prompts}",
           f"generation.n_samples_per_prompt={args.samples}", f"generation.max_new_tokens={args.max_new_tokens}",
           f"generation.max_model_len={48 + args.max_new_tokens}", "generation.backend=hf",
           "generation.placement=standard", f"algo.estimator={args.estimator}", f"algo.ppo_epochs={args.ppo_epochs}",
           "tracking.logger=none", "storage.keep_checkpoints=1", "checkpoint.every=1000",  # the last one only
           "flow.iteration_subflows=false",
           f"policy.mini_batch_size={mini}", f"policy.micro_batch_size={min(mini, 16 if gpu else 64)}",
           f"critic.mini_batch_size={mini}", f"critic.micro_batch_size={min(mini, 16 if gpu else 64)}"]
    if args.estimator != "gae":
        out += ["algo.kl_in_reward=false", "algo.kl_estimator=k3"]
    if gpu:
        # Every trainer actor (policy, reference on the policy's share, critic) takes an equal share of what the
        # engine leaves: a quarter each on one GPU (as bench/gpu_ppo.py), the whole second GPU between them on two.
        actors = 3 if args.estimator == "gae" else 2
        engine = 0.25 if args.gpus == 1 else 1.0
        trainer = int((1.0 - engine if args.gpus == 1 else 1.0) / actors * 100) / 100
        out += ["model.dtype=bfloat16", f"generation.num_gpus={engine}", f"policy.num_gpus={trainer}",
                f"critic.num_gpus={trainer}", "generation.num_cpus=1", "policy.num_cpus=1", "critic.num_cpus=1",
                "policy.lr=1e-6", "critic.lr=1e-6",
                # two GPUs: the engine's own GPU joins trainer rank 0's NCCL group; one GPU: the engine shares it
                # with the policy, so the sync takes the CUDA IPC route (workers/cluster.py weight_route)
                "generation.weight_sync=broadcast"]
    else:
        # The engine's one CPU and one thread; the trainers' one CPU between policy, reference (on the policy's
        # share) and critic, one thread each.
        out += ["ray.num_cpus=2", "generation.num_cpus=1", "generation.num_threads=1", "policy.num_cpus=0.33",
                "critic.num_cpus=0.33", "policy.num_threads=1", "critic.num_threads=1"]
    return out + args.set


class Pinner(threading.Thread):
    """CPU runs: pins the run's engine actor to one core and its trainer actors (policy, critic, reference) to the
    other, as soon as Ray has started them (found by their process titles, `ray::{run_id}-...:{role}:...`): Ray
    reserves CPUs in its accounting only, and without pinning the lanes would trade cores back and forth."""

    def __init__(self, run_id: str, engine_core: int, trainer_core: int):
        super().__init__(name="pinner", daemon=True)
        self.run_id, self.cores = run_id, {"engine": {engine_core}, "trainer": {trainer_core}}
        self.pinned: dict[int, str] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.halt.wait(0.5):
            for p in psutil.process_iter(["pid", "cmdline"]):
                title = " ".join(p.info["cmdline"] or [])
                if p.info["pid"] in self.pinned or not title.startswith(f"ray::{self.run_id}-"):
                    continue
                role = title.split(":")[3] if title.count(":") >= 3 else ""
                lane = "engine" if role.startswith("engine") else "trainer" if role in (
                    "policy", "critic", "reference") else None
                if lane is None:
                    continue
                try:
                    os.sched_setaffinity(p.info["pid"], self.cores[lane])
                    for thread in p.threads():  # threads already running keep their own mask
                        os.sched_setaffinity(thread.id, self.cores[lane])
                    self.pinned[p.info["pid"]] = role
                except (OSError, psutil.Error):
                    pass


def _at(marker: dict) -> float:
    return datetime.fromisoformat(marker["committed_at"]).timestamp()


def measure(run_uri: str, warmup: int) -> dict:
    """Per-iteration spans and stage seconds of a finished run, from its markers: the iterations after `warmup`, but
    the last (its update writes the run's final checkpoint, which the others skip)."""
    from storage.run import RunStore

    store = RunStore(run_uri)
    n_last = store.latest_committed("sync")
    spans, tokens, lanes = [], 0, {"gen_s": [], "train_s": [], "sync_s": []}
    for n in range(warmup + 1, n_last):
        markers = {s: store.stage_marker(n, s) for s in STAGES}
        spans.append(_at(markers["sync"]) - _at(store.stage_marker(n - 1, "sync")))
        tokens += sum(len(r) for r in store.read_stage(n, "generate")["response_ids"].to_pylist())
        lanes["gen_s"].append(markers["generate"]["seconds"])
        lanes["train_s"].append(sum(markers[s]["seconds"] for s in ("score", "advantages", "update")))
        lanes["sync_s"].append(markers["sync"]["seconds"])
    if not spans:
        raise SystemExit(f"{run_uri}: no iteration after the {warmup} warm-up ones; raise --iterations")
    return {"s_per_iter": statistics.median(spans), "s_per_iter_mean": statistics.fmean(spans),
            "tokens_per_s": tokens / sum(spans), "iterations_measured": len(spans),
            **{k: statistics.fmean(v) for k, v in lanes.items()}}


def device_name(gpu: bool) -> str:
    """What the timings ran on: the GPU's name, or the CPU model and the cores this process may use."""
    if gpu:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, check=False).stdout.splitlines()
        return out[0].strip() if out else "gpu"
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "cpu") if Path("/proc/cpuinfo").exists() else "cpu"
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gpu = args.device == "gpu"
    args.iterations = args.iterations or (6 if gpu else 8)
    args.prompts = args.prompts or (64 if gpu else 32)
    args.max_new_tokens = args.max_new_tokens or (128 if gpu else 24)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ppoflow-async-bench-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "PREFECT_HOME": str(workdir / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_MEMO_STORE_PATH": str(workdir / "prefect" / "memo.toml"), "PREFECT_UI_ENABLED": "false",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "TOKENIZERS_PARALLELISM": "false"}

    from ppoflow.tasks.arith import write_prompts
    from ppoflow.tiny_model import make_tiny_model

    model = workdir / f"model-{args.device}"
    if not (model / "config.json").is_file():
        make_tiny_model(str(model), sft_steps=0, shape={**SHAPES[args.device], "max_position_embeddings": 1024},
                        **({"dtype": "bfloat16"} if gpu else {}))
    prompts = Path(write_prompts(str(workdir / "arith"), n_train=2048, n_eval=16, seed=0)["train"])

    results, device = {}, device_name(gpu)
    for stale in args.staleness:
        run_id = f"s{stale}-{int(time.time())}"
        cmd = [sys.executable, "-m", "ppoflow.cli", "train", "--config", "configs/quickstart.yaml", "--run-id",
               run_id, *(a for o in [*overrides(args, model, prompts, workdir / "runs"), f"algo.max_staleness={stale}"]
                         for a in ("--set", o))]
        print(f"async bench: S = {stale}: {' '.join(cmd[3:])}", flush=True)
        t0 = time.perf_counter()
        cores = sorted(os.sched_getaffinity(0))
        pinner = Pinner(run_id, cores[0], cores[1]) if not gpu and args.pin and len(cores) >= 2 else None
        if pinner is not None:
            pinner.start()
        with open(workdir / f"{run_id}.log", "w") as log:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        if pinner is not None:
            pinner.halt.set()
            print(f"async bench: pinned {sorted(pinner.pinned.values())} (engine to core {cores[0]}, trainers to "
                  f"core {cores[1]})", flush=True)
        if proc.returncode != 0:
            print((workdir / f"{run_id}.log").read_text()[-4000:], file=sys.stderr)
            raise SystemExit(f"the run at S = {stale} failed (rc {proc.returncode}); log {workdir / f'{run_id}.log'}")
        results[str(stale)] = {**measure(str(workdir / "runs" / run_id), args.warmup),
                               "run_s": round(time.perf_counter() - t0, 1), "device": device,
                               "measured": datetime.now().isoformat(timespec="seconds"),
                               "settings": {**{k: v for k, v in vars(args).items()
                                               if k not in ("out", "workdir", "staleness")},
                                            # runs before the one-GPU IPC route synced through the object store
                                            **({"weight_sync": "broadcast"} if gpu else {})}}

    # Runs of earlier calls (--out) count when they ran on the same device with the same settings: the GPU's 10-minute
    # command limit may split S = 0, 1, 2 over two calls.
    out = Path(args.out) if args.out else None
    data = json.loads(out.read_text()) if out is not None and out.exists() else {}
    runs = {**{s: r for s, r in data.get(args.device, {}).get("by_staleness", {}).items()
               if (r.get("device"), r.get("settings")) == (device, results[next(iter(results))]["settings"])},
            **results}
    print(f"\n{'S':>2}  {'s/iter':>7}  {'mean':>7}  {'tok/s':>8}  {'gen_s':>6}  {'train_s':>7}  {'sync_s':>6}  "
          f"{'speedup':>7}   ({device})")
    base = runs.get("0", {}).get("s_per_iter")
    summary = {}
    for stale, r in sorted(runs.items()):
        speedup = base / r["s_per_iter"] if base else None
        if speedup is not None and stale != "0":
            summary[f"{args.device}_speedup_s{stale}"] = round(speedup, 3)
        print(f"{stale:>2}  {r['s_per_iter']:7.2f}  {r['s_per_iter_mean']:7.2f}  {r['tokens_per_s']:8.1f}  "
              f"{r['gen_s']:6.2f}  {r['train_s']:7.2f}  {r['sync_s']:6.2f}  "
              f"{'-' if speedup is None else f'{speedup:.2f}x':>7}")
    print(json.dumps(summary))
    if out is not None:
        data.update(summary)
        data[args.device] = {"by_staleness": runs}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
