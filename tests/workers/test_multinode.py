"""Placement across Ray nodes: `ray.engines` / `ray.trainers` layouts, and runs on a real two-node cluster.

Fast: the placement groups a config asks for (strategy and custom resources per group), the fields' validation, the
storage probe. Slow: one module fixture starts a two-node Ray cluster on this machine — `ray start --head` with the
custom resource `engine_node`, then `ray start --address HEAD` with `trainer_node`, each in a process session of its
own on loopback — and tears both down at the end (their sessions killed; the test checks that no process of either
is left). Each run is a `ppoflow train` process joining it through `ray.address`:
- a 2-iteration PPO run whose engine is pinned to the head node and whose trainers to the other
  (`ray.engines.resources`, `ray.trainers.resources`): the test watches both nodes' processes while it trains and
  checks which node hosted each actor; weights go from the trainer to the engine by broadcast (gloo, across nodes);
  the storage root is a local folder declared shared (`ray.shared_filesystem`; on one machine it is) and verified;
- the same run on a node-local root without the declaration: refused with the error naming storage.root before any
  worker starts, with nothing stored written or changed.

Run alone:  .venv/bin/pytest -q tests/workers/test_multinode.py      (fast part: -m "not slow")
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from workers.cluster import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
MODEL_ACTORS = ("HFEngine", "PolicyWorker", "CriticWorker", "ReferenceWorker")  # Ray titles actor processes ray::Class


def _config(*overrides: str):
    from stages.config import load_config

    return load_config(QUICKSTART, ["model.path=models/tiny", "storage.root=/tmp/unused", *overrides])


# --- layouts and config (no Ray) ---------------------------------------------------------------------------------

def test_each_group_gets_its_strategy_and_custom_resources():
    from workers.engines import plan_layout

    pinned = ("ray.engines={strategy: SPREAD, resources: {engine_node: 0.001}}",
              "ray.trainers={strategy: STRICT_PACK, resources: {trainer_node: 1}}")
    single = plan_layout(_config(*pinned, "generation.num_engines=2"))
    assert single.bundles == [{"CPU": 0.5, "engine_node": 0.001}] * 2 and single.strategy == "SPREAD"
    # single trainers are scheduled one by one (no group), each asking for the custom resources
    assert single.trainer_group == [] and single.trainer_custom == {"trainer_node": 1}

    groups = plan_layout(_config(*pinned, "policy.num_ranks=2", "policy.micro_batch_size=16"))
    assert groups.bundles == [{"CPU": 0.5, "engine_node": 0.001}]
    assert groups.trainer_group == [{"CPU": 0.75, "trainer_node": 1}, {"CPU": 0.25, "trainer_node": 1}]
    assert groups.trainer_strategy == "STRICT_PACK" and groups.trainer_bundles == [0, 1]

    # hybrid: one group; a bundle shared by an engine and trainers asks for both groups' resources
    hybrid = plan_layout(_config("generation.placement=hybrid", "generation.num_engines=2", "algo.estimator=rloo",
                                 "ray.engines={strategy: SPREAD, resources: {gpu_node: 1}}",
                                 "ray.trainers.resources={trainer_node: 1}"))
    assert hybrid.bundles == [{"CPU": 1.0, "gpu_node": 1, "trainer_node": 1}, {"CPU": 0.5, "gpu_node": 1}]
    assert hybrid.strategy == "SPREAD" and hybrid.trainer_group == []
    with pytest.raises(ValueError, match=r"ray.trainers.strategy: SPREAD .* set ray.engines.strategy instead"):
        plan_layout(_config("generation.placement=hybrid", "ray.trainers.strategy=SPREAD"))

    # nothing set: the single-node layouts of before (tests/workers/test_engine_group.py)
    plain = plan_layout(_config())
    assert plain.bundles == [{"CPU": 0.5}] and plain.strategy == "PACK" and plain.trainer_custom == {}


@pytest.mark.parametrize(("override", "field", "words"), [
    ("ray.engines.strategy=SCATTER", "ray.engines.strategy", "'PACK', 'SPREAD', 'STRICT_PACK' or 'STRICT_SPREAD'"),
    ("ray.trainers.resources={GPU: 1}", "ray.trainers.resources", "come from the num_cpus / num_gpus fields"),
    ("ray.engines.resources={engine_node: 0}", "ray.engines.resources", "amounts must be > 0"),
    ("ray.trainers.nodes=2", "ray.trainers.nodes", "unknown key"),
])
def test_placement_fields_are_validated_naming_the_field(override, field, words):
    from stages.config import ConfigError

    with pytest.raises(ConfigError) as err:
        _config(override)
    assert f"{field}: " in str(err.value) and words in str(err.value)


def test_ray_fields_are_operational_so_a_run_can_move_to_a_cluster():
    # A run started on one machine resumes on a cluster: placement and the shared-filesystem declaration may change.
    base = _config()
    moved = _config("ray.address=head:6379", "ray.shared_filesystem=true", "ray.engines.resources={gpu_node: 1}")
    assert moved.config_hash() == base.config_hash()


def test_probe_is_seen_where_written_and_leaves_nothing(tmp_path):
    from storage.probe import SharedProbe, is_local

    (tmp_path / "runs").mkdir()
    probe = SharedProbe(str(tmp_path))
    assert probe.seen_here() and Path(probe.folder).parent == tmp_path
    probe.remove()
    assert not probe.seen_here() and [p.name for p in tmp_path.iterdir()] == ["runs"]
    assert is_local(str(tmp_path)) and is_local("runs") and not is_local("memory://x")


# --- a real two-node cluster --------------------------------------------------------------------------------------



def _session_titles(sid: int) -> list[str]:
    """Command lines of every live process of a session (a Ray node and everything its raylet started)."""
    import psutil

    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                out.append(" ".join(p.cmdline()))
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return out


class Node:
    """One `ray start --block` in its own process session: its raylet and workers are the session's processes."""

    def __init__(self, name: str, args: list[str], env: dict, logs: Path):
        self.name, self.log = name, logs / f"ray-{name}.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen([str(BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1",
                                          "--disable-usage-stats", "--dashboard-agent-listen-port", str(free_port()),
                                          *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while "--block" not in self.log.read_text():  # printed once the node is up
            assert self.proc.poll() is None, f"ray node {self.name} exited: {self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"ray node {self.name} not up in {timeout_s} s"
            time.sleep(0.3)

    def actors(self) -> set[str]:
        """Model actors (engine, trainers) whose process runs on this node right now."""
        return {cls for title in _session_titles(self.proc.pid) if title.startswith("ray::")
                for cls in MODEL_ACTORS if cls in title}

    def wait_actors_gone(self, timeout_s: float = 120) -> None:
        """Ray ends the actors of a driver that exited; their processes take a moment to go."""
        deadline = time.monotonic() + timeout_s
        while (left := self.actors()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"actors of a finished run still alive on node {self.name} after {timeout_s} s: {left}"

    def stop(self, reap) -> None:
        self.proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes on SIGTERM
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        reap(self.proc.pid)  # and whatever is left of them is killed


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, reap_session):
    """A head (engine_node: 4) and a second node (trainer_node: 4) joined to it, 2 logical CPUs each, and one Prefect
    server for the module's `ppoflow train` processes (each would otherwise start its own), started first so that it
    comes up while the nodes do."""
    import urllib.request

    logs = tmp_path_factory.mktemp("multinode-logs")
    prefect_port = free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    with (logs / "prefect-server.log").open("w") as out:
        server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                   str(prefect_port), "--no-ui", "--no-services"],
                                  env={**os.environ, "PREFECT_HOME": str(logs / "prefect"),
                                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    temp = tempfile.mkdtemp(prefix="ppf-ray-")  # short: Ray's socket paths live under it
    # RAY_AUTH_MODE: `ray start` would make a token that the drivers lack; these nodes listen on loopback.
    # OMP_WAIT_POLICY, GOMP_SPINCOUNT: the nodes share the 2 cores, so no actor's threads may spin on them.
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(logs / "prefect-client"),
           "RAY_AUTH_MODE": "disabled", "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}
    port = free_port()
    nodes = []
    try:
        nodes.append(Node("head", ["--head", "--port", str(port), "--num-cpus", "2", "--resources",
                                   '{"engine_node": 4}', "--include-dashboard", "false", "--ray-client-server-port",
                                   str(free_port()), "--temp-dir", temp], env, logs))
        nodes[0].wait_ready()
        nodes.append(Node("worker", ["--address", f"127.0.0.1:{port}", "--num-cpus", "2", "--resources",
                                     '{"trainer_node": 4}', "--temp-dir", temp], env, logs))
        nodes[1].wait_ready()
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, \
                (logs / "prefect-server.log").read_text()[-3000:]
            time.sleep(0.5)
        yield {"address": f"127.0.0.1:{port}", "head": nodes[0], "worker": nodes[1], "env": env}
    finally:
        for node in reversed(nodes):
            node.stop(reap_session)
        reap_session(server.pid)
        left = {node.name: _session_titles(node.proc.pid) for node in nodes}
        subprocess.run(["rm", "-rf", temp], check=False)
        assert not any(left.values()), f"processes of the Ray nodes left after teardown: {left}"


def _train(cluster, args: list[str], log: Path, reap) -> tuple[int, dict]:
    """`ppoflow train ... --set ray.address=HEAD`; meanwhile, which node hosts which model actor (polled)."""
    seen = {"head": set(), "worker": set()}
    done = threading.Event()
    for name in seen:  # the previous test's actors are gone before this run is watched
        cluster[name].wait_actors_gone()

    def watch() -> None:
        while not done.wait(0.5):
            for name in seen:
                seen[name] |= cluster[name].actors()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with log.open("w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "ppoflow.cli", "train", *args,
                                     "--set", f"ray.address={cluster['address']}"], cwd=REPO, env=cluster["env"],
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                proc.wait(timeout=600)
            finally:
                reap(proc.pid)
    finally:
        done.set()
        watcher.join()
    return proc.returncode, seen


def _base_args(tiny_model_dir, prompts_dir, test_scale, root: Path, run_id: str) -> list[str]:
    sets = [f"model.path={tiny_model_dir}", f"data.prompts={prompts_dir}/train.jsonl", "eval.prompts=null",
            f"storage.root={root}", "iterations=2", "generation.backend=hf", "generation.weight_sync=broadcast",
            "tracking.logger=none", "ray.engines.resources={engine_node: 1}",
            "ray.trainers.resources={trainer_node: 1}", *test_scale]
    return ["--config", QUICKSTART, "--run-id", run_id, *(a for s in sets for a in ("--set", s))]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_engine_and_trainers_on_two_nodes_with_shared_storage(cluster, tmp_path, tiny_model_dir, prompts_dir,
                                                             test_scale, reap_session):
    from storage.run import RunStore

    root = tmp_path / "shared"
    args = _base_args(tiny_model_dir, prompts_dir, test_scale, root, "two-nodes") + ["--set",
                                                                                     "ray.shared_filesystem=true"]
    started = time.monotonic()
    rc, seen = _train(cluster, args, tmp_path / "train.log", reap_session)
    log = (tmp_path / "train.log").read_text()
    assert rc == 0, log[-5000:]
    print(f"\ntwo-node run: {time.monotonic() - started:.0f} s; actors seen per node: {seen}")

    # the engine ran on the head (engine_node) only, the trainers on the other node (trainer_node) only
    assert seen["head"] == {"HFEngine"}, seen
    assert seen["worker"] == {"PolicyWorker", "CriticWorker", "ReferenceWorker"}, seen

    store = RunStore(str(root / "two-nodes"))
    for n in (1, 2):
        assert store.committed_stages(n) == ["generate", "score", "advantages", "update", "sync"], n
        sync = store.read_stage(n, "sync").to_pylist()
        # trainer rank 0 (worker node) broadcast the new weights to the engine (head node) over gloo
        assert [(row["method"], row["policy_version"]) for row in sync] == [("broadcast", n)], sync
    # iteration 2 sampled on the engine with the weights it received: its logprobs are the trainer's
    assert store.stage_marker(2, "score")["metrics"]["rollout/logprob_abs_diff_max"] < 1e-4
    assert not list(root.glob(".ppoflow-probe-*")), "the shared-filesystem probe was not removed"


@pytest.mark.slow
def test_a_node_local_root_on_two_nodes_is_refused_before_any_worker(cluster, tmp_path, tiny_model_dir, prompts_dir,
                                                                    test_scale, reap_session):
    root = tmp_path / "local"
    (root / "runs" / "older-run").mkdir(parents=True)
    (root / "runs" / "older-run" / "run.json").write_text(json.dumps({"run_id": "older-run"}))
    before = _files(root)
    rc, seen = _train(cluster, _base_args(tiny_model_dir, prompts_dir, test_scale, root, "local-root"),
                      tmp_path / "refused.log", reap_session)
    log = (tmp_path / "refused.log").read_text()
    assert rc == 2, log[-5000:]
    assert f"storage.root: {str(root)!r} is a local path" in log and "2 nodes" in log, log[-5000:]
    assert "s3://" in log and "ray.shared_filesystem: true" in log
    assert seen == {"head": set(), "worker": set()}, seen  # no worker started
    assert _files(root) == before  # nothing written (no run folder, no lock), nothing stored changed
