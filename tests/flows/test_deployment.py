"""Operations for real: `python -m ppoflow.serve` (what `make serve` runs) brings up a Prefect server on loopback, the
process work pool, prefect.yaml's deployments and a worker; `prefect deployment run` trains; a flow-run process
SIGKILLed mid-iteration is resumed by `prefect flow-run retry` without recomputing any committed stage.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory, reap_session):
    """The documented bring-up, in its own session so that everything it starts is torn down with it."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    log = home / "serve.log"
    with log.open("w") as out:
        serve = subprocess.Popen([sys.executable, "-m", "ppoflow.serve", "--home", str(home), "--port", str(port),
                                  "--no-ui"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "ready:" not in log.read_text():
            assert serve.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        yield {"PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_HOME": str(home)}
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=60)
        finally:
            reap_session(serve.pid)


def _prefect(api: dict, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([PREFECT, *args], env={**os.environ, **api}, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _overrides(tmp_path, tiny_model_dir, prompts_dir, test_scale, iterations: int, *extra: str) -> str:
    return json.dumps([f"model.path={tiny_model_dir}", f"data.prompts={prompts_dir}/train.jsonl",
                       f"eval.prompts={prompts_dir}/eval.jsonl", "eval.max_prompts=16",
                       f"storage.root={tmp_path}", f"iterations={iterations}", *test_scale, *extra])


def _events(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run / "events").iterdir())]


def test_deployment_run_trains_and_reports(prefect_api, tmp_path, tiny_model_dir, prompts_dir, test_scale):
    out = _prefect(prefect_api, "deployment", "run", "ppo-train/quickstart", "-p", "run_id=deployed",
                   "-p", f"overrides={_overrides(tmp_path, tiny_model_dir, prompts_dir, test_scale, 1)}", "--watch")
    assert out.returncode == 0 and "Completed" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    run = tmp_path / "deployed"
    for stage in ("generate", "score", "advantages", "update", "sync"):
        assert (run / "iter-000001" / stage / "_SUCCESS.json").exists()
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["config"]["iterations"] == 1  # the partial override kept the rest of quickstart.yaml
    assert manifest["config"]["algo"]["estimator"] == "gae"
    for key in ("deployed-iterations", "deployed-rollouts", "deployed-progress"):
        art = _prefect(prefect_api, "artifact", "inspect", key, timeout=60)
        assert f"'key': '{key}'" in art.stdout, art.stdout + art.stderr
    art = _prefect(prefect_api, "artifact", "inspect", "deployed-iterations", timeout=60).stdout
    assert '"iteration": 1' in art and '"reward":' in art
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", out.stdout).group(1)
    logs = _prefect(prefect_api, "flow-run", "logs", flow_run_id, timeout=60).stdout
    assert re.search(r"\(VLLMEngine pid=\d+\) ", logs), logs[-3000:]  # what the vLLM actor printed
    assert re.search(r"\(PolicyWorker pid=\d+\) ", logs)  # ... and the DeepSpeed policy actor


def test_killed_flow_run_is_retried_without_recomputing_committed_stages(prefect_api, tmp_path, tiny_model_dir,
                                                                           prompts_dir, test_scale):
    # The fault fires once (PPOFLOW_FAULTS_ONCE_DIR): the retried flow run inherits the same job variables.
    env = {"PPOFLOW_FAULTS": "update.after_train@1=kill", "PPOFLOW_FAULTS_ONCE_DIR": str(tmp_path / "faults")}
    # The HF engine starts in seconds (vLLM: ~40 s per attempt); the test above runs the deployment on vLLM.
    overrides = _overrides(tmp_path, tiny_model_dir, prompts_dir, test_scale, 1, "generation.backend=hf")
    first = _prefect(prefect_api, "deployment", "run", "ppo-train/quickstart", "-p", "run_id=killed",
                     "-p", f"overrides={overrides}",
                     "--job-variable", f"env={json.dumps(env)}", "--watch")
    assert first.returncode != 0 and "Crashed" in first.stdout, first.stdout[-3000:] + first.stderr[-3000:]
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", first.stdout).group(1)
    run = tmp_path / "killed"
    assert (run / "iter-000001" / "advantages" / "_SUCCESS.json").exists()
    assert not (run / "iter-000001" / "update" / "_SUCCESS.json").exists()
    before = {p: p.read_bytes() for p in run.glob("iter-*/*/_SUCCESS.json")}

    retry = _prefect(prefect_api, "flow-run", "retry", flow_run_id, timeout=120)
    assert retry.returncode == 0, retry.stdout + retry.stderr
    deadline = time.monotonic() + 900
    while True:  # `flow-run watch` returns at once on the retry's Scheduled state: poll the state instead
        state = re.search(r"state_type=StateType\.(\w+)",
                          _prefect(prefect_api, "flow-run", "inspect", flow_run_id, timeout=60).stdout).group(1)
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert state == "COMPLETED"

    for stage in ("generate", "score", "advantages", "update", "sync"):
        assert (run / "iter-000001" / stage / "_SUCCESS.json").exists()
    for path, data in before.items():
        assert path.read_bytes() == data  # nothing committed was rewritten
    ran = [(e["stage"], e.get("iteration")) for e in _events(run) if e["action"] == "ran"]
    expected = {(s, 1) for s in ("generate", "score", "advantages", "update", "sync")}
    assert sorted(ran) == sorted(expected | {("eval", n) for n in (0, 1)})  # each exactly once over both attempts
    resumed = [e for e in _events(run) if e["pid"] != _events(run)[0]["pid"]]
    assert {(e["stage"], e["action"]) for e in resumed if e.get("iteration") == 1} == {
        ("generate", "skipped"), ("score", "skipped"), ("advantages", "skipped"), ("update", "ran"), ("sync", "ran"),
        ("eval", "ran")}
