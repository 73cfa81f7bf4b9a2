"""The report stage on real committed iterations: the iteration table a process builds report by report equals the one
a resumed process rebuilds from storage, reporting an iteration reads only that iteration's markers, one TensorBoard
writer serves every iteration of a flow run; the artifacts hold the table, the best and worst rollouts, the curves
picture and where storage and tracking live; an artifact that would be missing or empty fails the report; in a flow
run each artifact is created once and then updated in place (a real Prefect API); the prewarm imports matplotlib and
the tracker's modules in a fresh process, opens and writes nothing, and the report after it publishes the same bytes.

Run alone:  .venv/bin/pytest tests/stages/test_report.py
"""

import base64
import glob
import io
import json
import re

import pyarrow as pa
import pytest

import stages.report
from stages.config import load_config
from stages.report import ReportError, report
from stages.setup import close_run
from storage.run import RunStore, run_uri
from storage.schema import SCHEMAS

STAGE_SCHEMAS = {"generate": "rollout", "score": "scored", "advantages": "experience", "update": "metrics",
                 "sync": "sync"}
SAMPLES = 10


def _commit_iteration(store: RunStore, iteration: int, samples: int = SAMPLES, reward: bool = True) -> None:
    """All five stages of `iteration` with the real schemas; the advantages table holds `samples` samples whose
    reward is their index / 10 (the report reads the markers and that table)."""
    metrics = {"score": {"rollout/reward_mean": 0.25 * iteration} if reward else {},
               "advantages": {"rollout/kl": 0.01 * iteration}}
    for stage, schema in STAGE_SCHEMAS.items():
        rows = [{"sample_id": f"it{iteration}-s{i}", "prompt": f"What is 2*{i}?", "response": str(2 * i),
                 "reward": i / 10, "advantages": [i / 10 - 0.45] * 3, "finish_reason": "stop"}
                for i in range(samples)] if stage == "advantages" else []
        store.write_stage(iteration, stage, pa.Table.from_pylist(rows, schema=SCHEMAS[schema]), schema,
                          SCHEMAS[schema], config_hash="test", metrics=metrics.get(stage, {}), seconds=1.5)


def _commit_eval(store: RunStore, iteration: int, pass_rate: float) -> None:
    store.write_stage(iteration, "eval", pa.Table.from_pylist([], schema=SCHEMAS["eval"]), "eval", SCHEMAS["eval"],
                      config_hash="test", metrics={"eval/pass_rate": pass_rate, "eval/reward_mean": pass_rate},
                      seconds=0.5)


@pytest.fixture
def published(monkeypatch):
    """What the reports publish, by artifact key (tables parsed): the latest data of each."""
    got = {}
    monkeypatch.setattr(stages.report, "_publish", lambda artifacts, prefix: got.update({
        f"{prefix}-{name}": json.loads(a["data"]) if a["type"] == "table" else a["data"]
        for name, a in artifacts.items()}))
    return got


def _config(tmp_path, run_id: str, **extra):
    return load_config(base={"model": {"path": "unused"}, "data": {"prompts": "unused.jsonl"},
                             "storage": {"root": str(tmp_path)}, "run_id": run_id, "iterations": 4, **extra})


def test_report_reads_only_its_iteration_and_a_new_process_reports_the_same(tmp_path, monkeypatch, published):
    from prefect.cache_policies import NO_CACHE
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from stages.report import report_task

    assert report_task.name == "report" and report_task.cache_policy is NO_CACHE
    config = _config(tmp_path, "r1")
    uri = run_uri(str(tmp_path), "r1")
    store = RunStore(uri)
    _commit_eval(store, 0, 0.375)  # the starting policy's evaluation: row 0
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
    table = published["r1-iterations"]
    assert [(r["iteration"], r["reward"], r["kl"], r["eval_pass_rate"]) for r in table] == [
        (0, None, None, 0.375), (1, 0.25, 0.01, None), (2, 0.5, 0.02, None), (3, 0.75, 0.03, None)]
    assert {c for r in table for c in r} == {"iteration", *stages.report.COLUMNS}  # every row, every column
    assert table[1]["generate_s"] == table[1]["sync_s"] == 1.5
    assert published["r1-progress"] == 75.0
    close_run(config, uri, stop_workers=False)

    published.clear()
    report(config, uri, 3)  # a resumed flow run re-reports its last iteration: the same table, from storage
    assert published["r1-iterations"] == table
    close_run(config, uri, stop_workers=False)

    # One event file per flow run, each opened once; the second's restart marker replaces the re-logged step 3.
    assert len(glob.glob(f"{uri}/tensorboard/events.out.tfevents.*")) == 2
    points = EventAccumulator(f"{uri}/tensorboard").Reload().Scalars("rollout/reward_mean")
    assert [(p.step, p.value) for p in points] == [(1, 0.25), (2, 0.5), (3, pytest.approx(0.75))]


