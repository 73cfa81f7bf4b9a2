"""Run setup: pre-flight errors name the field, a run has one writer, and a resumed run keeps its config."""

import re

import pytest

from stages.score import RewardError
from stages.setup import RunSetupError, close_run, open_run
from storage.lock import RunLocked
from storage.prompts import PromptFileError


@pytest.mark.parametrize(
    "override, error, field",
    [
        ("reward.fn=ppoflow.tasks.arith:no_such_fn", RewardError, "reward.fn"),
        ("reward.fn=no_such_module:fn", RewardError, "reward.fn"),
        ("model.path=/nonexistent/model", RunSetupError, "model.path"),
        ("data.prompts=/nonexistent/prompts.jsonl", PromptFileError, "data.prompts"),
        ("storage.root=memory://runs", RunSetupError, "storage.root"),
        # hybrid: an engine (0.5 GPU) and rank 0's policy + reference (0.3 each) on one GPU: 1.1 > 1
        ("generation.placement=hybrid generation.num_gpus=0.5 policy.num_gpus=0.3 critic.num_gpus=0.1",
         RunSetupError, "generation.placement: hybrid puts an engine and rank 0"),
    ],
)
def test_preflight_errors_name_the_field_and_write_nothing(make_config, tmp_path, override, error, field):
    """Each error comes before the run's folder exists (no run.json): fixing the fields and rerunning the same run
    id starts the run, rather than tripping the resume guard on a manifest of the broken config."""
    with pytest.raises(error, match=field):
        open_run(make_config(*override.split(), "run_id=bad"))
    assert list(tmp_path.iterdir()) == []  # the storage root (make_config: tmp_path) holds nothing


def test_second_writer_refused_and_changed_config_refused(make_config, tmp_path):
    config = make_config("run_id=r")
    run = open_run(config)
    assert run["first_iteration"] == 1 and not run["resumed"]
    with pytest.raises(RunLocked, match="locked by pid"):
        open_run(config)
    close_run(config, run["run_uri"], stop_workers=False)

    again = open_run(make_config("run_id=r", "iterations=9"))  # iteration count may change on resume
    assert again["resumed"]
    close_run(config, run["run_uri"], stop_workers=False)
    with pytest.raises(RunSetupError, match="algo.kl_coef"):
        open_run(make_config("run_id=r", "algo.kl_coef=0.5"))
    assert not (tmp_path / "r" / "_LOCK.json").exists()  # refused runs release the lock


def test_a_run_started_before_a_field_existed_resumes_while_it_keeps_its_default(make_config, tmp_path):
    import json

    config = make_config("run_id=old")
    close_run(config, open_run(config)["run_uri"], stop_workers=False)
    manifest = tmp_path / "old" / "run.json"
    stored = json.loads(manifest.read_text())
    del stored["config"]["policy"]["lr_schedule"]  # as written by a ppoflow without that field
    stored["config_hash"] = "from-an-older-ppoflow"
    manifest.write_text(json.dumps(stored))

    close_run(config, open_run(config)["run_uri"], stop_workers=False)  # the new field at its default: same run
    with pytest.raises(RunSetupError, match=r"fields differ: policy\.lr_decay_steps, policy\.lr_schedule"):
        open_run(make_config("run_id=old", "policy.lr_schedule=cosine", "policy.lr_decay_steps=10"))


@pytest.mark.parametrize("field", ["model.path", "model.ref_path", "model.critic_path"])
@pytest.mark.parametrize("kind, message", [
    ("folder without config.json", r"is not a model folder \(no config.json\)"),
    ("file", r"is a file; give the model's folder"),
    ("broken config.json", r"cannot load model config from"),
])
def test_a_wrong_model_path_fails_before_anything_starts(make_config, tmp_path, field, kind, message):
    bad = tmp_path / "bad-model"
    if kind == "file":
        bad.write_bytes(b"\x00weights")
    else:
        bad.mkdir()
        (bad / "model.safetensors").write_bytes(b"\x00")
        if kind == "broken config.json":
            (bad / "config.json").write_text('{"model_type": "qwen2", ')
    with pytest.raises(RunSetupError) as err:
        open_run(make_config(f"{field}={bad}", "run_id=bad"))
    assert str(err.value).startswith(f"{field}: {bad}") or str(err.value).startswith(f"{field}: cannot load")
    assert re.search(message, str(err.value)), str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == ["bad-model"]


def test_overlong_prompts_are_rejected_before_anything_starts_when_asked(make_config, tmp_path):
    from stages.setup import preflight

    preflight(make_config("data.max_prompt_tokens=10"))  # truncate (the default): the samples carry the flag
    preflight(make_config("data.overlong_prompts=reject"))  # every templated prompt fits in 48 tokens
    with pytest.raises(RunSetupError, match=r"data\.prompts: prompt 0 \(0-based, in file order\) is 1\d tokens with "
                                            r"the chat template, over data\.max_prompt_tokens=10: 'What is 2\*"):
        preflight(make_config("data.overlong_prompts=reject", "data.max_prompt_tokens=10"))
    assert list(tmp_path.iterdir()) == []


def test_a_run_of_the_old_layout_resumes_where_it_is(make_config, tmp_path, caplog):
    """Runs lived in {storage.root}/runs/{run_id} before: such a run continues there (with a note), new runs go to
    {storage.root}/{run_id}."""
    import shutil

    config = make_config("run_id=legacy")
    run = open_run(config)
    assert run["run_uri"] == str(tmp_path / "legacy")
    close_run(config, run["run_uri"], stop_workers=False)
    (tmp_path / "runs").mkdir()
    shutil.move(tmp_path / "legacy", tmp_path / "runs" / "legacy")  # where an older ppoflow wrote it

    with caplog.at_level("WARNING"):
        again = open_run(config)
    assert again["resumed"] and again["run_uri"] == str(tmp_path / "runs" / "legacy")
    assert f"run legacy was started in the old layout and stays there: {tmp_path}/runs/legacy" in caplog.text
    close_run(config, again["run_uri"], stop_workers=False)
    assert not (tmp_path / "legacy").exists()
    fresh = open_run(make_config("run_id=fresh"))
    assert fresh["run_uri"] == str(tmp_path / "fresh") and not fresh["resumed"]
    close_run(config, fresh["run_uri"], stop_workers=False)
