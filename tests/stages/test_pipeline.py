"""The asynchronous pipeline's rules that need no workers: which version each iteration samples from, the config
rules of algo.max_staleness, the decoupled objective's default IS correction.

On the real stack: tests/flows/test_async.py; crashes: tests/flows/test_fault_harness.py.
"""

from pathlib import Path

import pytest

from stages.config import ConfigError, load_config
from stages.pipeline import behaviour_version, staleness

QUICKSTART = str(Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml")


@pytest.mark.parametrize("stale, versions", [(0, [0, 1, 2, 3, 4]), (1, [0, 0, 1, 2, 3]), (2, [0, 0, 0, 1, 2])])
def test_iteration_n_samples_from_version_n_minus_1_minus_s(stale, versions):
    config = load_config(QUICKSTART, [f"algo.max_staleness={stale}"])
    assert [behaviour_version(config, n) for n in range(1, 6)] == versions
    # the first S rollouts come from the base policy: less stale than S
    assert [staleness(config, n) for n in range(1, 6)] == [n - 1 - v for n, v in zip(range(1, 6), versions)]
    assert max(staleness(config, n) for n in range(1, 50)) == stale


def test_stale_rollouts_get_the_decoupled_is_weight_unless_the_config_says_otherwise():
    assert load_config(QUICKSTART).algo.is_correction == "none"
    assert load_config(QUICKSTART, ["algo.max_staleness=1"]).algo.is_correction == "tis"
    assert load_config(QUICKSTART, ["algo.max_staleness=2", "algo.is_correction=icepop"]).algo.is_correction == \
        "icepop"
    assert load_config(QUICKSTART, ["algo.max_staleness=1", "algo.is_correction=none"]).algo.is_correction == "none"
    # what a resumed run reads back from its manifest is the same config (and the same hash)
    config = load_config(QUICKSTART, ["algo.max_staleness=1"])
    assert load_config(base=config.model_dump(mode="json")).config_hash() == config.config_hash()


@pytest.mark.parametrize("overrides, fields", [
    (["generation.placement=hybrid"], ["algo.max_staleness: 1", "generation.placement: hybrid",
                                       "generation.placement: standard"]),
    (["generation.enable_sleep_mode=true", "generation.num_gpus=0.5"],
     ["algo.max_staleness: 1", "generation.enable_sleep_mode: false"]),
])
def test_overlap_needs_engines_and_trainers_on_resources_of_their_own(overrides, fields):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, ["algo.max_staleness=1", *overrides])
    for field in fields:
        assert field in str(err.value), (field, str(err.value))
    load_config(QUICKSTART, ["algo.max_staleness=0", *overrides])  # the synchronous loop takes them


def test_staleness_cannot_be_negative():
    with pytest.raises(ConfigError, match="algo.max_staleness: Input should be greater than or equal to 0"):
        load_config(QUICKSTART, ["algo.max_staleness=-1"])
