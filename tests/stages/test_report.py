"""The report stage on real committed iterations, with Prefect's artifact calls captured (no API needed): the iteration
table a process builds report by report equals the one a resumed process rebuilds from storage, reporting an
iteration reads only that iteration's markers, and one TensorBoard writer serves every iteration of a flow run.

Run alone:  .venv/bin/pytest tests/stages/test_report.py
"""

import glob

import pyarrow as pa
import pytest

from stages.config import load_config
from stages.report import report
from stages.setup import close_run
from storage.run import RunStore, run_uri
from storage.schema import SCHEMAS

STAGE_SCHEMAS = {"generate": "rollout", "score": "scored", "advantages": "experience", "update": "metrics",
                 "sync": "sync"}


def _commit_iteration(store: RunStore, iteration: int) -> None:
    """All five stages of `iteration` with the real schemas (empty tables: the markers are what the report reads)."""
    metrics = {"score": {"rollout/reward_mean": 0.25 * iteration}, "advantages": {"rollout/kl": 0.01 * iteration}}
    for stage, schema in STAGE_SCHEMAS.items():
        store.write_stage(iteration, stage, pa.table({f.name: pa.array([], f.type) for f in SCHEMAS[schema]}),
                          schema, SCHEMAS[schema], config_hash="test", metrics=metrics.get(stage, {}), seconds=1.5)


def test_report_reads_only_its_iteration_and_a_new_process_reports_the_same(tmp_path, monkeypatch):
    import prefect.artifacts
    from prefect.cache_policies import NO_CACHE
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from stages.report import report_task

    assert report_task.name == "report" and report_task.cache_policy is NO_CACHE
    artifacts = {}
    monkeypatch.setattr(prefect.artifacts, "create_table_artifact",
                        lambda table, key, description: artifacts.__setitem__(key, table))
    monkeypatch.setattr(prefect.artifacts, "create_progress_artifact",
                        lambda progress, key, description: artifacts.__setitem__(key, progress))
    config = load_config(base={"model": {"path": "unused"}, "data": {"prompts": "unused.jsonl"},
                               "storage": {"root": str(tmp_path)}, "run_id": "r1", "iterations": 4})
    uri = run_uri(str(tmp_path), "r1")
    store = RunStore(uri)
    for n in (1, 2, 3):
        _commit_iteration(store, n)
    read = []
    marker = RunStore.marker
    monkeypatch.setattr(RunStore, "marker", lambda self, stage_uri: read.append(stage_uri) or marker(self, stage_uri))

    for n in (1, 2, 3):  # one flow run, iteration by iteration
        read.clear()
        row = report(config, uri, n)
        assert row["rollout/reward_mean"] == 0.25 * n
    assert {u.rsplit("/", 2)[-2] for u in read} == {"iter-000003"}  # not the markers of iterations 1 and 2 again
    table = artifacts["r1-iterations"]
    assert [(r["iteration"], r["reward"], r["kl"]) for r in table] == [(1, 0.25, 0.01), (2, 0.5, 0.02), (3, 0.75, 0.03)]
    assert artifacts["r1-progress"] == 75.0 and artifacts["r1-rollouts"] == []
    close_run(config, uri, stop_workers=False)

    report(config, uri, 3)  # a resumed flow run re-reports its last iteration: the same table, from storage
    assert artifacts["r1-iterations"] == table
    close_run(config, uri, stop_workers=False)

    # One event file per flow run, each opened once; the second's restart marker replaces the re-logged step 3.
    assert len(glob.glob(f"{uri}/tensorboard/events.out.tfevents.*")) == 2
    points = EventAccumulator(f"{uri}/tensorboard").Reload().Scalars("rollout/reward_mean")
    assert [(p.step, p.value) for p in points] == [(1, 0.25), (2, 0.5), (3, pytest.approx(0.75))]
