"""The registries of estimators and policy losses (algorithms/registry.py): what config validation, the advantages
stage and docs/algorithms.md read, and what adding an estimator takes."""

from pathlib import Path

import pyarrow as pa
import pytest
import torch

from algorithms.config import AlgoConfig
from algorithms.estimators import EstimatorInputs, per_sequence
from algorithms.registry import ESTIMATORS, POLICY_LOSSES, markdown, register_estimator
from stages.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def test_docs_table_is_generated_from_the_registry():
    assert (REPO / "docs" / "algorithms.md").read_text() == markdown(), \
        "docs/algorithms.md is stale: python -m algorithms.registry > docs/algorithms.md"


def test_config_accepts_exactly_the_registered_names():
    for name in ESTIMATORS:
        assert AlgoConfig(estimator=name).estimator == name
    for name in POLICY_LOSSES:
        assert AlgoConfig(policy_loss=name).policy_loss == name
    with pytest.raises(ValueError, match="estimator"):
        AlgoConfig(estimator="not_registered")


def test_metadata_drives_config_validation():
    """needs_groups refuses one sample per prompt; needs_critic decides whether the run trains a critic."""
    for name, est in ESTIMATORS.items():
        sets = [f"algo.estimator={name}", "generation.n_samples_per_prompt=1", "data.prompts_per_iteration=64"]
        if est.needs_groups:
            with pytest.raises(ConfigError, match="generation.n_samples_per_prompt"):
                load_config(QUICKSTART, sets)
        else:
            assert load_config(QUICKSTART, sets).uses_critic == est.needs_critic


def test_renamed_ratio_level_still_loads():
    assert AlgoConfig(ratio_level="sequence").policy_loss == "gspo"
    assert AlgoConfig(ratio_level="token").policy_loss == "ppo"


def _inputs(seed: int = 0) -> EstimatorInputs:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([3, 5, 1, 4, 2, 5])
    mask = torch.arange(5)[None, :] < lengths[:, None]
    token_rewards = torch.where(mask, torch.randn(6, 5, generator=g, dtype=torch.float64), 0)
    return EstimatorInputs(token_rewards=token_rewards, seq_rewards=token_rewards.sum(-1),
                           values=torch.where(mask, torch.randn(6, 5, generator=g, dtype=torch.float64), 0),
                           mask=mask, group_ids=torch.tensor([0, 0, 0, 1, 1, 1]), gamma=0.9, lam=0.8)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_every_estimator_keeps_the_contract(name):
    """(B, T) advantages, 0 on padding; returns exactly when it needs a critic; group estimators give 0 to a group
    whose samples tie."""
    est, x = ESTIMATORS[name], _inputs()
    advantages, returns = est.fn(x)
    assert advantages.shape == x.mask.shape and (advantages[~x.mask] == 0).all()
    assert (returns is not None) == est.needs_critic
    if est.needs_groups:
        x.seq_rewards = torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0, 2.0], dtype=torch.float64)
        assert (est.fn(x)[0] == 0).all()


def test_a_new_estimator_is_one_registered_function():
    """Registered under a new name, the advantages stage computes with it (and whitens it if it says so)."""
    from stages.advantages import compute_advantages

    @register_estimator("test_max_baseline", needs_groups=True, paper="-", kl="in the total shaped reward")
    def max_baseline(x: EstimatorInputs):
        """Each sample's total shaped reward minus its group's best."""
        best = torch.zeros(int(x.group_ids.max()) + 1, dtype=x.seq_rewards.dtype).scatter_reduce(
            0, x.group_ids, x.seq_rewards, reduce="amax", include_self=False)
        return per_sequence(x.seq_rewards - best[x.group_ids], x.mask), None

    try:
        scored = pa.table({"response_ids": [[1, 2], [3], [4, 5, 6], [7]], "old_logprobs": [[-1.0, -1.0], [-1.0],
                           [-1.0, -1.0, -1.0], [-1.0]], "ref_logprobs": [[-1.0, -1.0], [-1.0], [-1.0, -1.0, -1.0],
                                                                           [-1.0]],
                           "group_id": [0, 0, 1, 1], "reward": [1.0, 3.0, 2.0, 2.5], "values": [None] * 4})
        algo = AlgoConfig.model_construct(**{**AlgoConfig().model_dump(), "estimator": "test_max_baseline"})
        result = compute_advantages(scored, algo)
        assert [row[0] for row in result["columns"]["advantages"]] == [-2.0, 0.0, -0.5, 0.0]
        assert result["columns"]["advantages"][2] == [-0.5, -0.5, -0.5]
    finally:
        ESTIMATORS.pop("test_max_baseline")
