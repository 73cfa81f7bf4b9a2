"""`python -m ppoflow.serve` (what `make serve` runs) stops everything it started within seconds of a Ctrl-C (SIGINT
to its process group), of a SIGTERM sent to it alone, and of a SIGINT sent to it alone after it was started with SIGINT
ignored (`make serve &` in a script: a background job inherits SIGINT ignored; the worker then survived it and serve
never returned).

Run alone:  .venv/bin/pytest tests/test_serve.py
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from workers.cluster import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STOP_WITHIN_S = 20  # serve gives the worker and the server 8 s each before SIGKILL; an idle pair takes ~2 s




def _in_session(sid: int) -> list[psutil.Process]:
    alive = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return alive


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sigint-after-ignored"])
def test_serve_stops_worker_and_server(how, tmp_path, reap_session):
    log = tmp_path / "serve.log"
    ignore_sigint = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if how == "sigint-after-ignored" else None
    with log.open("w") as out:
        serve = subprocess.Popen([sys.executable, "-m", "ppoflow.serve", "--home", str(tmp_path / "home"),
                                  "--port", str(free_port()), "--no-ui"], cwd=REPO, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=ignore_sigint)
    try:
        deadline = time.monotonic() + 240
        while "ready:" not in log.read_text():
            assert serve.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        children = psutil.Process(serve.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()[1:4]) for c in children)
        assert "server start" in names and "worker start" in names, names

        started = time.monotonic()
        if how == "ctrl-c":  # what a terminal does: the signal goes to the whole foreground process group
            os.killpg(serve.pid, signal.SIGINT)
        else:
            serve.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGINT)
        assert serve.wait(timeout=STOP_WITHIN_S) == 0, log.read_text()[-3000:]
        _, alive = psutil.wait_procs(children, timeout=max(0.1, STOP_WITHIN_S - (time.monotonic() - started)))
        assert not alive, [p.cmdline() for p in alive]
        assert not _in_session(serve.pid), [p.cmdline() for p in _in_session(serve.pid)]
    finally:
        reap_session(serve.pid)
