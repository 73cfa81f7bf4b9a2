"""Weight sync by broadcast: trainer rank 0 sends the policy, in buckets, to every engine worker over a process group
of their own (gloo on CPU, NCCL on GPU); both sides checksum a sample of the tensors.

The group is not the trainers' default torch.distributed group (DeepSpeed's, on MASTER_PORT) and is never registered
with c10d: trainer rank 0 hosts a `TCPStore` on a free port, every member wraps it in a `PrefixStore` named after the
group id and constructs a `ProcessGroupGloo` / `ProcessGroupNCCL` object directly, so the two groups cannot collide
and only the members meet (ranks: 0 = trainer rank 0, then each engine's tensor-parallel workers). The store and the
group carry a timeout, so a member that never comes (or died mid-sync) fails the others instead of hanging them.

One sync = a fixed plan (name, shape, dtype of every tensor, in order, sent once over Ray as a small JSON list), cut
into buckets of at most `bucket_mb` MiB of one dtype; each bucket is one flat buffer and one broadcast. The sender
fills a bucket (gathering its ZeRO-3 parameters only for that bucket) and the receivers unpack it into named tensors
streamed into the engine's loader, so neither side holds a second full copy of the model.

Verification: both sides sum, in float64, every tensor they send / receive (the full checksum) and report the sums of
a sample of tensors chosen by the policy version (`sample_names`); stages/sync.py compares them after each sync.

Run alone (two local processes over gloo: a random state dict sent in 1 MiB buckets arrives equal):
    .venv/bin/python -m workers.weight_sync
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TIMEOUT_S = 300.0
"""How long a member waits for the others (rendezvous, each broadcast) before failing instead of hanging."""

SAMPLE_SIZE = 8
"""Tensors per sync whose sums both sides report (plus the full checksum over every tensor)."""


def plan_of(named: dict[str, torch.Tensor | tuple]) -> list[dict]:
    """The sync plan of `{name: tensor}` (or `{name: (shape, dtype)}`), in order: `[{"name", "shape", "dtype"}]`,
    JSON-able, so it travels over Ray and vLLM's collective_rpc as it is."""
    plan = []
    for name, t in named.items():
        shape, dtype = t if isinstance(t, tuple) else (t.shape, t.dtype)
        plan.append({"name": name, "shape": [int(s) for s in shape], "dtype": str(dtype).removeprefix("torch.")})
    return plan


def buckets(plan: list[dict], bucket_mb: float) -> list[list[dict]]:
    """Consecutive plan entries grouped into buckets of one dtype and at most `bucket_mb` MiB (a larger tensor is a
    bucket of its own). Sender and receivers compute it from the same plan, so they cut it the same way."""
    import torch

    limit = bucket_mb * 2**20
    out: list[list[dict]] = []
    size = 0.0
    for entry in plan:
        nbytes = math.prod(entry["shape"]) * getattr(torch, entry["dtype"]).itemsize
        if not out or out[-1][0]["dtype"] != entry["dtype"] or size + nbytes > limit:
            out.append([])
            size = 0.0
        out[-1].append(entry)
        size += nbytes
    return out


def sample_names(plan: list[dict], version: int, k: int = SAMPLE_SIZE) -> list[str]:
    """A deterministic sample of `k` tensor names, different for each version (so successive syncs check different
    tensors), always including the first and last entries (embeddings, head) where the plan has them."""
    names = [e["name"] for e in plan]
    if len(names) <= k:
        return names
    middle = random.Random(version).sample(names[1:-1], k - 2)
    return [names[0], *middle, names[-1]]


def pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One flat buffer holding `tensors` back to back (on their device, in their dtype)."""
    import torch

    return torch.cat([t.reshape(-1) for t in tensors])


def unpack(flat: torch.Tensor, entries: list[dict]) -> list[tuple[str, torch.Tensor]]:
    """The named tensors of a bucket: views of `flat` shaped as its plan entries."""
    sizes = [math.prod(e["shape"]) for e in entries]
    return [(e["name"], part.view(e["shape"])) for e, part in zip(entries, flat.split(sizes), strict=True)]


def tensor_sum(tensor: torch.Tensor) -> float:
    """Sum of a tensor's elements in float64: the unit of both checksums."""
    import torch

    return float(tensor.sum(dtype=torch.float64))


def host_store(host: str, timeout_s: float = TIMEOUT_S):
    """The group's TCPStore server on a free port of this process (rank 0 holds it for the group's life);
    `.port` is where the other members connect."""
    from torch.distributed import TCPStore

    return TCPStore(host, 0, None, True, timedelta(seconds=timeout_s), wait_for_workers=False)


