"""Multi-turn PPO end to end (rollout.env) on the real stack (HF engine, DeepSpeed, Ray, Prefect), with `Scripted`, an
environment that answers every policy turn whatever it says, so the tiny random model plays 3-turn episodes:
- the rollout stores each episode as one row: policy tokens and the environment's (holes) in order, the mask, the
  turn index, the reward increment on the right token, the turns list; `ppoflow rollouts` shows it turn by turn;
- token in, token out: every policy turn, sampled again by a fresh engine with the policy that generated it, from the
  stored ids before it and the turn's stored seed, gives the stored tokens;
- holes are masked in score (the logprob gate compares policy tokens: the engine stores 0 at holes), in the
  advantages (no KL, reward, advantage or return there) and in the trainers (tests/workers/test_multiturn_trainers.py
  checks the losses themselves);
- SIGKILL inside a multi-turn generate (fault point generate.turn1, before the second turn's engine batch), then
  resume: the same episodes as an uninterrupted run, bit for bit (rollout.lockstep), and nothing committed ran twice.

Run alone:  .venv/bin/pytest -q tests/flows/test_multiturn.py
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MULTITURN = ["rollout.env=scripted_env:Scripted", "rollout.max_turns=3", "rollout.max_total_tokens=64",
             "generation.backend=hf", "generation.max_new_tokens=8"]

SCRIPTED_ENV = '''
from ppoflow.envs.base import Env


class Scripted(Env):
    """Three policy turns: the first answered by a `tool` chat message (a 0.25 reward increment), the second by plain
    text, the third ends the episode."""

    def __init__(self, prompt_key="prompt"):
        super().__init__(prompt_key)
        self.turn = 0

    def step(self, action):
        self.turn += 1
        if self.turn == 1:
            return {"role": "tool", "content": f"{len(action)} chars"}, 0.25, False, {"tool": "counter"}
        if self.turn == 2:
            return "\\nnoted.\\n", 0.0, False, {}
        return None, 0.0, True, {}
'''


@pytest.fixture
def env_module(tmp_path) -> Path:
    """A folder holding scripted_env.py (the env), for sys.path or PYTHONPATH."""
    folder = tmp_path / "envs"
    folder.mkdir()
    (folder / "scripted_env.py").write_text(SCRIPTED_ENV)
    return folder


def _table(run: Path, n: int, stage: str):
    from storage.run import RunStore

    return RunStore(str(run)).read_stage(n, stage)


@pytest.mark.usefixtures("prefect_backend", "ray_session")
def test_multiturn_run_stores_episodes_and_trains_on_policy_tokens(make_config, env_module, monkeypatch, capsys):
    from flows.ppo import ppo_train
    from ppoflow.cli import main
    from workers.hf_engine import HFEngine

    monkeypatch.syspath_prepend(str(env_module))
    config = make_config("run_id=multiturn", "iterations=2", *MULTITURN)
    run = Path(ppo_train(config=config)["run_uri"])

    rollout = _table(run, 2, "generate").to_pylist()
    experience = _table(run, 2, "advantages").to_pylist()
    assert len(rollout) == 32
    for r, e in zip(rollout, experience, strict=True):
        assert r["sample_id"] == e["sample_id"]
        mask, turns = r["response_mask"], r["turns"]
        assert [t["role"] for t in turns] == ["assistant", "tool", "assistant", "environment", "assistant"]
        assert [t["tool"] for t in turns[:2]] == ["counter", "counter"] and turns[1]["text"].endswith(" chars")
        assert sum(t["tokens"] for t in turns) == len(r["response_ids"]) == len(mask) == len(r["turn_index"])
        assert r["response"] == turns[-1]["text"] and r["finish_reason"] == turns[-1]["finish_reason"]
        for t, turn in enumerate(turns):  # each turn's tokens, in order; holes exactly at the observations
            at = [i for i, index in enumerate(r["turn_index"]) if index == t]
            assert len(at) == turn["tokens"] and at == list(range(at[0], at[0] + len(at)))
            assert {mask[i] for i in at} == {int(turn["role"] == "assistant")}
        first_end = max(i for i, index in enumerate(r["turn_index"]) if index == 0)
        assert r["env_rewards"][first_end] == pytest.approx(0.25) and sum(r["env_rewards"]) == pytest.approx(0.25)
        holes = [i for i, m in enumerate(mask) if not m]
        assert all(r["engine_logprobs"][i] == 0.0 for i in holes)
        for column in ("kl", "token_rewards", "advantages", "returns"):
            assert all(e[column][i] == 0.0 for i in holes), column
        assert any(e["advantages"][i] != 0.0 for i, m in enumerate(mask) if m)
        assert e["token_rewards"][first_end] == pytest.approx(0.25 - 0.01 * e["kl"][first_end], abs=1e-5)
    # The gate compared policy tokens only (the engine's 0.0 at a hole is no logprob); they agree.
    score = json.loads((run / "iter-000002" / "score" / "_SUCCESS.json").read_text())["metrics"]
    assert score["rollout/logprob_abs_diff_max"] < 1e-4
    generate = json.loads((run / "iter-000002" / "generate" / "_SUCCESS.json").read_text())["metrics"]
    assert generate["rollout/turns"] == 3.0 and generate["rollout/tool_calls"] == 1.0
    evaluated = _table(run, 2, "eval").to_pylist()
    assert all(len(r["turns"]) == 5 for r in evaluated)

    # Token in, token out: iteration 2 was sampled by policy 1, whose HF export the update of iteration 1 wrote.
    engine = HFEngine(str(run / "checkpoints" / "iter-000001" / "hf"), seed=0, max_model_len=128, num_threads=1)
    for r in rollout[:8]:
        for t, turn in enumerate(r["turns"]):
            if turn["role"] != "assistant":
                continue
            start = r["turn_index"].index(t)
            [[again]] = engine.generate([{
                "prompt_ids": r["prompt_ids"] + r["response_ids"][:start], "n": 1, "seed": turn["seed"],
                "max_new_tokens": turn["tokens"], "temperature": 1.0, "top_p": 1.0, "top_k": -1, "stop": None}])
            assert again["response_ids"] == r["response_ids"][start:start + turn["tokens"]]
            assert again["logprobs"] == pytest.approx(r["engine_logprobs"][start:start + turn["tokens"]], abs=1e-4)

    capsys.readouterr()
    assert main(["rollouts", "multiturn", "--iter", "2", "--k", "1", "--root", config.storage.root]) == 0
    shown = capsys.readouterr().out
    assert "tool [counter]: " in shown and "environment: " in shown and shown.count("assistant: ") >= 3


def _train(args: list[str], env: dict, log: Path, reap) -> int:
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ppoflow.cli", "train", *args], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=1200)
        finally:
            reap(proc.pid)
    return proc.returncode


def test_sigkill_inside_a_multiturn_generate_then_resume(tmp_path, tiny_model_dir, prompts_dir, test_scale, env_module,
                                                         reap_session):
    """Iteration 2's generate is killed before the engine batch of its episodes' second turn; the next process
    skips iteration 1, samples iteration 2 again and commits what an uninterrupted run commits. (GRPO: no critic
    actor to start three times; the other test trains the critic on episodes.)"""
    sets = [f"model.path={tiny_model_dir}", f"data.prompts={prompts_dir}/train.jsonl", "eval.prompts=null",
            f"storage.root={tmp_path}", "iterations=2", "rollout.lockstep=true", "algo.estimator=group_norm",
            *test_scale, *MULTITURN]
    args = ["--config", "configs/quickstart.yaml", *(a for s in sets for a in ("--set", s))]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0", "PYTHONPATH": os.pathsep.join(
        [str(REPO), str(env_module), *filter(None, [os.environ.get("PYTHONPATH")])])}
    for var in ("PPOFLOW_FAULTS", "PPOFLOW_FAULTS_ONCE_DIR", "PREFECT_API_URL"):
        env.pop(var, None)
    once = tmp_path / "faults"
    faulted = {**env, "PPOFLOW_FAULTS": "generate.turn1@2=kill", "PPOFLOW_FAULTS_ONCE_DIR": str(once)}

    def chain() -> list[int]:
        codes = [_train([*args, "--run-id", "resumed"], {**faulted, "PREFECT_HOME": str(tmp_path / "p1")},
                        tmp_path / "killed.log", reap_session)]
        codes.append(_train([*args, "--run-id", "resumed"], {**faulted, "PREFECT_HOME": str(tmp_path / "p2")},
                            tmp_path / "resumed.log", reap_session))
        return codes

    started = time.monotonic()
    # One process at a time: each holds a Ray, its Prefect server and four actors, on a machine that may be shared.
    reference = _train([*args, "--run-id", "reference"], {**env, "PREFECT_HOME": str(tmp_path / "p0")},
                       tmp_path / "reference.log", reap_session)
    assert reference == 0, (tmp_path / "reference.log").read_text()[-4000:]
    codes = chain()
    print(f"\nmulti-turn resume: reference and chain in {time.monotonic() - started:.0f} s")
    assert codes[0] == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-4000:]
    assert codes[1] == 0, (tmp_path / "resumed.log").read_text()[-4000:]
    assert sorted(p.name for p in once.iterdir()) == ["generate.turn1@2"]

    run, ref = tmp_path / "resumed", tmp_path / "reference"
    for n in (1, 2):
        for stage in ("generate", "score", "advantages", "update", "sync"):
            got, want = _table(run, n, stage), _table(ref, n, stage)
            assert got.column_names == want.column_names and got.num_rows == want.num_rows
            for column in got.column_names:
                if column in ("engine", "seconds", "method", "bytes", "checksum"):  # how the sync went (harness)
                    continue
                a, b = got[column].to_pylist(), want[column].to_pylist()
                if column == "turns":  # everything but the wall-clock latencies
                    a, b = ([[{k: v for k, v in t.items() if k != "latency_s"} for t in ts] for ts in x]
                            for x in (a, b))
                assert a == b, f"iteration {n} {stage}.{column} differs from the uninterrupted run"
    rollout = _table(run, 2, "generate").to_pylist()
    assert all(len(r["turns"]) == 5 for r in rollout)
    # Each stage ran (committed) once over both processes; the killed process had committed all of iteration 1.
    events = [json.loads(p.read_text()) for p in sorted((run / "events").iterdir())]
    ran = [(e["stage"], e["iteration"], e["pid"]) for e in events if e.get("action") == "ran"]
    assert sorted((s, n) for s, n, _ in ran) == sorted((s, n) for s in ("generate", "score", "advantages",
                                                                        "update", "sync") for n in (1, 2))
    pids = {n: {pid for _, i, pid in ran if i == n} for n in (1, 2)}
    assert len(pids[1]) == 1 and len(pids[2]) == 1 and pids[1] != pids[2]
