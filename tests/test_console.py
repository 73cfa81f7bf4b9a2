"""`ppoflow train`'s console: a header, one line per iteration and a summary; the workers' output in one log file per
actor (ppoflow/console.py, workers/logs.py). The slow tests run the real CLI on the real stack in a subprocess, as a
user would, and count what reaches the console.

Run alone:  .venv/bin/pytest tests/test_console.py   (-m "not slow" for the fast part)
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ppoflow.console import header, table_header, table_row
from stages.config import load_config
from workers.logs import ActorLogs

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
HEADER_LINES, SUMMARY_LINES = 5, 2


def _lines_for(iterations: int, evaluated: bool = True) -> int:
    """What the console prints for a successful run: the header, the table header, one row per iteration (and one
    for the starting policy's evaluation), the summary."""
    return HEADER_LINES + 1 + iterations + evaluated + SUMMARY_LINES


def test_the_quickstart_fits_in_forty_lines():
    config = load_config(QUICKSTART)
    assert config.iterations == 30 and config.eval.prompts is not None
    assert _lines_for(config.iterations) <= 40


def test_header_and_rows():
    config = load_config(QUICKSTART)
    lines = header(config, "r1", "/runs/r1", "/runs/r1/logs", None, False)
    assert len(lines) == HEADER_LINES and lines[0] == "ppoflow train: run r1 (new run)"
    assert "1 vllm engine (0.5 CPU)" in lines[3] and "policy (ZeRO-0, 0.25 CPU), critic (ZeRO-0, 0.25 CPU)" in lines[3]
    assert "gae · 30 iterations × 32 prompts × 8 samples · eval on 256 held-out prompts every 10" in lines[4]
    resumed = header(load_config(QUICKSTART, ["algo.estimator=rloo"]), "r1", "/runs/r1", "/l", 7, True)
    assert resumed[0] == "ppoflow train: run r1 (resuming: 7 of 30 iterations committed)"
    assert "old layout" in resumed[1] and "critic" not in resumed[3]
    row = table_row({"iteration": 3, "rollout/reward_mean": 0.5, "eval/pass_rate": 0.25}, critic=False)
    assert row.split() == ["3", "0.500", "-", "-", "-", "0.250", "-"]
    assert table_header(critic=False).split() == ["iter", "reward", "kl", "pg_loss", "resp_len", "eval", "stages_s"]


def test_actor_lines_go_to_one_file_per_actor(tmp_path, monkeypatch):
    """Lines are routed by the pid Ray tags them with: the actor table names the actor (a subprocess of an actor
    writes into the actor's output, so it lands there too); Ray's own notices and unknown pids get their files."""
    table = {"101": "policy", "202": "engine-0"}
    monkeypatch.setattr(ActorLogs, "_actor_names", staticmethod(lambda: dict(table)))
    logs = ActorLogs(str(tmp_path / "logs"))
    assert not (tmp_path / "logs").exists()  # made with the first line: a run refused at its start has no folder
    logs("(EngineCore pid=303) INFO engine ready", False, "VLLMEngine pid=202")
    logs("step 1", False, "PolicyWorker pid=101")
    logs("Traceback (most recent call last):", True, "PolicyWorker pid=101")
    logs("The autoscaler took 0.0 seconds", False, "pid=autoscaler")
    logs("probe", False, "group_address pid=404")
    files = {p.name: p.read_text() for p in (tmp_path / "logs").iterdir()}
    assert files == {"engine-0.log": "(EngineCore pid=303) INFO engine ready\n",
                     "policy.log": "step 1\nTraceback (most recent call last):\n",
                     "ray.log": "The autoscaler took 0.0 seconds\n", "group_address-404.log": "probe\n"}
    assert logs.tail("policy", 1) == ["Traceback (most recent call last):"]
    error = "ray::PolicyWorker.train() (pid=101, ip=10.0.0.1, actor_id=ab12)\nRuntimeError: boom"
    assert logs.files_of(error) == ["policy"]
    assert logs.files_of("The actor died: name: run-1-0a1b2c3d:engine-0, pid: 999") == ["engine-0"]
    assert logs.files_of("no actor here") == []
    logs.detach()

    held = ActorLogs(str(tmp_path / "held"), hold=True)  # until the run's folder exists
    held("step 1", False, "PolicyWorker pid=101")
    assert not (tmp_path / "held").exists() and held.tail("policy") == ["step 1"]
    held.release()
    held("step 2", False, "PolicyWorker pid=101")
    assert (tmp_path / "held" / "policy.log").read_text() == "step 1\nstep 2\n"
    held.detach()


# ---- the real CLI ------------------------------------------------------------------------------------------------

def _train(tmp_path, args: list[str], reap, env: dict | None = None, name: str = "train"):
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen([sys.executable, "-m", "ppoflow.cli", "train", *args], cwd=REPO,
                                env={**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), **(env or {})},
                                stdout=o, stderr=e, start_new_session=True)
        try:
            proc.wait(timeout=900)
        finally:
            reap(proc.pid)
    return proc.returncode, _read(out), _read(err)


def _read(path: Path) -> str:
    with path.open(newline="") as f:  # as written: tqdm bars in the actors' output carry carriage returns
        return f.read()


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if "Traceback" in line or "Logging error" in line]


