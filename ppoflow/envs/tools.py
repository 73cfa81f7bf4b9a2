"""A tool-calling environment: the policy calls tools in its turns, the tools' outputs come back as `tool` messages,
and a turn without a call is the answer that ends the episode.

    rollout:
      env: ppoflow.envs.tools:ToolEnv
      env_args: {tools: [calc, python], call_format: tags}

Call formats (`call_format`):
- `tags`, a simple format for small models: `<calc>EXPRESSION</calc>` or `<python>CODE</python>` anywhere in the turn
  (the first complete one is run), e.g. `<calc>4821*7356</calc>`;
- `hermes`, the tool-call format of the Qwen2.5 / Qwen3 / Hermes chat templates: `<tool_call>{"name": "calc",
  "arguments": {"expression": "4821*7356"}}</tool_call>` (`python` takes {"code": ...}).
The output comes back as the chat message {"role": "tool", "content": OUTPUT}, which the episode loop renders with the
tokenizer's chat template (workers/episodes.py). A malformed call, an unknown tool, a failing expression, code that
raises or hits a limit: each becomes an `error: ...` output and the episode goes on; nothing a tool does fails the
stage.

Tools:
- `calc`: an arithmetic expression of integers and decimals with + - * / // % ** and parentheses, evaluated exactly on
  Python numbers without eval (exponents up to 64, results up to 4,000 digits);
- `python`: a program run in the sandbox of ppoflow/envs/sandbox.py (CPU time, memory, wall clock and output
  limits, no network, a fresh temporary folder); its output (stdout and stderr) is the observation.

Run alone:  python -m ppoflow.envs.tools '<calc>4821*7356</calc>'
Tests: tests/envs/test_envs.py
"""

from __future__ import annotations

import ast
import json
import operator
import re

from ppoflow.envs.base import Env
from ppoflow.envs.sandbox import cut, run_python

_TAG_CALL = re.compile(r"<(calc|python)>(.*?)</\1>", re.DOTALL)
_HERMES_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_ARGUMENT = {"calc": "expression", "python": "code"}

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPONENT = 64
MAX_DIGITS = 4000


def calculate(expression: str) -> str:
    """The value of an arithmetic expression as text (integers stay exact); ValueError on anything else."""

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](value(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
                raise ValueError(f"exponent {right} is above {MAX_EXPONENT}")
            result = _BINARY[type(node.op)](left, right)
            if isinstance(result, int) and result.bit_length() > MAX_DIGITS * 3.33:
                raise ValueError(f"result over {MAX_DIGITS} digits")
            return result
        raise ValueError(f"not arithmetic: {ast.unparse(node)!r}")

    try:
        tree = ast.parse(expression.strip(), mode="eval")
        return str(value(tree.body))
    except ZeroDivisionError:
        raise ValueError("division by zero") from None
    except (SyntaxError, OverflowError) as err:
        raise ValueError(f"{type(err).__name__}: {err}") from None


def parse_call(text: str, call_format: str) -> tuple[str, str] | str | None:
    """The first tool call of a turn as (tool, argument); an error message for a malformed call; None for no call."""
    if call_format == "tags":
        if (m := _TAG_CALL.search(text)) is not None:
            return m.group(1), m.group(2)
        opened = re.search(r"<(calc|python)>", text)
        return f"<{opened.group(1)}> without </{opened.group(1)}>" if opened else None
    if (m := _HERMES_CALL.search(text)) is None:
        return "<tool_call> without </tool_call>" if "<tool_call>" in text else None
    try:
        call = json.loads(m.group(1))
        name = call["name"]
        return name, call.get("arguments", {})[_ARGUMENT.get(name, "input")]
    except (ValueError, KeyError, TypeError) as err:
        return f"a tool call is JSON {{\"name\": ..., \"arguments\": {{...}}}} ({type(err).__name__}: {err})"


class ToolEnv(Env):
    """Runs the tool calls of each policy turn (module docstring) until a turn without one.

    `tools`: the tools offered (`calc`, `python`); `call_format`: `tags` or `hermes`; `max_output_chars`: a tool's
    output is cut there; `cpu_s`, `memory_mb`, `wall_s`, `network`: the python tool's sandbox limits
    (ppoflow/envs/sandbox.py `run_python`)."""

    def __init__(self, prompt_key: str = "prompt", tools: list[str] = ("calc", "python"), call_format: str = "tags",
                 max_output_chars: int = 256, cpu_s: int = 2, memory_mb: int = 256, wall_s: float = 5.0,
                 network: str = "auto"):
        super().__init__(prompt_key)
        unknown = sorted(set(tools) - set(_ARGUMENT))
        if unknown or call_format not in ("tags", "hermes"):
            raise ValueError(f"rollout.env_args: tools must be among {sorted(_ARGUMENT)} (got {unknown or tools}) "
                             f"and call_format 'tags' or 'hermes' (got {call_format!r})")
        self.tools, self.call_format, self.max_output_chars = list(tools), call_format, max_output_chars
        self.sandbox = {"cpu_s": cpu_s, "memory_mb": memory_mb, "wall_s": wall_s, "network": network,
                        "max_output_chars": max_output_chars}

    def step(self, action: str):
        call = parse_call(action, self.call_format)
        if call is None:
            return None, 0.0, True, {}  # no call: this turn is the answer
        if isinstance(call, str):
            return self._output(f"error: {call}", None, True)
        name, argument = call
        if name not in self.tools:
            return self._output(f"error: no tool {name!r} here (tools: {', '.join(self.tools)})", name, True)
        if name == "calc":
            try:
                return self._output(calculate(str(argument)), name, False)
            except ValueError as err:
                return self._output(f"error: {err}", name, True)
        result = run_python(str(argument), **self.sandbox)
        note = {"cpu": "killed at the CPU-time limit", "wall": "killed at the time limit",
                "output": "output limit reached"}.get(result.killed)
        text = result.output + (f"\nerror: {note}" if note else "")
        return self._output(text.strip() or "(no output)", name, not result.ok)

    def _output(self, text: str, tool: str | None, error: bool):
        return {"role": "tool", "content": cut(text, self.max_output_chars)}, 0.0, False, {"tool": tool,
                                                                                          "error": error}


if __name__ == "__main__":
    import sys

    print(ToolEnv().step(sys.argv[1] if len(sys.argv) > 1 else "<calc>4821*7356</calc>"))
