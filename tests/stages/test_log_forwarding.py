"""What of Ray's driver-side log stream reaches a flow run's log: the run's actors' lines (vLLM, DeepSpeed, ours;
stderr as WARNING) and Ray's error logs pass, another run's actors' lines and Ray's autoscaler status dumps do not,
its events do. The batches are as Ray's
dispatcher hands them to `forward_worker_logs`; the autoscaler block was recorded from Ray 2.60 while an actor waited
for CPUs that the node lacks.

Run alone:  .venv/bin/pytest tests/stages/test_log_forwarding.py
"""

import logging

import pytest

from stages.setup import _flow_run_log_handler
from workers.cluster import actor_name, forward_worker_logs

RUN = "/runs/r1"  # the run whose flow run forwards; its actors are named `r1-<hash>:<role>` (RunActor's repr)

AUTOSCALER_BLOCK = """\
2026-12-07 03:42:15,690\tINFO autoscaler.py:147 -- The autoscaler took 0.0 seconds to fetch the list of non-terminated nodes.
2026-12-07 03:42:15,691\tINFO autoscaler.py:408 -- 
======== Autoscaler status: 2026-12-07 03:42:15.691057 ========
Node status
---------------------------------------------------------------
Active:
 1 node_5e306704c3cd3c8101d214e9b8ea10ab045936a69c17cd6b5c9f735c
Pending:
 (no pending nodes)
Recent failures:
 (no failures)

Resources
---------------------------------------------------------------
Total Usage:
 1.0/2.0 CPU
 0B/15.53GiB memory
 0B/6.66GiB object_store_memory

From request_resources:
 (none)
Pending Demands:
 {'CPU': 3.0}: 1+ pending tasks/actors
2026-12-07 03:42:15,691\tINFO autoscaler.py:469 -- The autoscaler took 0.001 seconds to complete the update iteration.
2026-12-07 03:42:15,692\tINFO monitor.py:438 -- :event_summary:Error: No available node types can fulfill resource \
request {'CPU': 3.0}. Add suitable node types to this cluster to resolve this issue.""".split("\n")

DEEPSPEED_WARNING = ("[2026-12-07 03:41:04,696] [WARNING] [real_accelerator.py:213:get_accelerator] Setting "
                     "accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
VLLM_INFO = "INFO 12-07 03:41:12 [llm.py:343] Supported tasks: ['generate']"
ACTOR_ERROR = ["Traceback (most recent call last):", '  File "workers/trainer.py", line 412, in train',
               "ValueError: policy.micro_batch_size: 48 does not divide policy.mini_batch_size 64"]
RAYLET_ERROR = ("[2026-12-07 03:43:01,112 E 17997 18012] (raylet) node_manager.cc:3069: 1 Workers (tasks / actors) "
                "killed due to memory pressure (OOM)")


@pytest.fixture
def forwarded():
    """The records the flow run's log would receive, fed by Ray's own dispatcher."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    records = []
    log = logging.getLogger("test-forwarding")
    log.handlers = [logging.Handler()]
    log.handlers[0].emit = records.append
    log.setLevel(logging.INFO)
    log.propagate = False
    stop = forward_worker_logs(RUN, _flow_run_log_handler(log, "0f1e2d3c-flow-run"))
    yield dispatcher.emit, records
    stop()


def test_autoscaler_status_is_dropped_and_actor_output_kept(forwarded):
    emit, records = forwarded
    # while its constructor runs an actor is known by its class; then by its name
    emit({"pid": "16350", "is_err": True, "actor_name": "PolicyWorker", "lines": [DEEPSPEED_WARNING]})
    for _ in range(3):  # the monitor repeats its block every 5 s while the request waits
        emit({"pid": "autoscaler", "is_err": False, "actor_name": None, "lines": AUTOSCALER_BLOCK})
    emit({"pid": "16377", "is_err": False, "actor_name": actor_name(RUN, "engine-0"), "lines": [VLLM_INFO, "", " "]})
    emit({"pid": "16350", "is_err": True, "actor_name": actor_name(RUN, "policy"), "lines": ACTOR_ERROR})
    emit({"pid": "16999", "is_err": True, "actor_name": actor_name("/runs/other", "policy"), "lines": ACTOR_ERROR})
    emit({"pid": "raylet", "is_err": True, "actor_name": None, "lines": [RAYLET_ERROR]})

    got = [(r.levelname, r.getMessage()) for r in records]
    event = ("Error: No available node types can fulfill resource request {'CPU': 3.0}. Add suitable node types to "
             "this cluster to resolve this issue.")
    assert got == [
        ("WARNING", f"(PolicyWorker pid=16350) {DEEPSPEED_WARNING}"),
        *[("WARNING", f"(pid=autoscaler) {event}")] * 3,  # the event, as Ray's driver prints it, once per block
        ("INFO", f"(engine-0 pid=16377) {VLLM_INFO}"),
        *[("WARNING", f"(policy pid=16350) {line}") for line in ACTOR_ERROR],  # not the other run's
        ("WARNING", f"(pid=raylet) {RAYLET_ERROR}"),
    ]
    assert {r.flow_run_id for r in records} == {"0f1e2d3c-flow-run"}  # the API handler routes on it


def test_autoscaler_v2_events_pass_as_their_message(forwarded):
    emit, records = forwarded
    emit({"pid": "autoscaler", "is_err": False, "actor_name": None, "lines": [
        '{"event_id": "a1", "source_type": "AUTOSCALER", "severity": "INFO", "message": "Resized to 4 CPUs."}',
        '{"event_id": "a2", "source_type": "AUTOSCALER", "severity": "WARNING", "message": "No available node types '
        "can fulfill resource request {'GPU': 1.0}\"}",
        "not an event", '{"broken json']})
    assert [(r.levelname, r.getMessage()) for r in records] == [
        ("INFO", "(pid=autoscaler) Resized to 4 CPUs."),
        ("WARNING", "(pid=autoscaler) No available node types can fulfill resource request {'GPU': 1.0}")]
