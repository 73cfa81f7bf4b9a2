"""The doubling task: rule reward on right, wrong and garbage responses; deterministic, disjoint prompt files."""

import json

import pytest

from ppoflow.tasks import arith


def _score(response: str, answer: str = "9654") -> float:
    return arith.reward(["What is 2*4827?"], [response], [{"answer": answer}])[0]


@pytest.mark.parametrize("response", ["9654", " 9654", "9654\n", "\t9654  "])
def test_exact_answer_scores_one(response):
    assert _score(response) == 1.0


@pytest.mark.parametrize("response", ["9644", "09654", "0", "96540", "9" * 10_000])
def test_wrong_integer_gets_format_credit_only(response):
    assert _score(response) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "response",
    [
        "",
        "   ",
        "9654 is the answer",
        "96 54",
        "9654.",
        "-9654",
        "+9654",
        "9,654",
        "\u0669\u0666\u0665\u0664",  # Arabic-Indic digits: str.isdigit() is True for them
        "\uff19\uff16\uff15\uff14",  # full-width digits
        "²",
        "<|im_end|>",
        "\x00\ufffd🙂",
        "x" * 10_000,
    ],
)
def test_garbage_scores_zero(response):
    assert _score(response) == 0.0


def test_reward_is_per_row_and_uses_each_rows_answer():
    rows = arith.make_prompts(3, seed=5)
    responses = [rows[0]["answer"], rows[0]["answer"] + "1", "no idea"]
    assert arith.reward([r["prompt"] for r in rows], responses, rows) == [1.0, 0.1, 0.0]


def test_reward_rejects_misaligned_inputs_and_missing_answer():
    with pytest.raises(ValueError, match="aligned"):
        arith.reward(["p", "q"], ["1"], [{"answer": "1"}])
    with pytest.raises(KeyError, match="answer"):
        arith.reward(["p"], ["1"], [{"solution": "1"}])


def test_make_prompts_is_deterministic_distinct_and_correct():
    rows = arith.make_prompts(500, seed=3)
    assert rows == arith.make_prompts(500, seed=3)
    assert rows != arith.make_prompts(500, seed=4)
    assert len({r["prompt"] for r in rows}) == 500
    for row in rows:
        x = int(row["prompt"].removeprefix("What is 2*").removesuffix("?"))
        assert 0 <= x <= arith.MAX_NUMBER
        assert row["answer"] == str(2 * x)


def test_make_prompts_rejects_more_than_exist():
    assert len(arith.make_prompts(arith.N_QUESTIONS, seed=0)) == arith.N_QUESTIONS
    with pytest.raises(ValueError, match="n="):
        arith.make_prompts(arith.N_QUESTIONS + 1, seed=0)


def test_write_prompts_writes_disjoint_jsonl(tmp_path):
    paths = arith.write_prompts(str(tmp_path / "arith"), n_train=300, n_eval=40, seed=1)
    assert set(paths) == {"train", "eval"}
    train = [json.loads(line) for line in open(paths["train"])]
    eval_ = [json.loads(line) for line in open(paths["eval"])]
    assert (len(train), len(eval_)) == (300, 40)
    assert set(train[0]) == {"prompt", "answer"}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in eval_}
    # Same arguments, same files.
    again = arith.write_prompts(str(tmp_path / "again"), n_train=300, n_eval=40, seed=1)
    assert open(again["train"]).read() == open(paths["train"]).read()


def test_default_files_are_disjoint(tmp_path):
    paths = arith.write_prompts(str(tmp_path))
    train = {json.loads(line)["prompt"] for line in open(paths["train"])}
    eval_ = {json.loads(line)["prompt"] for line in open(paths["eval"])}
    assert (len(train), len(eval_)) == (2048, 256)
    assert not train & eval_


def test_labels_replace_the_answer_column():
    """With data.label_key the reference answers come as labels (OpenRLHF's `label`, verl's ground truth)."""
    prompts, responses = ["What is 2*3?", "What is 2*4?"], ["6", "9"]
    assert arith.reward(prompts, responses, [{}, {}], labels=["6", "8"]) == [1.0, pytest.approx(0.1)]
    assert arith.reward(prompts, responses, [{"answer": "6"}, {"answer": "9"}]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="and 1 labels; they must be aligned"):
        arith.reward(prompts, responses, [{}, {}], labels=["6"])
    with pytest.raises(KeyError, match="or name the answer's column in data.label_key"):
        arith.reward(prompts, responses, [{}, {}])
