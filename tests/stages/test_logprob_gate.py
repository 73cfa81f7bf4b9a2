"""The logprob gate's bound (algo.max_logprob_gap, else automatic by model.dtype), its check and its error message.

End to end (a skipped weight sync caught on the real stack): tests/flows/test_logprob_gate.py
"""

from pathlib import Path

import pyarrow as pa
import pytest
from prefect.states import Failed

from stages.common import store_of
from stages.config import ConfigError, load_config
from stages.score import LogprobGateError, _retry_unless_gate, check_logprob_gap, max_logprob_gap, score_task

QUICKSTART = str(Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml")


def test_bound_is_automatic_by_dtype_unless_set():
    assert max_logprob_gap(load_config(QUICKSTART, ["model.dtype=bfloat16"])) == 1.043
    assert max_logprob_gap(load_config(QUICKSTART, ["model.dtype=float32"])) == 1.01
    assert max_logprob_gap(load_config(QUICKSTART, ["model.dtype=bfloat16", "algo.max_logprob_gap=1.2"])) == 1.2
    assert max_logprob_gap(load_config(QUICKSTART, ["algo.max_logprob_gap=1.0001"])) == 1.0001
    assert max_logprob_gap(load_config(QUICKSTART, ["algo.max_logprob_gap=.inf"])) == float("inf")


@pytest.mark.parametrize("value", ["1.0", "0.5", "-1"])
def test_bound_must_exceed_one(value):
    # mean exp|Δ| is 1 at exact agreement: a bound ≤ 1 would fail every iteration.
    with pytest.raises(ConfigError, match="algo.max_logprob_gap: Input should be greater than 1"):
        load_config(QUICKSTART, [f"algo.max_logprob_gap={value}"])


def _rollout(version: int) -> pa.Table:
    return pa.table({"policy_version": pa.array([version] * 4, pa.int64())})


def test_gap_within_the_bound_passes_and_above_it_names_everything(tmp_path):
    config = load_config(QUICKSTART, [f"storage.root={tmp_path}"])
    store = store_of(config, str(tmp_path / "runs" / "r"))
    check_logprob_gap(config, store, 3, _rollout(2), {"rollout/logprob_diff_mean": 1.0099,
                                                      "rollout/logprob_abs_diff_max": 0.05})
    with pytest.raises(LogprobGateError) as err:
        check_logprob_gap(config, store, 3, _rollout(2), {"rollout/logprob_diff_mean": 1.0234567,
                                                          "rollout/logprob_abs_diff_max": 0.4})
    msg = str(err.value)
    for part in ("iteration 3", "1.023457", "algo.max_logprob_gap = 1.01 (automatic for model.dtype=float32)",
                 "reported policy version 2", "weight sync", "iter-000003/generate", "--set algo.max_logprob_gap="):
        assert part in msg, part
    assert "\n" not in msg  # `ppoflow train` prints it as one line


def test_nan_gap_fails_the_gate(tmp_path):
    config = load_config(QUICKSTART, [f"storage.root={tmp_path}", "algo.max_logprob_gap=1e9"])
    with pytest.raises(LogprobGateError, match=r"diff_mean = nan exceeds algo.max_logprob_gap = 1000000000.0 \("):
        check_logprob_gap(config, store_of(config, str(tmp_path / "r")), 1, _rollout(0),
                          {"rollout/logprob_diff_mean": float("nan"), "rollout/logprob_abs_diff_max": float("nan")})


def test_prefect_does_not_retry_the_gate():
    # A retry would score the same committed rollout on the same weights: it only delays the gate's error.
    task = score_task.with_options(retries=3)  # what flows/ppo.py does
    assert task.retry_condition_fn is _retry_unless_gate
    assert task.retry_condition_fn(task, None, Failed(data=LogprobGateError("gap"))) is False
    assert task.retry_condition_fn(task, None, Failed(data=RuntimeError("worker died"))) is True
