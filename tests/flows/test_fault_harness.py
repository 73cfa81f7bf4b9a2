"""SIGKILL at every fault point, resume, and end with exactly what an uninterrupted run commits.

Four faulted runs with the config of an uninterrupted reference run, each a chain of `ppoflow train` processes: every
process is SIGKILLed at the next point of its chain's list (PPOFLOW_FAULTS lists them all, =kill;
PPOFLOW_FAULTS_ONCE_DIR makes each fire once), the next one resumes the run (same run id), and the last one runs it
to the end. Two chains checkpoint every few iterations (`checkpoint.every`), one of them killed while a checkpoint is
still being written in the background (its writer stalled at `checkpoint.writing`). After every kill the test checks
that the process died of SIGKILL at the expected point (the point's flag file, written just before the kill, is the
only new one) and records what the crash left on disk; after the last process it checks:
- every stage of every iteration is committed, and its table equals the reference's, column by column;
- no committed row lost or duplicated: sample ids unique, and the same set as the reference's, in every table;
- the final policy (HF safetensors export of the last iteration) equals the reference's;
- nothing committed was recomputed or rewritten: each stage of each iteration has exactly one `ran` event over all
  processes, and a marker, once written, keeps its bytes;
- no uncommitted folder was trusted: a stage killed before its marker ran again in the next process (a torn part file
  and a junk checkpoint file planted after the kill inside update are gone), a stage killed after it was skipped;
- each resumed process first brought its workers to the latest committed policy version: the trainers from the newest
  checkpoint that was whole at the kill, replaying every committed update after it from storage (each replay's
  losses equal to the first time's); a checkpoint cut short is never trusted;
- the engine served no generation request for a committed rollout (the last process of chain B resumes inside sync:
  zero requests), and the reward was called once per score that ran (never for a replay or a committed iteration).

Deterministic CPU mode: fp32 (configs/quickstart.yaml), fixed seeds, the HF engine (each request carries its seed;
sample i of a request is drawn from its own generator), one engine, trainer threads fixed by the config, and the
same Ray/OMP environment for every process. Within it the resumed runs are bit-identical to the reference: the
comparison is exact (tolerance 0) for every column — token ids, text, rewards, logprobs, values, advantages, loss
and gradient-norm metrics — and for every weight of the final policy. Not compared, because they record how the
run went rather than what it computed: wall-clock seconds (markers, the sync table's `seconds`), the engine actor's
name (it holds the run id) and, in the sync table, how the engine got its weights (`method`; `bytes` and `checksum`
are compared when both runs sent weights): a sync resumed after the engine was already updated finds it current,
since run start brings the engines to the committed policy. Bit-equality holds across processes on one machine and
one software stack; another CPU (other vector kernels) or other thread counts may round differently and would need a
tolerance.

Cost: every process starts four Ray actors (engine, policy, critic, reference: ~40 CPU-seconds, nearly all of it
importing torch, transformers and DeepSpeed) besides its own ~13, so the processes share one Prefect server (no
ephemeral server per process) and one Ray head per chain (`ray.address`, an operational field a resumed run may
change), and the chains and the reference run side by side (the work is CPU-bound). A
killed driver takes its actors with it (Ray ends a dead driver's job); before the next process the test waits for
their processes to exit.

The pipelined run (algo.max_staleness = 1: generate n+1 beside the trainers' work on n) has a chain of its own,
ASYNC_CHAIN, against an uninterrupted reference at S = 1 (3 iterations; the second test): killed in update 2 while
generate 3 is in flight, then after generate 3 committed and before sync 2; it costs 4 more processes, run 2 at a time.

A LoRA policy (`policy.lora`: adapter-only checkpoints, the reference being the policy with its adapter disabled)
gets a chain of its own, `test_lora_sigkill_in_update_then_resume`: killed twice in update (while checkpoint 1 is
written, and after update 2 stepped), compared bit for bit with an uninterrupted LoRA run of 2 iterations; without a
reference actor (it runs alone: `-k lora`).

`PPOFLOW_FAULT_TABLE=path.md` writes the table of docs/faults.md (point, where, on disk at the kill, what the
resume did, outcome) from what this run observed.

Run alone:  .venv/bin/pytest -q tests/flows/test_fault_harness.py
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.compute as pc
import pytest

from workers.cluster import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STAGES = ("generate", "score", "advantages", "update", "sync")
REFERENCE_ITERATIONS = 5  # the uninterrupted run; a chain of N iterations is compared with its first N

# Each point of the chains: (stage, whether the stage's marker is written when it fires, where it fires).
POINTS = {
    "run.opened": ("open-run", None, "run start: lock held, manifest written, no worker started"),
    "run.workers_started": ("start-workers", None, "run start: actors up and at the committed version, no stage"),
    "generate.start": ("generate", False, "generate, before anything is computed"),
    "generate.mid_write": ("generate", False, "Parquet write: the first of 4 part files written"),
    "generate.after_commit": ("generate", True, "generate committed (marker and event written)"),
    "score.before_marker": ("score", False, "Parquet write: every part file written, no marker"),
    "score.after_commit": ("score", True, "score committed"),
    "advantages.after_commit": ("advantages", True, "advantages committed"),
    "update.start": ("update", False, "update, before the trainers are touched"),
    "update.after_train": ("update", False, "update: both trainers stepped (in-memory state dirty), nothing saved"),
    "update.policy_saved": ("update", False, "checkpoint: the policy's DeepSpeed state copied to host memory, its "
                                             "files, the critic's state and the HF export being written"),
    "update.after_commit": ("update", True, "update committed (its checkpoint named, maybe still being written)"),
    "sync.before_engine_update": ("sync", False, "sync: new weights exported by the policy, engine not updated"),
    "sync.before_commit": ("sync", False, "sync: engine serves the new weights, no marker"),
    "sync.after_commit": ("sync", True, "sync committed"),
}

# Each chain is one faulted run: its iterations, config overrides, the points it is killed at in the order a run
# reaches them (each fires in the process after the previous one's) and points where a background writer stalls
# (storage/faults.py `stall`: a checkpoint write that never finishes). Chain A crosses iteration 1 and run start
# (policy version 0: trainers rebuilt from the base model); chain B iteration 2 (trainers and engine reloaded from
# checkpoint 1). Chains C and D checkpoint every 3 iterations: C is killed in iteration 5's generate and update
# (the trainers load checkpoint 3 and replay 4); D, every 2, right after update 2 committed while its checkpoint
# was still being written (never whole: the trainers rebuild the base model and replay 1-2).
CHAINS = {
    "chain-a": {"iterations": 2, "kills": [
        "run.opened@0", "run.workers_started@0", "generate.mid_write@1", "score.before_marker@1",
        "advantages.after_commit@1", "update.policy_saved@1", "sync.before_engine_update@1", "sync.after_commit@1"]},
    "chain-b": {"iterations": 2, "kills": [
        "generate.start@2", "generate.after_commit@2", "score.after_commit@2", "update.start@2",
        "update.after_train@2", "update.after_commit@2", "sync.before_commit@2"]},
    "chain-c": {"iterations": 5, "sets": ["checkpoint.every=3"], "kills": ["generate.start@5", "update.after_train@5"]},
    "chain-d": {"iterations": 3, "sets": ["checkpoint.every=2"], "stalls": ["checkpoint.writing@2"],
                "kills": ["update.after_commit@2"]},
}
# The pipelined run (algo.max_staleness: 1, stages/pipeline.py: generate n+1 samples from policy n-1 while the
# trainers score and update n), against an uninterrupted reference at S = 1. The first process is killed inside
# update 2 while generate 3 is in flight: stalled just before its commit, it holds a whole rollout never committed.
# The second samples rollout 3 again, commits it and update 2, and is killed at the start of sync 2 (rollout 3
# committed, the engines still at policy 1). The third finishes the run without sampling a rollout again.
ASYNC_CHAIN = {"iterations": 3, "stalls": ["generate.before_commit@3"], "kills": ["update.after_train@2",
                                                                                  "sync.start@2"]}
TORN_AFTER = "update.after_train@2"  # after this kill, plant a torn part file and a junk checkpoint file

COUNTED_REWARD = '''
import os

from ppoflow.tasks.arith import reward as arith


def reward(prompts, responses, metadata):
    """The quickstart's reward, each call counted in a file (the chain's)."""
    with open(os.environ["PPOFLOW_TEST_REWARD_CALLS"], "a") as f:
        f.write(".")
    return arith(prompts, responses, metadata)
'''





def _session_processes(sid: int) -> list:
    import psutil

    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                out.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return out


class Background:
    """A server in its own session (so that everything it starts can be reaped), with its output in a log."""

    def __init__(self, args: list[str], env: dict, log: Path, reap):
        self.log, self.reap = log, reap
        with log.open("w") as out:
            self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait_for(self, ready, what: str, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert self.proc.poll() is None, f"{what} exited: {self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{what} not ready in {timeout_s} s: {self.log.read_text()[-3000:]}"
            time.sleep(0.5)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self.reap(self.proc.pid)


class RayHead(Background):
    """`ray start --head` on loopback: the drivers of one chain join it (ray.address), so no process pays a Ray
    start-up. Actors inherit its environment: OMP_WAIT_POLICY=PASSIVE and GOMP_SPINCOUNT=0 keep idle torch threads
    from spinning on the 2 cores (the same for the reference and the faulted runs, so the arithmetic is the same)."""

    INFRA = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")

    def __init__(self, home: Path, env: dict, reap):
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        super().__init__([str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                          "--port", str(port), "--num-cpus", "4", "--include-dashboard", "false",
                          "--dashboard-agent-listen-port", str(free_port()),
                          "--ray-client-server-port", str(free_port()), "--disable-usage-stats"],
                         env, home / "ray-head.log", reap)

    def actor_processes(self) -> list[str]:
        """Worker processes hosting an actor (Ray titles them `ray::Class` or `ray::name:Class.method`)."""
        import psutil

        out = []
        for p in _session_processes(self.proc.pid):
            try:
                title = " ".join(p.cmdline())
            except psutil.Error:
                continue
            if title.startswith("ray::") and not title.startswith(self.INFRA):
                out.append(title)
        return out

    def wait_actors_gone(self, timeout_s: float = 120) -> None:
        """Ray ends the actors of a driver that died; the next process must not find them by name."""
        deadline = time.monotonic() + timeout_s
        while (left := self.actor_processes()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"actors of a killed driver still alive after {timeout_s} s: {left}"


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory, reap_session):
    """One Prefect API for every `ppoflow train` process of this module (each would otherwise start its own)."""
    home = tmp_path_factory.mktemp("prefect-api")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = Background([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                         "--no-ui", "--no-services"], env, home / "server.log", reap_session)

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        server.wait_for(healthy, "prefect server")
        yield {"PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_HOME": str(home / "client")}
    finally:
        server.stop()


def _snapshot(run: Path) -> dict:
    """What is on disk: committed markers (bytes), uncommitted stage folders and checkpoint folders (file names)."""
    out = {"markers": {}, "uncommitted": {}, "checkpoints": {}}
    for stage_dir in sorted(run.glob("iter-*/*")):
        key = f"{stage_dir.parent.name}/{stage_dir.name}"
        if (stage_dir / "_SUCCESS.json").exists():
            out["markers"][key] = (stage_dir / "_SUCCESS.json").read_bytes()
        else:
            out["uncommitted"][key] = sorted(p.name for p in stage_dir.iterdir())
    for ckpt in sorted(run.glob("checkpoints/iter-*")):
        out["checkpoints"][ckpt.name] = sorted(p.name for p in ckpt.iterdir())
    return out


class Chain:
    """One run trained by successive `ppoflow train` processes, each killed at its next fault point."""

    def __init__(self, name: str, spec: dict, root: Path, base_args: list[str], env: dict, reap):
        self.name, self.points, self.root, self.reap = name, spec["kills"], root, reap
        self.stalls, self.iterations = spec.get("stalls", []), spec["iterations"]
        self.run = root / name
        self.once = root / f"faults-{name}"
        self.reward_calls = root / f"reward-calls-{name}"
        (root / f"ray-{name}").mkdir(parents=True)  # the head's files beside the run, not in it
        self.head = RayHead(root / f"ray-{name}", env, reap)
        self.args = [*base_args, "--run-id", name, "--set", f"iterations={self.iterations}",
                     *(a for s in spec.get("sets", []) for a in ("--set", s))]
        faults = [f"{p}=kill" for p in self.points] + [f"{p}=stall" for p in self.stalls]
        self.env = {**env, "PPOFLOW_FAULTS": ",".join(faults), "PPOFLOW_FAULTS_ONCE_DIR": str(self.once),
                    "PPOFLOW_TEST_REWARD_CALLS": str(self.reward_calls)}
        self.lives: list[dict] = []  # per process: pid, expected point, rc, fired flags, snapshot after it ended
        self.error: str | None = None

    def train(self) -> None:
        self.head.wait_for(lambda: "--block" in self.head.log.read_text(), f"ray head of {self.name}")
        for k in range(len(self.points) + 1):
            expected = self.points[k] if k < len(self.points) else None
            log = self.root / f"{self.name}-{k:02d}.log"
            started = time.monotonic()
            with log.open("w") as out:
                proc = subprocess.Popen([sys.executable, "-m", "ppoflow.cli", "train", *self.args,
                                         "--set", f"ray.address={self.head.address}"], cwd=REPO, env=self.env,
                                        stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
                try:
                    proc.wait(timeout=600)
                finally:
                    self.reap(proc.pid)
            self.head.wait_actors_gone()
            fired = sorted(p.name for p in self.once.iterdir()) if self.once.exists() else []
            life = {"pid": proc.pid, "expected": expected, "rc": proc.returncode, "log": str(log),
                    "fired": fired, "seconds": round(time.monotonic() - started, 1), "after": _snapshot(self.run)}
            self.lives.append(life)
            ok_rc = -signal.SIGKILL if expected else 0
            # the stalls fire in the first process (their writer never finishes), the kills one per process
            if proc.returncode != ok_rc or fired != sorted(self.stalls + self.points[:k + 1 if expected else None]):
                self.error = (f"{self.name} process {k} (expected {expected or 'to finish'}): rc {proc.returncode}, "
                              f"fired {fired}\n{log.read_text()[-4000:]}")
                return
            if expected == TORN_AFTER:  # what a crash during the writes would leave, planted by hand as well
                n = int(expected.rsplit("@", 1)[1])
                stage = self.run / f"iter-{n:06d}" / "update"
                stage.mkdir(exist_ok=True)
                (stage / "part-00000.parquet").write_bytes(b"PAR1 torn")
                (self.run / "checkpoints" / f"iter-{n:06d}" / "policy").mkdir(parents=True, exist_ok=True)
                (self.run / "checkpoints" / f"iter-{n:06d}" / "policy" / "junk").write_bytes(b"half a checkpoint")

    def events(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted((self.run / "events").iterdir())]


def _reference(root: Path, base_args: list[str], env: dict, reap, run_id: str = "reference",
               iterations: int = REFERENCE_ITERATIONS) -> dict:
    """The uninterrupted run: every iteration checkpointed, in full, and none deleted, so each chain's last
    iteration has an HF export to compare its final weights with."""
    (root / f"{run_id}-head").mkdir()
    env = {**env, "PPOFLOW_TEST_REWARD_CALLS": str(root / f"reward-calls-{run_id}")}
    head = RayHead(root / f"{run_id}-head", env, reap)
    try:
        head.wait_for(lambda: "--block" in head.log.read_text(), f"ray head of {run_id}")
        log = root / f"{run_id}.log"
        started = time.monotonic()
        with log.open("w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "ppoflow.cli", "train", *base_args, "--run-id",
                                     run_id, "--set", f"iterations={iterations}",
                                     "--set", "checkpoint.every=1", "--set", "storage.keep_checkpoints=null",
                                     "--set", f"ray.address={head.address}"], cwd=REPO, env=env,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                proc.wait(timeout=600)
            finally:
                reap(proc.pid)
        return {"rc": proc.returncode, "log": log, "seconds": round(time.monotonic() - started, 1)}
    finally:
        head.stop()


def _table(run: Path, n: int, stage: str):
    from storage.run import RunStore

    return RunStore(str(run)).read_stage(n, stage)


def _point(point: str) -> tuple[str, int]:
    name, _, n = point.partition("@")
    return name, int(n)


def _base(tmp_path: Path, tiny_model_dir: str, prompts_dir: str, test_scale: list[str], prefect_server: dict,
          *sets: str) -> tuple[list[str], dict]:
    """The `ppoflow train` arguments every process of a test shares (the quickstart at test scale, the HF engine, the
    counted reward, `sets`), and their environment."""
    (tmp_path / "rewards").mkdir()
    (tmp_path / "rewards" / "counted_reward.py").write_text(COUNTED_REWARD)
    base_args = ["--config", "configs/quickstart.yaml",
                 "--set", f"model.path={tiny_model_dir}", "--set", f"data.prompts={prompts_dir}/train.jsonl",
                 "--set", "eval.prompts=null", "--set", f"storage.root={tmp_path}",
                 "--set", "generation.backend=hf", "--set", "storage.rows_per_part=8",  # 32-row tables: 4 part files
                 "--set", "reward.fn=counted_reward:reward", *(a for s in [*test_scale, *sets] for a in ("--set", s))]
    # RAY_AUTH_MODE: a `ray start` head would make a token that the drivers lack; these heads listen on loopback.
    # GOMP_SPINCOUNT=0: the chains and the reference run side by side, so no actor has the cores to itself.
    env = {**os.environ, **prefect_server, "RAY_AUTH_MODE": "disabled", "OMP_WAIT_POLICY": "PASSIVE",
           "GOMP_SPINCOUNT": "0", "PYTHONPATH": os.pathsep.join(
               [str(tmp_path / "rewards"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    for var in ("PPOFLOW_FAULTS", "PPOFLOW_FAULTS_ONCE_DIR"):
        env.pop(var, None)
    return base_args, env


def test_sigkill_at_every_fault_point_then_resume(tmp_path, tiny_model_dir, prompts_dir, reap_session, test_scale,
                                                  prefect_server):
    assert len({_point(p)[0] for spec in CHAINS.values() for p in spec["kills"]}) >= 15
    base_args, env = _base(tmp_path, tiny_model_dir, prompts_dir, test_scale, prefect_server)

    started, chains = time.monotonic(), []
    try:
        for name, spec in CHAINS.items():
            chains.append(Chain(name, spec, tmp_path, base_args, env, reap_session))
        with ThreadPoolExecutor(len(chains) + 1) as pool:
            reference = pool.submit(_reference, tmp_path, base_args, env, reap_session)
            for f in [pool.submit(c.train) for c in chains]:
                f.result()
            reference = reference.result()
    finally:
        for c in chains:
            c.head.stop()
    wall = time.monotonic() - started
    print(f"\nfault harness: {sum(len(c.lives) for c in chains)} faulted processes + the reference in {wall:.0f} s "
          f"(reference {reference['seconds']} s; " + "; ".join(
              f"{c.name}: " + " ".join(str(life["seconds"]) for life in c.lives) for c in chains) + ")")
    assert reference["rc"] == 0, reference["log"].read_text()[-4000:]
    for c in chains:
        assert c.error is None, c.error

    ref = tmp_path / "reference"
    rows = []
    for c in chains:
        _check_equal_to_reference(c.run, ref, c.iterations)
        rows += _check_lives(c)
    table = _outcome_table(rows)
    print(table)
    if out := os.environ.get("PPOFLOW_FAULT_TABLE"):
        Path(out).write_text(table)


def _check_equal_to_reference(run: Path, ref: Path, iterations: int) -> None:
    """Every committed table equals the reference's, column by column and exactly; no row lost or duplicated; the
    final policy's weights are equal to the reference's at that iteration."""
    from safetensors.numpy import load_file

    for n in range(1, iterations + 1):
        for stage in STAGES:
            got, want = _table(run, n, stage), _table(ref, n, stage)
            assert got.schema.equals(want.schema), (run.name, n, stage)
            assert got.num_rows == want.num_rows, (run.name, n, stage, got.num_rows, want.num_rows)
            if "sample_id" in got.column_names:
                ids = got["sample_id"].to_pylist()
                assert len(set(ids)) == len(ids), f"{run.name} iter {n} {stage}: duplicated sample ids"
                assert sorted(ids) == sorted(want["sample_id"].to_pylist()), f"{run.name} iter {n} {stage}: rows lost"
            skip = {"engine", "seconds", "method", "bytes", "checksum"} if stage == "sync" else set()
            for column in got.column_names:
                if column in skip:
                    continue
                # Exact: null where null, the same float bits (NaN never occurs in these columns).
                assert got[column].equals(want[column]), f"{run.name} iter {n} {stage}.{column} differs"
            if stage == "sync":  # engine actors are named after the run: compare their index
                assert [e.rsplit(":", 1)[1] for e in got["engine"].to_pylist()] == [
                    e.rsplit(":", 1)[1] for e in want["engine"].to_pylist()]
                assert pc.all(pc.equal(got["policy_version"], n)).as_py()
                for g, w in zip(got.to_pylist(), want.to_pylist()):  # the same weights went over, when they did
                    if g["method"] == w["method"] == "object_store":
                        assert (g["bytes"], g["checksum"]) == (w["bytes"], w["checksum"]), (run.name, n, g, w)
    last = f"checkpoints/iter-{iterations:06d}/hf"
    got_w = {k: v for f in sorted((run / last).glob("*.safetensors")) for k, v in load_file(f).items()}
    want_w = {k: v for f in sorted((ref / last).glob("*.safetensors")) for k, v in load_file(f).items()}
    assert got_w.keys() == want_w.keys() and got_w
    for name, tensor in want_w.items():
        assert got_w[name].dtype == tensor.dtype and (got_w[name] == tensor).all(), f"{run.name}: weight {name}"


def _check_lives(chain: Chain) -> list[dict]:
    """Per killed process: what was on disk, what the next process did. Returns one docs-table row per point."""
    events = chain.events()
    by_pid: dict[int, list[dict]] = {}
    for e in events:
        by_pid.setdefault(e["pid"], []).append(e)

    ran = [(e["stage"], e["iteration"]) for e in events if e["action"] == "ran"]
    want = [(s, n) for n in range(1, chain.iterations + 1) for s in STAGES]
    assert sorted(ran) == sorted(want), f"{chain.name}: each stage must run (commit) exactly once: {sorted(ran)}"

    rows, seen_markers = [], {}
    for k, life in enumerate(chain.lives):
        for key, data in life["after"]["markers"].items():  # a marker, once written, never changes
            assert seen_markers.setdefault(key, data) == data, f"{chain.name}: {key} marker rewritten"
        if life["expected"] is None:
            continue
        name, n = _point(life["expected"])
        stage, committed, where = POINTS[name]
        after, nxt = life["after"], chain.lives[k + 1]
        mine = by_pid.get(nxt["pid"], [])
        started = [e for e in mine if e["stage"] == "workers" and e["action"] == "started"]
        committed_update = max([int(key[5:11]) for key in after["markers"] if key.endswith("/update")], default=0)
        assert started and started[0]["policy_version"] == committed_update, (chain.name, life["expected"], started)
        # The trainers came back from the newest checkpoint that was whole at the kill, replaying the committed
        # updates after it from storage, each to the same losses as the first time.
        base = max([m for m in range(1, committed_update + 1) if _checkpoint_whole(after, m)], default=0)
        replayed = [e for e in mine if e["action"] == "replayed"]
        assert [(e["iteration"], e["from_checkpoint"]) for e in replayed] == \
            [(m, base) for m in range(base + 1, committed_update + 1)], (chain.name, life["expected"], replayed)
        assert all(e["max_metric_diff"] == 0.0 for e in replayed), replayed

        key = f"iter-{n:06d}/{stage}"
        if stage in STAGES:
            assert (key in after["markers"]) == committed, (chain.name, life["expected"], after)
            action = {(e["stage"], e["iteration"]): e["action"] for e in mine
                      if e.get("iteration") == n and e["action"] in ("ran", "skipped")}
            if name == "sync.after_commit":  # the iteration is complete: the next process starts at the next one
                assert not action, (chain.name, life["expected"], action)
            elif committed:
                assert action.get((stage, n)) == "skipped", (chain.name, life["expected"], action)
            else:  # entered again (it ran, or the next process died inside it too): never trusted half-done
                assert action.get((stage, n)) != "skipped", (chain.name, life["expected"], action)
        if name == "generate.mid_write":
            assert after["uncommitted"][key] == ["part-00000.parquet"], after
        if name == "score.before_marker":
            assert after["uncommitted"][key] == [f"part-{i:05d}.parquet" for i in range(4)], after
        if name == "update.policy_saved":
            assert "policy" in after["checkpoints"][f"iter-{n:06d}"] and key not in after["markers"], after
        if chain.stalls and name == "update.after_commit":  # killed while its checkpoint was being written
            folder = after["checkpoints"][f"iter-{n:06d}"]
            assert not _checkpoint_whole(after, n) and "_SUCCESS.json" not in folder, folder
            assert not _checkpoint_whole(_snapshot(chain.run), n)  # and it never will be: nothing trusts half of it
        if life["expected"] == TORN_AFTER:
            assert not (chain.run / "checkpoints" / f"iter-{n:06d}" / "policy" / "junk").exists()
            assert (chain.run / key / "part-00000.parquet").read_bytes() != b"PAR1 torn"
            assert key in chain.lives[-1]["after"]["markers"]
        on_disk, notes = _on_disk(after, n, stage), []
        if life["expected"] == TORN_AFTER:
            on_disk += " (then planted by the test: a torn `part-00000.parquet` and a junk checkpoint file)"
            notes.append("the torn file and the junk are gone")
        if stage == "sync" and not committed:
            notes.append(f"its sync row says `{', '.join(_table(chain.run, n, 'sync')['method'].to_pylist())}`")
        resume = _resume(mine, started[0], notes, nxt["expected"])
        rows.append({"point": life["expected"], "where": where, "chain": chain.name, "on_disk": on_disk,
                     "resume": resume})

    # The last process: the engine served no generation request for a rollout that was already committed.
    final = by_pid[chain.lives[-1]["pid"]]
    stopped = [e for e in final if e["stage"] == "workers" and e["action"] == "stopped"]
    assert len(stopped) == 1, (chain.name, final)
    stopped = stopped[0]
    generated = [e["iteration"] for e in final if e["stage"] == "generate" and e["action"] == "ran"]
    requests = sum(json.loads((chain.run / f"iter-{n:06d}" / "generate" / "_SUCCESS.json").read_text())
                   ["engine_requests"] for n in generated)
    assert stopped["engine"]["requests"] == requests, (chain.name, stopped, generated)
    # The reward was called once per score stage that ran: none for a replay, none for a committed iteration (a
    # score killed before its marker runs again, calling it again).
    rescored = sum(1 for p in chain.points if POINTS[_point(p)[0]][0] == "score" and not POINTS[_point(p)[0]][1])
    assert len(chain.reward_calls.read_text()) == chain.iterations + rescored, chain.name
    return rows


def _checkpoint_whole(snapshot: dict, n: int) -> bool:
    """Whether checkpoint `n` was whole on disk in `snapshot` (storage/run.py checkpoint_complete): its update
    committed, and every part that update names written (its `_PART-*.json`), or its `_SUCCESS.json` there."""
    marker = snapshot["markers"].get(f"iter-{n:06d}/update")
    ckpt = json.loads(marker).get("checkpoint") if marker else None
    names = snapshot["checkpoints"].get(f"iter-{n:06d}", [])
    return bool(ckpt) and ckpt.get("state", True) and (
        "_SUCCESS.json" in names or all(f"_PART-{part}.json" in names for part in ckpt["parts"]))


def _on_disk(after: dict, n: int, stage: str) -> str:
    """What the crash left of the killed stage (or of the run, for run-start points)."""
    if stage not in STAGES:
        committed = f"{len(after['markers'])} stages committed" if after["markers"] else "no stage folder"
        return f"`run.json`, the dead process's `_LOCK.json`; {committed}"
    key = f"iter-{n:06d}/{stage}"
    parts = []
    if key in after["uncommitted"]:
        files = after["uncommitted"][key]
        parts.append(f"`{key}/` uncommitted: {len(files)} part file{'s' * (len(files) != 1)}, no marker")
    if stage == "update" and (ckpt := after["checkpoints"].get(f"iter-{n:06d}")) and key not in after["markers"]:
        parts.append(f"checkpoint `iter-{n:06d}/` uncommitted: {', '.join(ckpt)}")
    if key in after["markers"]:
        parts.append(f"`{key}` committed")
    return "; ".join(parts) or "nothing of the stage"


def _resume(events: list[dict], started: dict, notes: list[str], killed_at: str | None) -> str:
    """What the next process did, from its events: workers restored to version V, stages skipped / re-run, and
    where it was killed in turn."""
    skipped = [f"{e['stage']}@{e['iteration']}" for e in events if e["action"] == "skipped"]
    ran = [f"{e['stage']}@{e['iteration']}" for e in events if e["action"] == "ran"]
    out = [f"workers at version {started['policy_version']}"]
    if skipped:
        out.append("skipped " + ", ".join(skipped))
    if ran:
        out.append("ran " + ", ".join(ran))
    out += notes
    out.append(f"killed at `{killed_at}`" if killed_at else "finished the run")
    return "; ".join(out)


def _outcome_table(rows: list[dict]) -> str:
    order = list(POINTS)
    rows = sorted(rows, key=lambda r: (_point(r["point"])[1], order.index(_point(r["point"])[0])))
    lines = ["| fault point | where it fires | on disk at the kill | what the next process did | outcome |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['point']}` | {r['where']} | {r['on_disk']} | {r['resume']} | "
                     f"{r['chain']}: finished; tables and final weights bit-equal to the reference |")
    return "\n".join(lines) + "\n"


def test_sigkill_while_generate_and_update_overlap_then_resume(tmp_path, tiny_model_dir, prompts_dir, reap_session,
                                                              test_scale, prefect_server):
    """ASYNC_CHAIN against its reference: the same tables and final weights, bit for bit; every stage committed once;
    the rollout in flight at the first kill sampled again once, the committed one never (request counters)."""
    base_args, env = _base(tmp_path, tiny_model_dir, prompts_dir, test_scale, prefect_server, "algo.max_staleness=1")
    started, chain = time.monotonic(), Chain("chain-async", ASYNC_CHAIN, tmp_path, base_args, env, reap_session)
    try:
        with ThreadPoolExecutor(2) as pool:
            reference = pool.submit(_reference, tmp_path, base_args, env, reap_session, "reference-async", 3)
            pool.submit(chain.train).result()
            reference = reference.result()
    finally:
        chain.head.stop()
    print(f"\nasync fault chain: {len(chain.lives)} processes + the reference in {time.monotonic() - started:.0f} s "
          f"(reference {reference['seconds']} s; {' '.join(str(life['seconds']) for life in chain.lives)})")
    assert reference["rc"] == 0, reference["log"].read_text()[-4000:]
    assert chain.error is None, chain.error
    _check_equal_to_reference(chain.run, tmp_path / "reference-async", 3)
    assert [set(_table(chain.run, n, "generate")["staleness"].to_pylist()) for n in (1, 2, 3)] == [{0}, {1}, {1}]

    events = chain.events()
    ran = [(e["stage"], e["iteration"]) for e in events if e["action"] == "ran"]
    assert sorted(ran) == sorted((s, n) for n in (1, 2, 3) for s in STAGES), ran
    by_pid: dict[int, list[dict]] = {}
    for e in events:
        by_pid.setdefault(e["pid"], []).append(e)
    first, second, last = chain.lives
    committed = [set(life["after"]["markers"]) for life in chain.lives]
    # Killed in update 2, rollout 3 sampled but not committed; score and advantages 2 committed beside it.
    assert {"iter-000002/score", "iter-000002/advantages"} <= committed[0], committed[0]
    assert not {"iter-000002/update", "iter-000003/generate"} & committed[0], committed[0]
    # Killed after rollout 3 committed, before sync 2: the process that committed it sampled it.
    assert {"iter-000002/update", "iter-000003/generate"} <= committed[1] and "iter-000002/sync" not in committed[1]
    assert ("generate", 3) in [(e["stage"], e["iteration"]) for e in by_pid[second["pid"]] if e["action"] == "ran"]
    # The last process sampled no rollout (generate 3 skipped); its engine served only the syncs' gate probes.
    final = by_pid[last["pid"]]
    assert ("generate", 3, "skipped") in [(e["stage"], e.get("iteration"), e["action"]) for e in final]
    synced = [e["iteration"] for e in final if e["stage"] == "sync" and e["action"] == "ran"]
    assert synced == [2, 3] and not [e for e in final if e["stage"] == "generate" and e["action"] == "ran"]
    probes = sum(json.loads((chain.run / f"iter-{n:06d}" / "sync" / "_SUCCESS.json").read_text())["engine_requests"]
                 for n in synced)
    stopped = [e for e in final if e["stage"] == "workers" and e["action"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["engine"]["requests"] == probes > 0, (stopped, probes)
    assert len(chain.reward_calls.read_text()) == 3  # each iteration scored once: nothing scored again


LORA_SETS = ["policy.lora.rank=8", "policy.lr=2e-3"]
"""The LoRA chain's and its reference's config: a LoRA policy (adapter-only checkpoints, the reference being the
policy with its adapter disabled, merged weights synced). GAE as in the other chains: the random-init model earns no
reward, and only the critic's values give its adapter nonzero advantages to learn from (a group estimator would
leave B at 0 and the comparison empty)."""

LORA_CHAIN = {"iterations": 2, "kills": ["update.policy_saved@1", TORN_AFTER]}
"""Killed twice in update: while checkpoint 1 (the adapter and its optimizer state) is being written, and after the
second update stepped the adapter (in-memory state dirty, then a torn part file and junk planted)."""


def test_lora_sigkill_in_update_then_resume(tmp_path, tiny_model_dir, prompts_dir, reap_session, test_scale,
                                            prefect_server):
    """The same checks as above for a LoRA policy: a chain killed in update resumes to tables and a final adapter
    bit-equal to an uninterrupted LoRA run's (the trainers reload adapter-only checkpoints onto the base weights and
    replay the committed updates). Three processes and a 2-iteration reference, three actors each (engine, policy,
    critic: no reference)."""
    base_args, env = _base(tmp_path, tiny_model_dir, prompts_dir, test_scale, prefect_server, *LORA_SETS)
    started = time.monotonic()
    chain = Chain("chain-lora", LORA_CHAIN, tmp_path, base_args, env, reap_session)
    try:
        with ThreadPoolExecutor(2) as pool:
            reference = pool.submit(_reference, tmp_path, base_args, env, reap_session, "reference-lora",
                                    LORA_CHAIN["iterations"])
            pool.submit(chain.train).result()
            reference = reference.result()
    finally:
        chain.head.stop()
    print(f"\nLoRA fault chain: {len(chain.lives)} processes + the reference in {time.monotonic() - started:.0f} s")
    assert reference["rc"] == 0, reference["log"].read_text()[-4000:]
    assert chain.error is None, chain.error
    ref = tmp_path / "reference-lora"
    assert not (ref / "logs" / "reference.log").exists()  # no reference actor: the policy is its own reference
    last = ref / "checkpoints" / f"iter-{LORA_CHAIN['iterations']:06d}"
    assert (last / "hf" / "adapter_model.safetensors").exists() and (last / "merged" / "model.safetensors").exists()
    from safetensors.numpy import load_file

    adapter = load_file(last / "hf" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and (v != 0).any() for k, v in adapter.items())  # B left 0: it trained
    _check_equal_to_reference(chain.run, ref, chain.iterations)  # the final adapter's weights, bit for bit
    _check_lives(chain)
