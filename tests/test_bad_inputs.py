"""Bad inputs fail with an error naming the field, file, line or sample, and never overwrite what a run committed.

Across components (config, reward, prompts, the flow); the per-component cases live beside each component:
tests/storage/test_prompts.py (prompt files), tests/stages/test_setup.py (pre-flight, model paths),
tests/stages/test_config.py (config fields).
"""

import hashlib
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pyarrow as pa
import pytest

from stages.config import ConfigError, load_config
from stages.score import RewardError, compute_rewards

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


# ---- rewards -----------------------------------------------------------------------------------------------------

def _rollout(n: int = 4) -> pa.Table:
    return pa.table({"sample_id": [f"it1-g0-p{i}-s0" for i in range(n)],
                     "prompt": [f"What is 2*{i}?" for i in range(n)],
                     "response": [str(2 * i) for i in range(n)],
                     "metadata": [json.dumps({"answer": str(2 * i)}) for i in range(n)]})


@pytest.fixture
def reward_module(monkeypatch):
    """An importable module `bad_rewards` whose functions the tests set: `reward.fn=bad_rewards:NAME`."""
    module = types.ModuleType("bad_rewards")
    monkeypatch.setitem(sys.modules, "bad_rewards", module)
    return module


@pytest.mark.parametrize("value", [math.nan, math.inf, None, "1.0"])
def test_a_non_finite_or_non_numeric_reward_names_the_sample(reward_module, value):
    reward_module.fn = lambda prompts, responses, metadata: [1.0, 0.0, value, 1.0]
    with pytest.raises(RewardError) as err:
        compute_rewards("bad_rewards:fn", _rollout())
    assert str(err.value) == (f"reward.fn bad_rewards:fn returned {value!r} for sample it1-g0-p2-s0; expected a "
                              "finite number")


@pytest.mark.parametrize("count", [3, 5, 0])
def test_a_reward_list_of_the_wrong_length_gives_both_counts(reward_module, count):
    reward_module.fn = lambda prompts, responses, metadata: [0.5] * count
    with pytest.raises(RewardError, match=rf"reward.fn bad_rewards:fn returned {count} values for 4 samples"):
        compute_rewards("bad_rewards:fn", _rollout())


def test_good_rewards_pass_through_as_floats(reward_module):
    reward_module.fn = lambda prompts, responses, metadata: [int(r == m["answer"]) for r, m in zip(responses, metadata)]
    assert compute_rewards("bad_rewards:fn", _rollout()) == [1.0, 1.0, 1.0, 1.0]


# ---- config fields -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, field", [
    (["policy.micro_batch_size=48", "policy.mini_batch_size=64"], "policy.mini_batch_size"),  # 64 % 48
    (["critic.mini_batch_size=100"], "critic.mini_batch_size"),
    (["data.prompts_per_iteration=0"], "data.prompts_per_iteration: Input should be greater than or equal to 1"),
    (["eval.max_prompts=0"], "eval.max_prompts: Input should be greater than or equal to 1"),
    (["eval.every=0"], "eval.every"),
    (["algo.dynamic_sampling=true", "generation.n_samples_per_prompt=1", "policy.mini_batch_size=32",
      "policy.micro_batch_size=32", "critic.mini_batch_size=32", "critic.micro_batch_size=32"],
     "generation.n_samples_per_prompt: algo.dynamic_sampling"),
    (["data.max_prompt_tokens=200"], "generation.max_model_len: must hold data.max_prompt_tokens"),
    (["tracking.dir=s3://bucket/tb"], "tracking.dir: must be a local folder"),
    (["run_id=../escape"], "run_id: String should match pattern"),
    (["storage.keep_checkpoints=0"], "storage.keep_checkpoints"),
    (["storage.rows_per_part=0"], "storage.rows_per_part"),
    (["generation.backend=hf", "generation.tensor_parallel_size=2"], "generation.tensor_parallel_size"),
    (["policy.lr_schedule=cosine"], "policy.lr_decay_steps: lr_schedule cosine needs lr_decay_steps"),
])
def test_conflicting_or_out_of_range_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, overrides)
    assert f"\n  {field}" in str(err.value), str(err.value)


def test_a_config_file_that_is_not_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"config file {bad} is not valid YAML"):
        load_config(str(bad))
    bad.write_text("- a list\n- not sections\n")
    with pytest.raises(ConfigError, match=rf"config file {bad}: expected a mapping"):
        load_config(str(bad))


# ---- secrets: never in the config (it is stored in run.json and shown as a Prefect flow parameter) ----------------

@pytest.mark.parametrize("options, keys", [
    ({"key": "AKIA...", "secret": "hunter2"}, "key, secret"),
    ({"endpoint_url": "http://127.0.0.1:9000", "token": "t"}, "token"),
    ({"client_kwargs": {"aws_secret_access_key": "s", "region_name": "eu-west-1"}},
     "client_kwargs.aws_secret_access_key"),
    ({"account_key": "k"}, "account_key"),
])
def test_credentials_in_storage_options_are_refused_pointing_to_the_environment(options, keys):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, [f"storage.storage_options={json.dumps(options)}"])
    msg = str(err.value)
    assert f"storage.storage_options: {keys} would put credentials in the config" in msg
    assert "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in msg
    for value in ("AKIA...", "hunter2", '"s"', "'s'"):  # the error must not echo the secret either
        assert value not in msg


