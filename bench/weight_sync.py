"""Weight-sync benchmark: seconds and achieved GB/s of each `generation.weight_sync` route against model size, next to
the raw bandwidth of the same kind of link.

What it runs: for each model size, a random-init Qwen2 built here (ppoflow's tokenizer; nothing is downloaded), a
1-rank DeepSpeed policy and `--engines` engines of one run (vLLM on CPU, `--backend hf` for the GPU host, where vLLM
is not carried), created as a run creates them. Each route of workers/engine_pool.py is then timed end to end (the
policy's side, the transfer and the engines' in-place load, with its checksum verification) `--repeats` times; the first
broadcast, which builds the process group, is reported apart. GB/s = bytes the route moved / seconds (broadcast: the
bytes trainer rank 0 sent, once for all engines, as a broadcast sends them; object_store: the safetensors export;
storage: the export on disk, which the engines read but nobody sends). The link: two bare Ray actors placed like the
trainer and an engine broadcast a `--link-mb` buffer through a `workers.weight_sync.SyncGroup` (gloo on CPU, NCCL
between two GPUs), no model involved.

Sizes (hidden x layers, MLP 4x, head size 64, 4 KV heads; vocab ~280): tiny = the test model (~1.1M), 50m = 512 x 12
(~47M), 0.5b = 1024 x 24 with a 5.5x MLP (~0.48B, bench/gpu_ppo.py's shape).

Run (CPU, repo root):   .venv/bin/python bench/weight_sync.py --sizes tiny,50m,0.5b
GPU host (2 GPUs: the policy on one, an HF engine on the other, NCCL):
    bash bench/gpu_run.sh bench/weight_sync.py --backend hf --engines 1 --num-gpus 1 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "tiny": {},
    "50m": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8,
            "num_key_value_heads": 4},
    "0.5b": {"hidden_size": 1024, "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16,
             "num_key_value_heads": 4},
}
QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="tiny,50m,0.5b", help=f"comma list of {list(SHAPES)}")
    p.add_argument("--routes", default="broadcast,object_store,storage")
    p.add_argument("--backend", choices=["vllm", "hf"], default="vllm")
    p.add_argument("--engines", type=int, default=2)
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs of the policy and of each engine (0: CPU)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--bucket-mb", type=float, default=64.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--link-mb", type=float, default=256.0)
    p.add_argument("--workdir", default=None, help="models and run storage (default: a temporary folder)")
    return p.parse_args(argv)


class LinkEnd:
    """One end of a bare sync group, for the raw link bandwidth (no model, no load)."""

    def host(self) -> int:
        from workers.weight_sync import host_store

        self._store = host_store("127.0.0.1")
        return self._store.port

    def broadcast(self, port: int, rank: int, mb: float, times: int) -> float:
        import torch

        from workers.weight_sync import SyncGroup

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        group = SyncGroup("link", "127.0.0.1", port, rank, 2, device, store=getattr(self, "_store", None))
        buf = torch.ones(int(mb * 2**20) // 4, dtype=torch.float32, device=device)
        group._broadcast(buf)  # warm-up: NCCL builds its communicator at the first collective
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(times):
            group._broadcast(buf)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / times
        group.close()
        return buf.numel() * 4 / seconds / 1e9


def link_gbps(args) -> float:
    import ray

    end = ray.remote(LinkEnd).options(num_cpus=0, num_gpus=args.num_gpus)
    a, b = end.remote(), end.remote()
    port = ray.get(a.host.remote())
    gbps = ray.get([a.broadcast.remote(port, 0, args.link_mb, 5), b.broadcast.remote(port, 1, args.link_mb, 5)],
                   timeout=900)
    for actor in (a, b):
        ray.kill(actor)
    return gbps[0]


def bench_size(args, size: str, workdir: Path, log) -> list[dict]:
    import ray

    from ppoflow.tiny_model import make_tiny_model
    from stages.common import store_of
    from stages.config import load_config
    from workers.cluster import actor_name, rank_role
    from workers.engine_pool import EnginePool
    from workers.engines import create_engines, get_engines, remove_placement_group
    from workers.trainer import PolicyWorker

    model = workdir / f"model-{size}"
    if not (model / "config.json").exists():
        make_tiny_model(str(model), sft_steps=0, shape=SHAPES[size], dtype=args.dtype, log=lambda *_: None)
    n_params = sum(math.prod(s) for s in _shapes(model))
    gpu = args.num_gpus > 0
    config = load_config(QUICKSTART, [
        f"model.path={model}", f"model.dtype={args.dtype}", f"storage.root={workdir}", "ray.namespace=ppoflow-bench",
        f"generation.backend={args.backend}", f"generation.num_engines={args.engines}",
        f"generation.num_gpus={args.num_gpus}", "generation.num_cpus=0.5" if not gpu else "generation.num_cpus=1",
        "generation.kv_cache_gib=0.25", "generation.max_model_len=128",
        f"generation.weight_sync_bucket_mb={args.bucket_mb}", f"policy.num_gpus={args.num_gpus}",
        "policy.num_cpus=0.25" if not gpu else "policy.num_cpus=1", "policy.num_threads=2"])
    run_uri = str(workdir / f"run-{size}")
    store = store_of(config, run_uri)
    t0 = time.perf_counter()
    engines, _, _ = create_engines(run_uri, config)
    policy = [ray.remote(PolicyWorker).options(name=actor_name(run_uri, rank_role("policy", 0)),
                                               namespace="ppoflow-bench", num_cpus=config.policy.num_cpus,
                                               num_gpus=args.num_gpus)
              .remote(str(model), config.policy, args.dtype, 0, algo=config.algo, norm_len=8)]
    ray.get([e.ready.remote() for e in engines] + [policy[0].__ray_ready__.remote()], timeout=1800)
    log(f"{size}: {n_params / 1e6:.1f}M parameters, workers up in {time.perf_counter() - t0:.0f} s")
    ray.get(policy[0].export_hf.remote(store.policy_checkpoint(1)), timeout=1800)  # what the storage route reads
    pool, indices = EnginePool(config, run_uri, store), list(range(args.engines))
    routes = {"broadcast": pool._broadcast, "object_store": pool._via_object_store, "storage": pool._via_storage}
    rows = []
    try:
        for route in args.routes.split(","):
            times, moved = [], 0
            try:
                for _ in range(args.repeats + (route == "broadcast")):
                    t = time.perf_counter()
                    results = routes[route](policy, engines, indices, 1, None)
                    times.append(time.perf_counter() - t)
                    moved = results[0]["bytes"] or _export_bytes(store.policy_checkpoint(1))
            except Exception as err:  # noqa: BLE001 - e.g. Ray's memory monitor killing an engine: a row saying so
                log(f"{size} {route}: {type(err).__name__}: {str(err)[:300]}")
                rows.append({"size": size, "params_M": round(n_params / 1e6, 1), "MB": None, "route": route,
                             "engines": args.engines, "seconds": None, "GB_per_s": None,
                             "failed": type(err).__name__})
                break  # the engines may be gone: the next routes would fail the same way
            if route == "broadcast":
                rows.append(_row(size, n_params, f"{route} (first: builds the group)", [times.pop(0)], moved, args))
            rows.append(_row(size, n_params, route, times, moved, args))
            log(json.dumps(rows[-1]))
    finally:
        for actor in [*get_engines(run_uri, "ppoflow-bench"), *policy]:
            ray.kill(actor)
        remove_placement_group(run_uri)
    return rows


def _shapes(model: Path):
    from safetensors import safe_open

    for file in model.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for k in f.keys():
                yield f.get_slice(k).get_shape()


def _export_bytes(uri: str) -> int:
    return sum(f.stat().st_size for f in Path(uri, "hf").glob("*.safetensors"))


def _row(size, n_params, route, times, moved, args) -> dict:
    seconds = statistics.median(times)
    return {"size": size, "params_M": round(n_params / 1e6, 1), "MB": round(moved / 1e6, 1), "route": route,
            "engines": args.engines, "seconds": round(seconds, 3), "GB_per_s": round(moved / seconds / 1e9, 3)}


def main(argv=None) -> None:
    import ray

    args = parse_args(argv)
    os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(tempfile.gettempdir(), "ppoflow-vllm-cache"))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ppoflow-bench-sync-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, namespace="ppoflow-bench",
             log_to_driver=False)  # a cluster of its own, whatever else runs on the host
    try:
        link = link_gbps(args)
        log(f"link: {link:.3f} GB/s ({'NCCL' if args.num_gpus > 0 else 'gloo'} broadcast of {args.link_mb:g} MiB)")
        rows = [row for size in args.sizes.split(",") for row in bench_size(args, size, workdir, log)]
    finally:
        ray.shutdown()
    kind = "NCCL" if args.num_gpus > 0 else "gloo"
    print(f"\nweight sync, {args.backend} engines x{args.engines}, {args.dtype}, buckets {args.bucket_mb:g} MiB; "
          f"raw {kind} broadcast link: {link:.3f} GB/s")
    print(f"{'size':6} {'params':>8} {'MB':>8}  {'route':34} {'seconds':>8} {'GB/s':>7} {'of link':>7}")
    for r in rows:
        if r.get("failed"):
            print(f"{r['size']:6} {r['params_M']:>7}M {'':>8}  {r['route']:34} failed: {r['failed']}")
            continue
        print(f"{r['size']:6} {r['params_M']:>7}M {r['MB']:>8}  {r['route']:34} {r['seconds']:>8} "
              f"{r['GB_per_s']:>7} {r['GB_per_s'] / link:>7.1%}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "weight_sync.json").write_text(json.dumps({"link_GB_per_s": link, "rows": rows}))


if __name__ == "__main__":
    main()
