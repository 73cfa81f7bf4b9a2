"""Bring up everything `prefect deployment run` needs on this machine, in the foreground, until Ctrl-C:

1. a Prefect server on loopback (SQLite under --home, the UI at http://127.0.0.1:PORT),
2. the process work pool `ppoflow-process`,
3. every deployment of prefect.yaml (`prefect --no-prompt deploy --all`),
4. a process worker on the pool (flow runs are child processes of it, in this repository).

    make serve                                   # = python -m ppoflow.serve
    PREFECT_API_URL=http://127.0.0.1:4200/api prefect deployment run 'ppo-train/quickstart' --watch

Prints `ready` once the worker has registered with the server. Ctrl-C, SIGINT or SIGTERM stops the worker (and the
flow runs it started), then the server, within seconds, and returns. Tests: tests/test_serve.py
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def _wait_healthy(api: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the Prefect server exited with code {server.returncode} (port in use? see its output above)")
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"the Prefect server did not answer {api}/health within {timeout_s:.0f} s")


def _wait_worker(api: str, pool: str, worker: subprocess.Popen, timeout_s: float) -> None:
    """Until the worker's first heartbeat reached the server: from then on it picks up deployment runs."""
    request = urllib.request.Request(f"{api}/work_pools/{pool}/workers/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            sys.exit(f"the worker exited with code {worker.returncode} (see its output above)")
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                if json.load(r):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"no worker registered on pool {pool!r} within {timeout_s:.0f} s")


def _stop(proc: subprocess.Popen, sig: int, grace_s: float) -> None:
    """`sig` to the process's group (the worker's holds its flow runs), SIGKILL to what is left of it after `grace_s`.

    Each child runs in a process group of its own, so that a terminal's Ctrl-C reaches only this process, which stops
    them in order: the worker would otherwise see a second SIGINT from us and SIGKILL itself mid-shutdown. A flow run
    gets the rest of the grace after its worker exits, to report its state to the server."""
    deadline = time.monotonic() + grace_s
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return  # the whole group is gone
        time.sleep(0.1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ppoflow.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--home", default=str(REPO / ".prefect"), help="PREFECT_HOME: server database, settings, logs")
    p.add_argument("--port", type=int, default=4200)
    p.add_argument("--pool", default="ppoflow-process", help="work pool of prefect.yaml's deployments")
    p.add_argument("--no-ui", action="store_true", help="API only (hosts whose Prefect has no UI build)")
    args = p.parse_args(argv)

    # Installed before any child starts, whatever this process inherited: started in the background of a script
    # (`make serve &`), SIGINT arrives ignored, Python keeps ignoring it, and the children would inherit that too (the
    # worker then survived its first SIGINT and this process never returned).
    def on_signal(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    api = f"http://127.0.0.1:{args.port}/api"
    env = {**os.environ, "PREFECT_HOME": args.home, "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           # prefect.yaml's pull step sets the flow run's working directory from this.
           "PPOFLOW_REPO": str(REPO)}
    server_cmd = [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(args.port)]
    server = worker = None
    try:
        server = subprocess.Popen(server_cmd + (["--no-ui"] if args.no_ui else []), env=env, process_group=0)
        _wait_healthy(api, server, timeout_s=120)
        subprocess.run([PREFECT, "work-pool", "create", args.pool, "--type", "process", "--overwrite"], env=env,
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run([PREFECT, "--no-prompt", "deploy", "--all"], env=env, cwd=REPO, check=True)
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", args.pool], env=env, cwd=REPO,
                                  process_group=0)
        _wait_worker(api, args.pool, worker, timeout_s=120)
        print(f"ready: PREFECT_API_URL={api}  (UI: http://127.0.0.1:{args.port})", flush=True)
        worker.wait()
        sys.exit(f"the worker exited with code {worker.returncode}")
    except KeyboardInterrupt:
        pass
    finally:
        # Bounded, so a second Ctrl-C need not interrupt it (and leave the children running).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("stopping the worker and the server", flush=True)
        if worker is not None:  # first: it reports its flow runs' states to the server
            _stop(worker, signal.SIGINT, grace_s=8)
        if server is not None:
            _stop(server, signal.SIGTERM, grace_s=8)


if __name__ == "__main__":
    main()
