"""The rule reward's calling convention: fn(prompts, responses, metadata) always works; a function that takes
labels (a `labels` parameter, **kwargs, a 4th positional parameter or *args) gets the data.label_key values."""

import json
import sys
import types

import pyarrow as pa
import pytest

from stages.score import compute_rewards, labels_argument

ROWS = [{"reward_model": {"ground_truth": "6"}, "label": "6"}, {"reward_model": {"ground_truth": "8"}, "label": "8"}]


def _rollout() -> pa.Table:
    return pa.table({"sample_id": ["it1-g0-p0-s0", "it1-g1-p1-s0"], "prompt": ["What is 2*3?", "What is 2*4?"],
                     "response": ["6", "9"], "metadata": [json.dumps(r) for r in ROWS]})


def three(prompts, responses, metadata):
    return [float(m["label"] == r) for r, m in zip(responses, metadata)]


def keyword(prompts, responses, metadata, *, labels):
    return [float(label == r) if labels is not None else -1.0 for r, label in zip(responses, labels or [None] * 2)]


def positional(prompts, responses, metadata, answers):  # a 4th parameter of any name
    return [float(answer == r) for r, answer in zip(responses, answers)]


def kwargs(prompts, responses, metadata, **extra):
    return [float(label == r) for r, label in zip(responses, extra["labels"])]


def star(*args):
    return [float(label == r) for r, label in zip(args[1], args[3])]


@pytest.fixture
def module(monkeypatch):
    mod = types.ModuleType("label_rewards")
    for fn in (three, keyword, positional, kwargs, star):
        setattr(mod, fn.__name__, fn)
    monkeypatch.setitem(sys.modules, "label_rewards", mod)
    return mod


@pytest.mark.parametrize("fn, how", [(three, None), (keyword, "keyword"), (positional, "positional"),
                                     (kwargs, "keyword"), (star, "positional"), (len, None)])
def test_the_signature_decides(fn, how):
    assert labels_argument(fn) == how


@pytest.mark.parametrize("name", ["keyword", "positional", "kwargs", "star"])
@pytest.mark.parametrize("label_key", ["label", "reward_model.ground_truth"])
def test_labels_reach_functions_that_take_them(module, name, label_key):
    assert compute_rewards(f"label_rewards:{name}", _rollout(), label_key=label_key) == [1.0, 0.0]


def test_three_argument_functions_keep_working_and_unset_labels_are_none(module):
    assert compute_rewards("label_rewards:three", _rollout(), label_key="label") == [1.0, 0.0]
    assert compute_rewards("label_rewards:keyword", _rollout()) == [-1.0, -1.0]  # data.label_key unset: labels=None