class SyncGroup:
    """This process's membership of one weight-sync group (rank 0 sends, every other rank receives)."""

    def __init__(self, group_id: str, host: str, port: int, rank: int, world_size: int, device: torch.device,
                 store=None, timeout_s: float = TIMEOUT_S):
        """`store`: rank 0's `host_store(...)`; the others connect to `host:port`. Blocks until every member has
        constructed its side (at most `timeout_s`)."""
        import torch.distributed as dist

        self.group_id, self.rank, self.world_size, self.device = group_id, rank, world_size, device
        timeout = timedelta(seconds=timeout_s)
        if store is None:
            store = dist.TCPStore(host, port, None, False, timeout)
        self._store = store  # rank 0's server must outlive the group
        prefixed = dist.PrefixStore(f"ppoflow-weight-sync/{group_id}", store)
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self._pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
        else:
            self._pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)

    def _broadcast(self, flat: torch.Tensor) -> None:
        import torch.distributed as dist

        options = dist.BroadcastOptions()
        options.rootRank = 0
        self._pg.broadcast([flat], options).wait()

    def send(self, plan: list[dict], bucket_mb: float, sample: list[str],
             tensors_of: Callable[[list[dict]], list[torch.Tensor]]) -> dict:
        """Broadcast every bucket of `plan` (rank 0). `tensors_of(entries)` gives a bucket's tensors, in order (it
        gathers ZeRO-3 parameters for just that bucket). Returns `{"bytes", "checksum", "sample_sums"}` of what was
        sent."""
        sums, sampled, sent = [], {}, 0
        wanted = set(sample)
        for entries in buckets(plan, bucket_mb):
            tensors = tensors_of(entries)
            flat = pack(tensors).to(self.device)
            for entry, t in zip(entries, tensors, strict=True):
                sums.append(tensor_sum(t))
                if entry["name"] in wanted:
                    sampled[entry["name"]] = sums[-1]
            self._broadcast(flat)
            sent += flat.numel() * flat.element_size()
        return {"bytes": sent, "checksum": math.fsum(sums), "sample_sums": sampled}

    def receive(self, plan: list[dict], bucket_mb: float, sample: list[str],
                sampled: dict[str, float]) -> Iterator[tuple[str, torch.Tensor]]:
        """The named tensors of `plan`, one bucket received at a time (ranks > 0), for an engine's loader to consume;
        the sums of the `sample` tensors go into `sampled` as they pass."""
        import torch

        wanted = set(sample)
        for entries in buckets(plan, bucket_mb):
            numel = sum(math.prod(e["shape"]) for e in entries)
            flat = torch.empty(numel, dtype=getattr(torch, entries[0]["dtype"]), device=self.device)
            self._broadcast(flat)
            for name, tensor in unpack(flat, entries):
                if name in wanted:
                    sampled[name] = tensor_sum(tensor)
                yield name, tensor

    def close(self) -> None:
        # NCCL communicators must be aborted, not left to the garbage collector, or a peer that died keeps them
        # waiting; gloo's sockets close with the object.
        abort = getattr(self._pg, "abort", None)
        if abort is not None and self.device.type == "cuda":
            abort()
        self._pg = None
        self._store = None


def verify(sent: dict, received: dict, engine: str) -> None:
    """Raise naming the engine and tensor when a receiver's sums differ from the sender's (sample sums and full
    checksum, both float64 sums of the same values: equal up to summation order)."""
    for name, value in sent["sample_sums"].items():
        got = received["sample_sums"].get(name)
        if got is None or not math.isclose(got, value, rel_tol=1e-9, abs_tol=1e-9):
            raise RuntimeError(f"weight sync: {engine} received {name} with sum {got}, the trainer sent {value}: the "
                               "engine's weights differ from the policy's (sync again; if it persists, the plan or "
                               "bucket layout differs between the two sides)")
    if "checksum" in sent and not math.isclose(received["checksum"], sent["checksum"], rel_tol=1e-9, abs_tol=1e-6):
        raise RuntimeError(f"weight sync: {engine} loaded weights with checksum {received['checksum']}, the trainer "
                           f"sent {sent['checksum']}")


def _demo_member(rank: int, port: int, plan: list[dict], out) -> None:
    import torch

    group = SyncGroup("demo", "127.0.0.1", port, rank, 2, torch.device("cpu"))
    got = {}
    out.put({name: t.numpy().copy() for name, t in group.receive(plan, 1, sample_names(plan, 1), got)})


if __name__ == "__main__":
    import multiprocessing as mp

    import torch

    weights = {f"layer{i}.weight": torch.randn(256, 300 + i) for i in range(8)}
    weights["head.bias"] = torch.randn(7)
    plan = plan_of(weights)
    store = host_store("127.0.0.1")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    receiver = ctx.Process(target=_demo_member, args=(1, store.port, plan, queue))
    receiver.start()
    sender = SyncGroup("demo", "127.0.0.1", store.port, 0, 2, torch.device("cpu"), store=store)
    result = sender.send(plan, 1, sample_names(plan, 1), lambda entries: [weights[e["name"]] for e in entries])
    received = queue.get(timeout=60)
    receiver.join(60)
    assert received.keys() == weights.keys()
    assert all(torch.equal(torch.from_numpy(received[k]), v) for k, v in weights.items())
    print(f"{len(buckets(plan, 1))} buckets, {result['bytes'] / 2**20:.1f} MiB sent; received tensors equal")