@pytest.mark.slow
def test_a_quickstart_run_prints_a_short_console_and_logs_per_actor(tmp_path, tiny_model_dir, prompts_dir,
                                                                    reap_session):
    """The quickstart as shipped (vLLM engine, PPO with a critic, evaluation) but 3 iterations, evaluating 64 prompts
    after every one."""
    iterations = 3
    rc, out, err = _train(tmp_path, [
        "--config", QUICKSTART, "--run-id", "quiet", "--set", f"model.path={tiny_model_dir}",
        "--set", f"data.prompts={prompts_dir}/train.jsonl", "--set", f"eval.prompts={prompts_dir}/eval.jsonl",
        "--set", f"storage.root={tmp_path}", "--set", f"iterations={iterations}", "--set", "eval.every=1",
        "--set", "eval.max_prompts=64"],
        reap_session)
    assert rc == 0, out + err
    lines = (out + err).splitlines()
    assert len(lines) == _lines_for(iterations), out + err  # the quickstart's 30 iterations: 39 lines
    assert err == ""
    assert lines[0] == "ppoflow train: run quiet (new run)" and lines[1] == f"  writes   {tmp_path}/quiet"
    rows = [line.split() for line in lines[HEADER_LINES + 1:HEADER_LINES + 2 + iterations]]
    assert [r[0] for r in rows] == [str(n) for n in range(iterations + 1)]
    assert all(re.fullmatch(r"0\.\d{3}|1\.000", r[6]) for r in rows)  # the held-out pass rate of every iteration
    assert lines[-2].startswith(f"{iterations}/{iterations} iterations committed in ") and "eval pass rate" in lines[-2]
    assert _errors(out + err) == []  # a successful run's console holds no traceback

    logs = tmp_path / "quiet" / "logs"
    names = {p.name for p in logs.iterdir()}
    assert {"driver.log", "engine-0.log", "policy.log", "critic.log", "reference.log"} <= names, names
    engine = (logs / "engine-0.log").read_text()
    assert "Initializing a V1 LLM engine" in engine  # vLLM's own output
    # A CPU engine runs vLLM in its actor's process (workers/vllm_engine.py in_process): no engine-core subprocess
    assert "(EngineCore" not in engine and "deepspeed" in (logs / "policy.log").read_text().lower()
    driver = (logs / "driver.log").read_text()
    assert "Flow run" in driver and "Finished in state Completed()" in driver  # Prefect's log of the flow run
    assert _errors(driver) == []  # nor does its log: no "--- Logging error ---" after the flow ended


@pytest.mark.slow
@pytest.mark.parametrize("verbose", [False, True])
def test_a_failing_actor_shows_its_last_lines(tmp_path, tiny_model_dir, prompts_dir, test_scale, reap_session,
                                              verbose):
    """The policy's actor raises inside its update (fault point policy.train, workers/trainer.py): the console
    names the error and shows the actor's last lines, those of its log file. --verbose prints the actors' output
    on the console as well."""
    sets = [f"model.path={tiny_model_dir}", f"data.prompts={prompts_dir}/train.jsonl", "eval.prompts=null",
            f"storage.root={tmp_path}", "iterations=2", "generation.backend=hf", "flow.retries=0", *test_scale]
    rc, out, err = _train(tmp_path, ["--config", QUICKSTART, "--run-id", "fails", *(["--verbose"] * verbose),
                                     *(a for s in sets for a in ("--set", s))],
                          reap_session, env={"PPOFLOW_FAULTS": "policy.train@1=raise"})
    assert rc == 1, out + err
    logs = tmp_path / "fails" / "logs"
    policy = _read(logs / "policy.log").split("\n")[:-1]
    assert policy[-1] == "ppoflow: injected fault at policy.train@1 (raise)"
    assert "ppoflow: run fails failed: RuntimeError: injected fault at policy.train@1" in err
    block = err.split(f"last lines of {logs}/policy.log:\n", 1)[1].split("\n")
    shown = [line[4:] for line in block if line.startswith("  | ")]
    assert shown and shown == policy[-len(shown):]
    if not verbose:  # the traceback is in driver.log, not on the console
        assert "Traceback" in (logs / "driver.log").read_text() and "Traceback" not in out + err
    actor_lines = [line for line in (out + err).splitlines() if line.startswith("(PolicyWorker pid=")
                   or "PolicyWorker pid=" in line[:40]]
    assert bool(actor_lines) == verbose, (out + err)[-3000:]


ADOPT = '''
import json, os, sys
from ppoflow.console import RunConsole
from stages.config import load_config
from storage.run import RunStore

root, opened = sys.argv[1], sys.argv[2] == "opened"
config = load_config({quickstart!r}, ["storage.root=" + root, "run_id=r"])
with RunConsole(config, root + "/r") as console:
    print("before the run exists")
    os.system("echo from a subprocess")
    console.actor_logs("Resized to 1 node", False, "pid=autoscaler")  # as Ray forwards its notices
    console.print("on the console")
    if opened:
        RunStore(root + "/r").write_manifest({{"run_id": "r"}})
        console.poll()  # the progress thread's tick
        print("after", file=sys.stderr)
'''


@pytest.mark.parametrize("opened", [True, False])
def test_driver_output_waits_for_the_run_folder(tmp_path, opened):
    """Until open_run writes run.json the driver's output goes to a temporary file: a run refused at its start leaves
    no folder; once the run exists, driver.log holds everything, from before and after."""
    import tempfile

    before = set(Path(tempfile.gettempdir()).glob("ppoflow-driver-*.log"))
    proc = subprocess.run([sys.executable, "-c", ADOPT.format(quickstart=QUICKSTART), str(tmp_path),
                           "opened" if opened else "refused"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "on the console\n" and proc.stderr == ""
    assert set(Path(tempfile.gettempdir()).glob("ppoflow-driver-*.log")) == before  # the temporary file is gone
    if opened:
        driver = (tmp_path / "r" / "logs" / "driver.log").read_text()
        assert driver == "before the run exists\nfrom a subprocess\nafter\n"
        assert (tmp_path / "r" / "logs" / "ray.log").read_text() == "Resized to 1 node\n"
    else:
        assert list(tmp_path.iterdir()) == []
