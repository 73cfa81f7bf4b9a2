"""Does the carried GPU environment work? One PASS/FAIL line per part of the stack, on the GPU host.

Run (GPU host, repo root, the archive of gpu/pack.sh in .carry/):
    bash bench/gpu_run.sh gpu/smoke.py                      # every default check, ~2-3 min
    bash bench/gpu_run.sh gpu/smoke.py --check vllm ray     # some of them
    bash bench/gpu_run.sh gpu/smoke.py --check deepspeed-fusedadam trl   # the optional ones

Checks (each in its own process, so one failure or hang does not hide the others):
- imports: torch sees an sm_90 GPU (the carried vLLM has kernels for sm_90 only); transformers, deepspeed, ray,
  prefect, pydantic, fastapi and vllm import.
- prefect: a flow runs a task that fails once and is retried (the ephemeral API server: SQLite, no UI).
- ray: two actors of num_gpus=0.5 share the GPU and each runs a matmul on it.
- deepspeed: a ZeRO-2 bf16 step with torch AdamW (what ppoflow's trainers use) changes the weights, loss finite.
- deepspeed-fusedadam (optional): the same with DeepSpeed's FusedAdam, JIT-built with nvcc here (~1 min).
- vllm: vLLM on ppoflow's tiny Qwen2 (random init, bf16, CUDA graphs on) with ppoflow's worker extension:
  greedy generation; sleep(level=1) frees memory and wake_up gives the same tokens; collective_rpc loads another
  model's weights (outputs change, checksum equal to the file's) and the first one's back (outputs restored).
- trl (optional, archive built with WITH_TRL=1): TRL imports with its GRPOTrainer and sees the carried vLLM.

Exit status 0 only if every check that ran passed. Each check's full log goes to $OUT/smoke-<check>.log when OUT
is set (else a temporary folder, named at the end); the last lines of a failed one are printed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

DEFAULT_CHECKS = ("imports", "prefect", "ray", "deepspeed", "vllm")
OPTIONAL_CHECKS = ("deepspeed-fusedadam", "trl")
TIMEOUT_S = {"vllm": 900, "deepspeed-fusedadam": 900}


def check_imports() -> str:
    import importlib

    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA GPU")
    cap = torch.cuda.get_device_capability(0)
    if cap != (9, 0):
        raise RuntimeError(f"GPU capability {cap}: the carried vLLM keeps kernels for sm_90 (H100/H200) only")
    versions = [f"torch {torch.__version__}", torch.cuda.get_device_name(0)]
    for name in ("transformers", "deepspeed", "ray", "prefect", "pydantic", "fastapi", "vllm"):
        versions.append(f"{name} {importlib.import_module(name).__version__}")
    return ", ".join(versions)


def check_prefect(work: Path) -> str:
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect-home"))
    os.environ.setdefault("PREFECT_MEMO_STORE_PATH", str(work / "prefect-home" / "memo_store.toml"))
    from prefect import flow, task

    attempts = []

    @task(retries=1, retry_delay_seconds=0)
    def flaky(x: int) -> int:
        attempts.append(x)
        if len(attempts) == 1:
            raise RuntimeError("first attempt fails on purpose")
        return 2 * x

    @flow
    def doubled(x: int) -> int:
        return flaky(x)

    result = doubled(21)
    if result != 42 or len(attempts) != 2:
        raise RuntimeError(f"flow returned {result!r} after {len(attempts)} attempts; expected 42 after 2")
    return "flow ran, task retried once"


def check_ray(work: Path) -> str:
    import ray

    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, _temp_dir=str(work / "ray"))
    try:
        @ray.remote(num_gpus=0.5)
        class Half:
            def run(self) -> tuple[str, str, float]:
                import torch

                a = torch.randn(1024, 1024, device="cuda")
                return (os.environ.get("CUDA_VISIBLE_DEVICES", ""), torch.cuda.get_device_name(0),
                        float((a @ a).norm()))

        actors = [Half.remote() for _ in range(2)]
        results = ray.get([a.run.remote() for a in actors], timeout=300)
    finally:
        ray.shutdown()
    if len({r[0] for r in results}) != 1 or not all(r[2] > 0 for r in results):
        raise RuntimeError(f"actors saw {results}")
    return f"2 actors x 0.5 GPU on CUDA_VISIBLE_DEVICES={results[0][0]} ({results[0][1]})"


def check_deepspeed(work: Path, fused: bool) -> str:
    import socket

    import deepspeed
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with socket.socket() as s:  # a free port for the one-process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
              "zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}
    if fused:  # DeepSpeed builds its FusedAdam op here, with nvcc, on first use
        config["optimizer"] = {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": False, "adam_w_mode": True}}
        engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    ids = torch.randint(0, 512, (4, 64), device=engine.device)
    before = next(engine.module.parameters()).detach().float().clone()
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    after = next(engine.module.parameters()).detach().float()
    if not torch.isfinite(loss) or torch.equal(before, after):
        raise RuntimeError(f"loss {loss.item()}, weights changed: {not torch.equal(before, after)}")
    inner = getattr(optimizer, "optimizer", optimizer)  # the ZeRO wrapper holds the real optimizer
    return (f"ZeRO-2 bf16 step with {type(inner).__name__}, loss {loss.item():.3f}, "
            f"dtype {next(engine.module.parameters()).dtype}")


def check_vllm(work: Path) -> str:
    import torch
    from safetensors.torch import load_file

    from ppoflow.tiny_model import make_tiny_model
    from workers.vllm_ext import state_dict_checksum

    quiet = lambda _msg: None  # noqa: E731
    first = make_tiny_model(str(work / "tiny-a"), seed=0, sft_steps=0, dtype="bfloat16", log=quiet)
    second = make_tiny_model(str(work / "tiny-b"), seed=1, sft_steps=0, dtype="bfloat16", log=quiet)

    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(model=first, dtype="bfloat16", seed=0, max_model_len=256, gpu_memory_utilization=0.3,
              enable_sleep_mode=True, worker_extension_cls="workers.vllm_ext.WeightSyncExtension")
    startup = time.perf_counter() - started
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = ["What is 12 doubled?", "What is 7 doubled?", "hello", "the quick brown fox"]

    def tokens() -> list[list[int]]:
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]

    out_a = tokens()
    free_awake = torch.cuda.mem_get_info()[0]
    llm.sleep(level=1)
    freed = torch.cuda.mem_get_info()[0] - free_awake
    llm.wake_up()
    if tokens() != out_a:
        raise RuntimeError("greedy tokens changed across sleep/wake_up")
    if freed <= 0:
        raise RuntimeError(f"sleep(level=1) freed {freed / 2**20:.0f} MiB")

    loaded = llm.collective_rpc("ppoflow_load_weights_from_path", args=(second,))[0]
    llm.reset_prefix_cache()
    out_b = tokens()
    expected = state_dict_checksum(load_file(str(Path(second) / "model.safetensors")).values())
    if out_b == out_a:
        raise RuntimeError("loading other weights through collective_rpc did not change the outputs")
    if abs(loaded["checksum"] - expected) > 1e-9 * max(1.0, abs(expected)):
        raise RuntimeError(f"checksum of the loaded weights {loaded['checksum']} != the file's {expected}")
    llm.collective_rpc("ppoflow_load_weights_from_path", args=(first,))
    llm.reset_prefix_cache()
    if tokens() != out_a:
        raise RuntimeError("reloading the first weights did not restore its outputs")
    return (f"engine up in {startup:.0f} s; generate, sleep/wake_up (freed {freed / 2**30:.1f} GiB), weight load "
            f"through collective_rpc and back: outputs as expected")


def check_trl() -> str:
    import trl
    from trl import GRPOConfig, GRPOTrainer  # noqa: F401
    from trl.import_utils import is_vllm_available

    if not is_vllm_available():
        raise RuntimeError("TRL does not see the carried vLLM")
    return f"trl {trl.__version__}, GRPOTrainer imports, vLLM available to it"


def run_one(name: str, work: Path) -> str:
    if name == "imports":
        return check_imports()
    if name == "prefect":
        return check_prefect(work)
    if name == "ray":
        return check_ray(work)
    if name in ("deepspeed", "deepspeed-fusedadam"):
        return check_deepspeed(work, fused=name == "deepspeed-fusedadam")
    if name == "vllm":
        return check_vllm(work)
    if name == "trl":
        return check_trl()
    raise ValueError(f"unknown check {name!r}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", nargs="+", default=list(DEFAULT_CHECKS), choices=DEFAULT_CHECKS + OPTIONAL_CHECKS)
    p.add_argument("--child", help=argparse.SUPPRESS)  # run one check in this process (what the parent starts)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.child:
        try:
            print(f"DETAIL {run_one(a.child, Path(a.work))}", flush=True)
            return 0
        except BaseException as e:
            traceback.print_exc()
            print(f"DETAIL {type(e).__name__}: {e}", flush=True)
            return 1

    logs = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(tempfile.mkdtemp(prefix="ppoflow-smoke-"))
    logs.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name in a.check:
        work = Path(tempfile.mkdtemp(prefix=f"smoke-{name}-"))
        log = logs / f"smoke-{name}.log"
        started = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--child", name, "--work", str(work)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=TIMEOUT_S.get(name, 300))
            output, ok = proc.stdout, proc.returncode == 0
        except subprocess.TimeoutExpired as e:
            # TimeoutExpired holds bytes whatever text= said
            output = (e.stdout or b"").decode(errors="replace") + f"\nDETAIL timed out after {e.timeout:.0f} s"
            ok = False
        log.write_text(output)
        detail = next((line[7:] for line in reversed(output.splitlines()) if line.startswith("DETAIL ")),
                      "no result line (crashed?)")
        print(f"{'PASS' if ok else 'FAIL'} {name} ({time.perf_counter() - started:.0f} s): {detail}", flush=True)
        if not ok:
            failed += 1
            print("    | " + "\n    | ".join(output.splitlines()[-15:]), flush=True)
    print(f"smoke: {len(a.check) - failed}/{len(a.check)} passed; logs in {logs}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
