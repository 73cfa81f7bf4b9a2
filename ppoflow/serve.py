"""Bring up everything `prefect deployment run` needs on this machine, in the foreground, until Ctrl-C:

1. a Prefect server on loopback (SQLite under --home, the UI at http://127.0.0.1:PORT),
2. the process work pool `ppoflow-process`,
3. every deployment of prefect.yaml (`prefect --no-prompt deploy --all`),
4. a process worker on the pool (flow runs are child processes of it, in this repository).

    make serve                                   # = python -m ppoflow.serve
    PREFECT_API_URL=http://127.0.0.1:4200/api prefect deployment run 'ppo-train/quickstart' --watch

Prints `ready` once the worker is polling. Ctrl-C (or SIGTERM) stops the worker, then the server.
"""

import argparse
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


def _stop(proc: subprocess.Popen, first: int, timeout_s: float = 10) -> None:
    # The worker ignores SIGTERM and needs SIGINT (sometimes twice); the server stops on either.
    for sig in (first, first, signal.SIGKILL):
        if proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ppoflow.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--home", default=str(REPO / ".prefect"), help="PREFECT_HOME: server database, settings, logs")
    p.add_argument("--port", type=int, default=4200)
    p.add_argument("--pool", default="ppoflow-process", help="work pool of prefect.yaml's deployments")
    p.add_argument("--no-ui", action="store_true", help="API only (hosts whose Prefect has no UI build)")
    args = p.parse_args(argv)

    api = f"http://127.0.0.1:{args.port}/api"
    env = {**os.environ, "PREFECT_HOME": args.home, "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           # prefect.yaml's pull step sets the flow run's working directory from this.
           "PPOFLOW_REPO": str(REPO)}
    server_cmd = [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(args.port)]
    server = subprocess.Popen(server_cmd + (["--no-ui"] if args.no_ui else []), env=env)
    worker = None

    def on_sigterm(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        _wait_healthy(api, server, timeout_s=120)
        subprocess.run([PREFECT, "work-pool", "create", args.pool, "--type", "process", "--overwrite"], env=env,
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run([PREFECT, "--no-prompt", "deploy", "--all"], env=env, cwd=REPO, check=True)
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", args.pool], env=env, cwd=REPO)
        print(f"ready: PREFECT_API_URL={api}  (UI: http://127.0.0.1:{args.port})", flush=True)
        worker.wait()
        sys.exit(f"the worker exited with code {worker.returncode}")
    except KeyboardInterrupt:
        pass
    finally:
        if worker is not None:
            _stop(worker, signal.SIGINT)
        _stop(server, signal.SIGTERM)


if __name__ == "__main__":
    main()
