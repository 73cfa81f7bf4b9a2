"""The Python sandbox of tool calls (ppoflow/envs/sandbox.py): no network (a network namespace, or the audit hook where
namespaces are not permitted), killed at its CPU-time, wall-clock and output limits, a memory bomb ends at its memory
limit, a fresh folder and a bare environment; and a tool episode goes on after each of these.

Run alone:  .venv/bin/pytest -q tests/envs/test_sandbox.py
"""

import os
import socket
import threading

import pytest

from ppoflow.envs.sandbox import run_python
from ppoflow.envs.tools import ToolEnv

NETWORK_MODES = {"namespace": "namespace", "audit": "audit hook"}


@pytest.fixture
def server():
    """A TCP server on 127.0.0.1 that accepts connections (and answers "hi"): reachable from this process."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def serve():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            conn.sendall(b"hi")
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    listener.close()


def test_runs_code_in_a_fresh_folder_with_a_bare_environment():
    result = run_python("import os, sys; print(sorted(os.environ), os.listdir('.'), os.getcwd() == os.environ['HOME'])")
    assert result.ok and result.killed is None
    assert result.output.strip() == "['HOME', 'LANG', 'PATH', 'TMPDIR'] ['main.py'] True"
    assert os.environ.get("AWS_SECRET_ACCESS_KEY")  # the test session's fake secret: set here, absent there
    again = run_python("import os; open('left.txt', 'w').write('x'); print(os.listdir('.'))")
    assert "left.txt" in again.output and "left.txt" not in run_python("import os; print(os.listdir('.'))").output


@pytest.mark.parametrize("network", ["namespace", "audit"])
def test_refuses_network(server, network):
    code = (f"import socket\ns = socket.create_connection(('127.0.0.1', {server}), timeout=5)\n"
            "print('connected', s.recv(2))")
    with socket.create_connection(("127.0.0.1", server), timeout=5) as s:  # reachable from outside the sandbox
        assert s.recv(2) == b"hi"
    result = run_python(code, network=network, wall_s=30)
    assert result.network == NETWORK_MODES[network]
    assert "connected" not in result.output and result.exit_code == 1
    expected = "Network is unreachable" if network == "namespace" else "PermissionError: sandbox: socket"
    assert expected in result.output, result.output
    if network == "audit":  # the routes around the hook are closed too
        for escape in ("import subprocess; subprocess.run(['true'])", "import os; os.system('true')",
                       "import ctypes"):
            out = run_python(escape, network="audit")
            assert out.exit_code == 1 and "is not allowed" in out.output, (escape, out.output)


def test_auto_picks_a_namespace_where_permitted(server):
    result = run_python(f"import socket; socket.create_connection(('127.0.0.1', {server}), timeout=5)")
    assert result.network in NETWORK_MODES.values() and result.exit_code == 1


def test_killed_at_the_cpu_time_limit():
    result = run_python("while True: pass", cpu_s=1, wall_s=120)
    assert result.killed == "cpu" and result.exit_code < 0 and not result.ok


def test_killed_at_the_wall_clock_limit():
    result = run_python("import time; time.sleep(60)", wall_s=2)
    assert result.killed == "wall" and result.seconds < 30


@pytest.mark.parametrize("bomb", ["x = bytearray(1 << 34)",
                                  "chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 24))"])
def test_a_memory_bomb_ends_at_the_memory_limit(bomb):
    result = run_python(bomb, memory_mb=128, wall_s=60)
    assert result.exit_code == 1 and "MemoryError" in result.output and result.killed is None


def test_output_is_cut():
    result = run_python("while True: print('x' * 100)", max_output_chars=300, wall_s=60)
    assert result.killed == "output" and "characters cut) ..." in result.output and len(result.output) == 300
    result = run_python("print('a' * 1000)\nraise ValueError('the end')", max_output_chars=200)
    assert result.output.startswith("aaaa") and result.output.rstrip().endswith("ValueError: the end")
    assert "<string>" not in result.output  # the sandbox's own frame is not in the traceback


@pytest.mark.parametrize("code, wall_s, error", [
    ("while True: pass", 60, "killed at the CPU-time limit"),
    ("x = bytearray(1 << 34)", 60, "MemoryError"),
    ("import time; time.sleep(60)", 3, "killed at the time limit"),
    ("import socket; socket.create_connection(('1.1.1.1', 80), timeout=5)", 60, "OSError"),
])
def test_a_tool_episode_goes_on_after_a_killed_program(code, wall_s, error):
    env = ToolEnv(tools=["python"], cpu_s=1, wall_s=wall_s)
    observation, reward, done, info = env.step(f"<python>{code}</python>")
    assert not done and info == {"tool": "python", "error": True} and reward == 0.0
    assert observation["role"] == "tool" and error in observation["content"], observation
    assert env.step("42") == (None, 0.0, True, {})  # the next turn, an answer, ends the episode
