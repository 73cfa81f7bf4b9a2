"""Run setup: pre-flight errors name the field, a run has one writer, and a resumed run keeps its config."""

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
    ],
)
def test_preflight_errors_name_the_field_and_write_nothing(make_config, tmp_path, override, error, field):
    with pytest.raises(error, match=field):
        open_run(make_config(override, "run_id=bad"))
    assert not (tmp_path / "runs").exists()


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
    assert not (tmp_path / "runs" / "r" / "_LOCK.json").exists()  # refused runs release the lock