def test_artifacts_hold_best_and_worst_rollouts_the_curves_and_where_the_run_lives(tmp_path, published):
    from PIL import Image

    config = _config(tmp_path, "r2")
    uri = run_uri(str(tmp_path), "r2")
    store = RunStore(uri)
    for n in (1, 2):
        _commit_iteration(store, n)
    report(config, uri, 1)
    report(config, uri, 2)
    close_run(config, uri, stop_workers=False)

    rollouts = published["r2-rollouts"]  # of iteration 2: the 4 highest rewards, then the 4 lowest
    assert [(r["which"], r["sample"], r["reward"]) for r in rollouts] == [
        ("best", "it2-s9", 0.9), ("best", "it2-s8", 0.8), ("best", "it2-s7", 0.7), ("best", "it2-s6", 0.6),
        ("worst", "it2-s0", 0.0), ("worst", "it2-s1", 0.1), ("worst", "it2-s2", 0.2), ("worst", "it2-s3", 0.3)]
    assert rollouts[0]["prompt"] == "What is 2*9?" and rollouts[0]["response"] == "18"
    assert rollouts[0]["advantage"] == 0.45

    overview = published["r2-overview"]
    assert "### run r2: iteration 2 of 4" in overview
    assert f"**storage**: `{uri}`" in overview
    assert f"`tensorboard --logdir {uri}/tensorboard`" in overview  # the default tracker, inside the run folder
    png = base64.b64decode(re.search(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", overview).group(1))
    assert Image.open(io.BytesIO(png)).size == (800, 600)


def _drop(name):
    build = stages.report.build_artifacts
    return lambda *a, **k: {n: art for n, art in build(*a, **k).items() if n != name}


@pytest.mark.parametrize("broken, error", [
    ("no samples", "the rollouts table has no rows"),
    ("no reward", r"a row of the iterations table has no reward: \{'iteration': 1"),
    ("no picture", "the overview markdown has no curves picture"),
    ("no progress", "the progress artifact is missing"),
    ("no table", "the iterations artifact is missing"),
])
def test_a_missing_or_empty_artifact_fails_the_report_naming_it(tmp_path, monkeypatch, published, broken, error):
    config = _config(tmp_path, "r3")
    uri = run_uri(str(tmp_path), "r3")
    _commit_iteration(RunStore(uri), 1, samples=0 if broken == "no samples" else SAMPLES,
                      reward=broken != "no reward")
    if broken == "no picture":
        monkeypatch.setattr("stages.curves.curves_png", lambda rows, title: None)
    elif broken in ("no progress", "no table"):
        monkeypatch.setattr(stages.report, "build_artifacts", _drop(broken.split()[1].replace("table", "iterations")))
    try:
        with pytest.raises(ReportError, match=error):
            report(config, uri, 1)
        assert not published  # nothing half-published
    finally:
        close_run(config, uri, stop_workers=False)


def test_a_flow_run_creates_each_artifact_once_and_updates_it(tmp_path, prefect_backend):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    config = _config(tmp_path, "r4")
    uri = run_uri(str(tmp_path), "r4")
    for n in (1, 2):
        _commit_iteration(RunStore(uri), n)

    @flow
    def two_reports():
        from prefect.runtime import flow_run

        for n in (1, 2):
            stages.report.report_task(config, uri, n)
        close_run(config, uri, stop_workers=False)
        return str(flow_run.id)

    flow_run_id = two_reports()
    client = get_client(sync_client=True)
    arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
        any_=[flow_run_id])))
    assert sorted(a.key for a in arts) == ["r4-iterations", "r4-overview", "r4-progress", "r4-rollouts"]
    by_key = {a.key: a for a in arts}
    assert [r["iteration"] for r in json.loads(by_key["r4-iterations"].data)] == [1, 2]  # updated by report 2
    assert by_key["r4-progress"].data == 50.0
    assert "it2-s9" in by_key["r4-rollouts"].data
    latest = client.read_latest_artifacts()
    assert {a.key: a.latest_id for a in latest if a.key.startswith("r4-")} == {k: a.id for k, a in by_key.items()}



PREWARMED_REPORT = """
import json, os, sys
import stages.report
from stages.config import load_config
from stages.setup import close_run
from storage.run import run_uri

root, logger = sys.argv[1], sys.argv[2]
config = load_config(base={"model": {"path": "unused"}, "data": {"prompts": "unused.jsonl"},
                           "storage": {"root": root}, "run_id": "r5", "iterations": 4, "tracking": {"logger": logger}})
modules = ("matplotlib.figure", "matplotlib.backends.backend_agg", "torch.utils.tensorboard")
uri = run_uri(root, "r5")
before = [m for m in modules if m in sys.modules]
stages.report.prewarm(config).join()
imported, files = [m for m in modules if m in sys.modules], sorted(os.listdir(uri))
published = {}
stages.report._publish = lambda artifacts, prefix: published.update({
    f"{prefix}-{n}": json.loads(a["data"]) if a["type"] == "table" else a["data"] for n, a in artifacts.items()})
stages.report.report(config, uri, 1)
close_run(config, uri, stop_workers=False)
print(json.dumps({"before": before, "imported": imported, "files": files, "published": published}))
"""


@pytest.mark.parametrize("logger", ["tensorboard", "none"])
def test_the_prewarm_imports_what_the_first_report_needs_and_changes_nothing_it_publishes(tmp_path, published,
                                                                                       logger):
    import os
    import subprocess
    import sys
    from pathlib import Path

    uri = run_uri(str(tmp_path), "r5")
    _commit_iteration(RunStore(uri), 1)
    stored = sorted(os.listdir(uri))
    # A fresh interpreter, so that nothing the report needs is imported before the prewarm.
    out = subprocess.run([sys.executable, "-c", PREWARMED_REPORT, str(tmp_path), logger], capture_output=True,
                         text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["before"] == []
    assert got["imported"] == ["matplotlib.figure", "matplotlib.backends.backend_agg",
                               *(["torch.utils.tensorboard"] if logger == "tensorboard" else [])]
    assert got["files"] == stored  # imports only: no tracker opened, nothing written

    # The same report in this process, without a prewarm: the same artifacts, the curves picture byte for byte.
    config = _config(tmp_path, "r5", tracking={"logger": logger})
    report(config, uri, 1)
    close_run(config, uri, stop_workers=False)
    assert "(data:image/png;base64," in published["r5-overview"]
    assert got["published"] == published
