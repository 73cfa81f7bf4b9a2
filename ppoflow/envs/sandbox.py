"""A sandboxed Python executor for tool calls: untrusted code runs in a fresh interpreter with limits, and whatever it
does comes back as text, never as an exception.

Each call (`run_python`) starts `python -I -u` (isolated: no user site, no PYTHONPATH, an environment holding only
PATH, HOME, TMPDIR and LANG, so no credential of the run reaches it; unbuffered, so printed lines and a traceback keep
their order) in a fresh temporary folder, removed afterwards. A bootstrap runs before the code and, on the interpreter
itself (no preexec_fn: the caller has threads), sets:
- CPU time: RLIMIT_CPU (SIGXCPU at the limit, SIGKILL a second later): `while True` dies there;
- memory: RLIMIT_AS (address space): an allocation past it fails (MemoryError), so a memory bomb ends at its limit;
- output: stdout and stderr go to one file capped by RLIMIT_FSIZE (a write past it fails: Python ignores SIGXFSZ and
  gets EFBIG); the caller reads a few times `max_output_chars` of it, so a print bomb cannot fill the caller's memory,
  and shows at most `max_output_chars`: the beginning and the end, the middle cut;
- no network, by one of two means, reported in `SandboxResult.network`:
  `namespace`: unshare(2) into a new network namespace (CLONE_NEWNET, plus CLONE_NEWUSER when not root), which holds
  only a loopback interface that is down: every connection fails (ENETUNREACH), DNS too;
  `audit hook`: where namespaces are not permitted, a `sys.addaudithook` hook refuses socket creation and
  connection, and the escape routes around it from Python (subprocess, os.system / exec / spawn / fork, ctypes).
  A hook is a Python-level guard, not a kernel boundary: code that reaches native code some other way gets past it.
- wall clock: the caller kills the interpreter's process group after `wall_s` (sleeping code uses no CPU time).

Run alone (prints the result of a snippet):  python -m ppoflow.envs.sandbox 'print(sum(range(10)))'
Tests: tests/envs/test_sandbox.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# Runs first in the sandboxed interpreter: limits, network isolation, then the user's code from main.py.
_BOOTSTRAP = r'''
import os, resource, sys
cpu_s, memory_mb, output_bytes, network = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
resource.setrlimit(resource.RLIMIT_FSIZE, (output_bytes, output_bytes))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
mode = None
if network in ("auto", "namespace"):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
    for flags in ((CLONE_NEWNET,) if os.geteuid() == 0 else ()) + (CLONE_NEWUSER | CLONE_NEWNET,):
        if libc.unshare(flags) == 0:
            mode = "namespace"
            break
    del ctypes, libc
    if mode is None and network == "namespace":
        sys.exit("sandbox: unshare(CLONE_NEWNET) is not permitted here")
if mode is None:
    _refused = ("socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
                "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
                "pty.spawn")
    def _hook(event, args):
        if event in _refused or event.startswith("ctypes.") or (event == "import" and args[0] in ("ctypes",
                                                                                                  "_ctypes")):
            raise PermissionError(f"sandbox: {event} is not allowed (no network, no processes)")
    sys.addaudithook(_hook)
    mode = "audit hook"
print(mode, file=sys.stderr, flush=True)
sys.argv = ["main.py"]
with open("main.py") as _f:
    _code = compile(_f.read(), "main.py", "exec")
del _f, os, resource
try:
    exec(_code, {"__name__": "__main__", "__builtins__": __builtins__})
except SystemExit:
    raise
except BaseException as _e:  # the user's traceback, without this bootstrap's frame
    import traceback
    traceback.print_exception(type(_e), _e, _e.__traceback__.tb_next)
    sys.exit(1)
'''


@dataclass
class SandboxResult:
    output: str  # stdout and stderr as written, interleaved; beyond max_output_chars its middle is cut (`cut`)
    exit_code: int | None  # the interpreter's exit status; negative: killed by that signal
    killed: str | None  # "cpu", "wall", "output" when that limit ended it (a memory bomb ends with MemoryError)
    network: str  # how the network was cut: "namespace" or "audit hook"
    seconds: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.killed is None


def run_python(code: str, *, cpu_s: int = 2, memory_mb: int = 256, wall_s: float = 5.0,
               max_output_chars: int = 1024, network: str = "auto") -> SandboxResult:
    """Run `code` in a sandboxed interpreter (module docstring) and return what it printed and how it ended.

    `network`: "auto" (a network namespace when permitted, else the audit hook), "namespace" (fail when not
    permitted) or "audit" (the hook only)."""
    if network not in ("auto", "namespace", "audit"):
        raise ValueError(f"network={network!r}: expected 'auto', 'namespace' or 'audit'")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ppoflow-sandbox-") as work, tempfile.TemporaryFile() as out:
        with open(os.path.join(work, "main.py"), "w") as f:
            f.write(code)
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
        # Room for the mode line and a traceback past the output shown; a little more tells "cut" from "ended".
        output_bytes = 4 * max_output_chars + 4096
        proc = subprocess.Popen([sys.executable, "-I", "-u", "-c", _BOOTSTRAP, str(max(1, int(cpu_s))), str(memory_mb),
                                 str(output_bytes), network], cwd=work, env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, start_new_session=True)
        killed = None
        try:
            proc.wait(timeout=wall_s)
        except subprocess.TimeoutExpired:
            killed = "wall"
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.seek(0)
        raw = out.read(output_bytes + 1)
    mode, _, text = raw.decode("utf-8", "replace").partition("\n")
    if mode not in ("namespace", "audit hook"):  # the bootstrap failed before it said which
        mode, text = "none", raw.decode("utf-8", "replace")
    if killed is None and proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        killed = "cpu"
    elif killed is None and len(raw) >= output_bytes:  # the file reached its cap: writes past it failed
        killed = "output"
    return SandboxResult(cut(text, max_output_chars), proc.returncode, killed, mode, time.perf_counter() - started)


def cut(text: str, limit: int) -> str:
    """`text` within `limit` characters: its beginning and its end (where a traceback says what went wrong), with a
    note of how much was left out between them."""
    if len(text) <= limit:
        return text
    note = f"\n... ({len(text) - limit} characters cut) ...\n"
    head = (limit - len(note)) // 2
    return text[:max(head, 0)] + note + text[len(text) - max(limit - len(note) - head, 0):]


if __name__ == "__main__":
    print(run_python(sys.argv[1] if len(sys.argv) > 1 else "print('hello from the sandbox')"))
