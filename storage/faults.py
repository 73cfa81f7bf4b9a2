"""Named fault points for crash tests, driven by the environment; a no-op unless PPOFLOW_FAULTS is set.

    PPOFLOW_FAULTS="update.after_train@2=kill,score.start@1=raise"   point@iteration=action, comma-separated
    PPOFLOW_FAULTS_ONCE_DIR=/tmp/faults                               each listed point fires once, across restarts

Actions: `kill` SIGKILLs the process (a crash: no cleanup, no finally), `raise` raises RuntimeError, `stall` blocks
the calling thread for good (a disk that stops answering: a background writer that never finishes). The run's
actors see the driver's PPOFLOW_FAULTS (workers/cluster.py worker_env), so points inside them fire too.

It lives in storage/ (which imports nothing of ours) so that points can sit inside the storage writes too (a Parquet
part written, its marker not). The points: run.opened, run.workers_started; each stage's start / before_commit /
after_commit (the stage skeleton, stages/common.py); {stage}.mid_write and {stage}.before_marker inside the Parquet
commit; generate.turn{t} before the first engine batch of turn t (0-based) of multi-turn episodes (workers/episodes.py);
update.after_train / policy_saved (mid-checkpoint); checkpoint.writing (a trainer writing a checkpoint file,
in its background writer thread when checkpoint.background); sync.before_engine_update; policy.train inside the
policy's Ray actors (each rank).
"""

import os
import signal
import sys
import threading


def fault_point(name: str, iteration: int) -> None:
    """Deterministic fault injection for tests: PPOFLOW_FAULTS="update.after_train@2=kill,score.start@1=raise".

    `kill` SIGKILLs this process (a crash: no cleanup, no finally); `raise` raises RuntimeError; `stall` never
    returns. With PPOFLOW_FAULTS_ONCE_DIR set, each point fires once (a flag file there, named `point@iteration` and
    written just before the fault, remembers it), so a retried or resumed run that inherits the same environment gets
    past it."""
    spec = os.environ.get("PPOFLOW_FAULTS", "")
    if not spec:
        return
    once = os.environ.get("PPOFLOW_FAULTS_ONCE_DIR")
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, _, action = item.partition("=")
        if point == f"{name}@{iteration}":
            if once:
                flag = os.path.join(once, point)
                if os.path.exists(flag):
                    continue
                os.makedirs(once, exist_ok=True)
                open(flag, "w").close()
            # Said before it happens, so a log (an actor's file, driver.log) shows where the process stopped.
            print(f"ppoflow: injected fault at {point} ({action})", file=sys.stderr, flush=True)
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if action == "stall":
                threading.Event().wait()
            raise RuntimeError(f"injected fault at {point}")