def test_storage_options_without_credentials_are_kept():
    options = {"endpoint_url": "http://127.0.0.1:9000", "anon": False, "client_kwargs": {"region_name": "eu-west-1"}}
    config = load_config(QUICKSTART, [f"storage.storage_options={json.dumps(options)}"])
    assert config.storage.storage_options == options


# ---- the CLI: a bad prompt file ends in one clear line and exit code 2 -------------------------------------------

def test_cli_names_the_bad_line_of_a_prompt_file(tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is 2*3?", "answer": "6"}\n{"prompt": "What is 2*4?", "answer": 8\n')
    proc = subprocess.run(
        [sys.executable, "-m", "ppoflow.cli", "train", "--config", QUICKSTART, "--set", f"storage.root={tmp_path}",
         "--set", f"model.path={tiny_model_dir}", "--set", f"data.prompts={prompts}", "--set", "eval.prompts=null",
         "--run-id", "bad-prompts"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    # The CLI's own pre-flight, before Prefect or Ray start: one line, nothing else, nothing written.
    assert proc.stderr == f"ppoflow: {prompts} line 2: invalid JSON (Expecting ',' delimiter at column 39)\n"
    assert proc.stdout == "" and sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]


# ---- nothing committed is overwritten: a committed run resumed with bad inputs -----------------------------------

def _committed_files(run: Path) -> dict[str, str]:
    """Content hash of every file of the run but the event log and the lock (written by any process)."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*"))
            if p.is_file() and p.relative_to(run).parts[0] not in ("events", "_LOCK.json")}


REWARD_MODULE = '''
import math
import os

from ppoflow.tasks.arith import reward as arith


def reward(prompts, responses, metadata):
    """The quickstart reward, broken on demand: PPOFLOW_TEST_REWARD=nan gives sample 3 a NaN."""
    out = arith(prompts, responses, metadata)
    if os.environ.get("PPOFLOW_TEST_REWARD") == "nan":
        out[3] = math.nan
    return out
'''


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_backend", "ray_session")
def test_resume_with_bad_inputs_fails_clearly_and_leaves_every_committed_file_intact(
        make_config, prompts_dir, tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from flows.ppo import ppo_train
    from stages.generate import encode_prompt
    from storage.prompts import PromptFileError

    # Half of the prompts are longer than data.max_prompt_tokens: they keep their last tokens and are flagged.
    rows = [json.loads(line) for line in Path(f"{prompts_dir}/train.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        if i % 2:
            row["prompt"] = "Answer with the number only, no words, no spaces. " * 4 + row["prompt"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "rewards").mkdir()
    (tmp_path / "rewards" / "flaky_reward.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path / "rewards"))
    monkeypatch.delenv("PPOFLOW_TEST_REWARD", raising=False)

    overrides = ["run_id=bad-inputs", "generation.backend=hf", "flow.retries=0", f"data.prompts={prompts}",
                 "data.max_prompt_tokens=24", "reward.fn=flaky_reward:reward", "eval.prompts=null",
                 "tracking.logger=none"]
    run = Path(ppo_train(config=make_config(*overrides, "iterations=1"))["run_uri"])
    assert (run / "iter-000001" / "sync" / "_SUCCESS.json").exists()

    # Over-long prompts: truncated from the left (the generation prompt survives), recorded per sample and in total.
    import pyarrow.parquet as pq

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rollout = pq.read_table(run / "iter-000001" / "generate").to_pylist()
    flags = []
    for r in rollout:
        full, _ = encode_prompt(tok, r["prompt"], chat=True, max_tokens=10_000)
        assert r["prompt_truncated"] == (len(full) > 24) and r["prompt_ids"] == full[-24:]
        flags.append(r["prompt_truncated"])
    assert any(flags) and not all(flags)
    marker = json.loads((run / "iter-000001" / "generate" / "_SUCCESS.json").read_text())
    assert marker["metrics"]["rollout/prompt_truncated_frac"] == pytest.approx(sum(flags) / len(flags))

    before = _committed_files(run)

    # 1. The reward function now returns NaN: iteration 2 fails in score, naming the sample; nothing is overwritten.
    monkeypatch.setenv("PPOFLOW_TEST_REWARD", "nan")
    with pytest.raises(RewardError, match=r"reward.fn flaky_reward:reward returned nan for sample it2-g\d+-p\d+-s\d+; "
                                          r"expected a finite number"):
        ppo_train(config=make_config(*overrides, "iterations=2"))
    after = _committed_files(run)
    assert {k: after.get(k) for k in before} == before
    assert sorted({k.rsplit("/", 1)[0] for k in after.keys() - before.keys()}) == ["iter-000002/generate"]
    assert not (run / "iter-000002" / "score" / "_SUCCESS.json").exists()
    assert not (run / "_LOCK.json").exists()  # a failed run releases its lock
    before = after

    # 2. The prompt file became malformed: refused before any worker starts, naming file and line.
    monkeypatch.delenv("PPOFLOW_TEST_REWARD")
    lines = prompts.read_text().splitlines(keepends=True)
    lines[6] = lines[6][:-3] + "\n"  # the closing quote and brace lost
    prompts.write_text("".join(lines))
    with pytest.raises(PromptFileError, match=rf"{prompts} line 7: invalid JSON"):
        ppo_train(config=make_config(*overrides, "iterations=2"))
    assert _committed_files(run) == before
