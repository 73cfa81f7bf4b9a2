"""The environments (ppoflow/envs): the single-turn env, the tool env's call formats and calculator, and the
multiplication task (ppoflow/tasks/calc.py) that the tool benchmark trains on.

Run alone:  .venv/bin/pytest -q tests/envs/test_envs.py
"""

import pytest

from ppoflow.envs.base import SingleTurnEnv
from ppoflow.envs.tools import ToolEnv, calculate, parse_call
from ppoflow.tasks import calc


def test_single_turn_env_gives_the_prompt_and_ends_after_one_turn():
    env = SingleTurnEnv(prompt_key="question")
    assert env.reset({"question": "What is 2*3?", "answer": "6"}) == "What is 2*3?"
    assert env.step("6") == (None, 0.0, True, {})


@pytest.mark.parametrize("expression, value", [
    ("4821*7356", "35463276"), ("(1+2)*3", "9"), ("-3+4", "1"), ("7/2", "3.5"), ("7//2", "3"), ("2**64",
                                                                                                 str(2**64)),
    (" 10 % 4 ", "2"), ("1.5*2", "3.0"),
])
def test_calculator(expression, value):
    assert calculate(expression) == value


@pytest.mark.parametrize("expression, error", [
    ("1/0", "division by zero"), ("2**1000", "exponent 1000"), ("__import__('os').system('true')", "not arithmetic"),
    ("x + 1", "not arithmetic"), ("1 +", "SyntaxError"), ("'a' * 3", "not arithmetic"),
    ("(10**64)**64", "digits"), ("9**64**2", "exponent"),
])
def test_calculator_refuses_anything_else(expression, error):
    with pytest.raises(ValueError, match=error):
        calculate(expression)


def test_call_formats():
    assert parse_call("let me see <calc>12*3</calc> then", "tags") == ("calc", "12*3")
    assert parse_call("<python>print(1)\nprint(2)</python>", "tags") == ("python", "print(1)\nprint(2)")
    assert parse_call("36", "tags") is None
    assert parse_call("<calc>12*3", "tags") == "<calc> without </calc>"
    hermes = '<tool_call>\n{"name": "calc", "arguments": {"expression": "12*3"}}\n</tool_call>'
    assert parse_call(hermes, "hermes") == ("calc", "12*3")
    assert parse_call('<tool_call>{"name": "python", "arguments": {"code": "print(1)"}}</tool_call>',
                      "hermes") == ("python", "print(1)")
    assert "JSON" in parse_call("<tool_call>{calc}</tool_call>", "hermes")
    assert parse_call("<calc>1</calc>", "hermes") is None  # another format's call is an answer


def test_tool_env_answers_calls_with_tool_messages_and_ends_on_an_answer():
    env = ToolEnv(tools=["calc"])
    assert env.reset({"prompt": "What is 12*3?"}) == "What is 12*3?"
    assert env.step("<calc>12*3</calc>") == ({"role": "tool", "content": "36"}, 0.0, False,
                                             {"tool": "calc", "error": False})
    observation, _, done, info = env.step("<calc>12/0</calc>")
    assert observation["content"] == "error: division by zero" and not done and info["error"]
    observation, _, done, info = env.step("<python>print(1)</python>")
    assert "no tool 'python' here" in observation["content"] and not done and info["error"]
    observation, _, done, _ = env.step("<calc>1+")
    assert observation["content"] == "error: <calc> without </calc>" and not done
    assert env.step("36") == (None, 0.0, True, {})
    with pytest.raises(ValueError, match="rollout.env_args"):
        ToolEnv(tools=["browser"])


def test_multiplication_task():
    rows = calc.make_prompts(500, seed=3)
    assert rows == calc.make_prompts(500, seed=3) and len({r["prompt"] for r in rows}) == 500
    for row in rows:
        a, b = map(int, row["prompt"].removeprefix("What is ").removesuffix("?").split("*"))
        assert calc.LOW <= a <= calc.HIGH and calc.LOW <= b <= calc.HIGH
        assert row["answer"] == str(a * b) and len(row["answer"]) == 8
        assert calculate(calc.tool_call(row).removeprefix("<calc>").removesuffix("</calc>")) == row["answer"]
    answer = rows[0]["answer"]
    assert calc.reward(["q"] * 3, [answer, "12345678", "<calc>1*2</calc>"], [{"answer": answer}] * 3) == [1.0, 0.1,
                                                                                                           0.0]
