"""Config loading: YAML + dotted overrides; bad configs fail before any worker starts, naming the field."""

import subprocess
import sys
from pathlib import Path

import pytest

from stages.config import ConfigError, RunConfig, load_config

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def test_quickstart_loads_and_overrides_apply():
    config = load_config(QUICKSTART, ["algo.gamma=0.99", 'generation.stop=["\\n"]', "seed=7"])
    assert config.algo.gamma == 0.99 and config.generation.stop == ["\n"] and config.seed == 7
    assert load_config(QUICKSTART).algo.gamma == 1.0


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["algo.gama=0.9"], "algo.gama: unknown key"),
        (["policy.lr=-1e-5"], "policy.lr: Input should be greater than 0"),
        (["algo.estimator=group_norm", "generation.n_samples_per_prompt=1"], "generation.n_samples_per_prompt"),
        (["algo.estimator=ppo"], "algo.estimator"),
        (["generation.max_new_tokens=500"], "generation.max_model_len"),
        (["policy.mini_batch_size=24"], "policy.mini_batch_size"),
        (["reward.fn=no_colon"], "reward.fn"),
        (["algo.overlong_buffer=99"], "algo.overlong_buffer"),
        (["algo.dual_clip=0.5"], "algo.dual_clip"),
        (["nonsense=1"], "nonsense: unknown key"),
    ],
)
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, overrides)
    assert field in str(err.value)


def test_override_through_a_scalar_is_refused():
    with pytest.raises(ConfigError, match="algo.gamma is not a section"):
        load_config(QUICKSTART, ["algo.gamma.x=1"])


def test_config_hash_ignores_operational_fields():
    a = load_config(QUICKSTART)
    assert a.config_hash() == load_config(QUICKSTART, ["iterations=50", "flow.retries=3"]).config_hash()
    assert a.config_hash() != load_config(QUICKSTART, ["algo.kl_coef=0.05"]).config_hash()


def test_cli_rejects_bad_config_before_starting_anything(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ppoflow.cli", "train", "--config", QUICKSTART, "--set", f"storage.root={tmp_path}",
         "--set", "algo.estimator=group_norm", "--set", "generation.n_samples_per_prompt=1",
         "--set", "policy.mini_batch_size=24"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "\n  generation.n_samples_per_prompt: " in proc.stderr and "\n  policy.mini_batch_size: " in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written, no run started


def test_flow_parameter_schema_is_pinned():
    """The flow parameter is public surface (Prefect draws its form from it): change it on purpose."""
    # rollout (multi-turn episodes with an environment, issue 28) joined after generation; retrain: the lineage's
    # promotion gate (issue 27)
    assert list(RunConfig.model_fields) == ["run_id", "seed", "iterations", "model", "data", "generation", "rollout",
                                            "policy", "critic", "algo", "reward", "storage", "checkpoint", "ray",
                                            "flow", "eval", "tracking", "retrain"]
    # data.label_key and data.input_template joined DataConfig (issue 26)
    assert list(RunConfig.model_fields["data"].annotation.model_fields) == [
        "prompts", "prompt_key", "label_key", "input_template", "prompts_per_iteration", "max_prompt_tokens",
        "overlong_prompts", "apply_chat_template", "shuffle"]


def test_prefect_parameter_schema_describes_every_field():
    """Prefect's deployment form shows each field's description: the field docstrings are pydantic descriptions
    (use_attribute_docstrings), for the flow's parameters and every field of every nested section."""
    from prefect.utilities.callables import parameter_schema

    from flows.ppo import ppo_train

    schema = parameter_schema(ppo_train).model_dump()
    models = {"ppo_train": schema, **schema["definitions"]}
    assert {"RunConfig", "DataConfig", "AlgoConfig", "TrainerConfig", "GenerationConfig", "StorageConfig",
            "RayConfig", "GroupPlacement", "RewardModelConfig", "RemoteRewardConfig"} <= set(models)
    fields = [(name, prop, p) for name, d in models.items() for prop, p in d.get("properties", {}).items()]
    assert len(fields) > 120  # every field of every section, not a few
    assert [f"{name}.{prop}" for name, prop, p in fields if not p.get("description")] == []
    described = {f"{name}.{prop}": p["description"] for name, prop, p in fields}
    assert described["AlgoConfig.gamma"] == "Discount γ per token (gae, reinforce)."
    assert described["ppo_train.overrides"].startswith("Dotted `key=value` overrides")


@pytest.mark.parametrize("estimator", ["reinforce_baseline", "rloo", "group_norm", "dr_grpo"])
def test_every_group_estimator_needs_several_samples(estimator):
    with pytest.raises(ConfigError, match="generation.n_samples_per_prompt"):
        load_config(QUICKSTART, [f"algo.estimator={estimator}", "generation.n_samples_per_prompt=1",
                                 "data.prompts_per_iteration=64"])
    load_config(QUICKSTART, ["algo.estimator=reinforce", "generation.n_samples_per_prompt=1",
                             "data.prompts_per_iteration=64"])  # n = 1 is fine without groups


def test_k1_as_a_loss_term_warns():
    with pytest.warns(UserWarning, match="algo.kl_estimator: k1 as a loss term"):
        load_config(QUICKSTART, ["algo.kl_in_reward=false", "algo.kl_estimator=k1"])


def test_critic_only_for_gae():
    assert load_config(QUICKSTART).uses_critic
    assert not load_config(QUICKSTART, ["algo.estimator=rloo"]).uses_critic


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    config = load_config(str(path))
    assert config.model.path and config.iterations >= 1
