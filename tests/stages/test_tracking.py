"""Experiment tracking on real committed iterations: what TensorBoard, MLflow (offline SQLite store) and W&B (offline)
hold afterwards, read back with each tool's own reader; a re-logged iteration is not duplicated; `none` writes nothing.

Run alone:  .venv/bin/pytest tests/stages/test_tracking.py
"""

import glob
import json
import math
import os
import struct
import subprocess
import sys
import time

import pyarrow as pa
import pytest

from stages.config import load_config
from stages.tracking import open_tracker, track_iteration
from storage.run import RunStore, run_uri
from storage.schema import SCHEMAS

STAGE_SCHEMAS = {"generate": "rollout", "score": "scored", "advantages": "experience", "update": "metrics",
                 "sync": "sync"}


def _config(tmp_path, *overrides):
    return load_config(base={"model": {"path": "unused"}, "data": {"prompts": "unused.jsonl"},
                             "storage": {"root": str(tmp_path)}, "run_id": "r1"}, overrides=list(overrides))


def _commit_iteration(store: RunStore, iteration: int) -> dict:
    """Commit all five stages of `iteration` with the real schemas (empty tables: only the markers matter here);
    returns the metrics `iteration_summary` should find, NaN included (trackers must skip it)."""
    metrics = {
        "generate": {"rollout/response_len": 6.0 + iteration, "perf/gen_tokens_per_s": 125.0},
        "score": {"rollout/reward_mean": 0.25 * iteration, "rollout/reward_std": 0.5},
        "advantages": {"rollout/kl": 0.01 * iteration, "rollout/advantage_std": float("nan")},
        "update": {"ppo/policy_loss": -0.5 / iteration, "ppo/clipfrac": 0.0, "critic/value_loss": 0.375},
        "sync": {"perf/sync_s": 0.0625},
    }
    expected = {}
    for i, (stage, schema) in enumerate(STAGE_SCHEMAS.items()):
        seconds = 1.5 + i
        store.write_stage(iteration, stage, pa.table({f.name: pa.array([], f.type) for f in SCHEMAS[schema]}),
                          schema, SCHEMAS[schema], config_hash="test", metrics=metrics[stage], seconds=seconds)
        expected.update(metrics[stage])
        expected[f"time/{stage}_s"] = seconds
    return expected


def _finite(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def test_tensorboard_events_in_the_run_folder_hold_every_metric_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    config = _config(tmp_path, "algo.gamma=0.99")
    assert config.tracking.logger == "tensorboard"
    uri = run_uri(str(tmp_path), "r1")
    store = RunStore(uri)
    expected = {n: _commit_iteration(store, n) for n in (1, 2)}
    for n in (1, 2, 2):  # iteration 2 again: what a resumed run does
        # TensorBoard reads a run's event files in name order: time in whole seconds, then a per-process counter
        # that sorts as text (10 before 9). Writers of one run opened in one second could be read out of order once
        # the process has opened ten: a second apart, as the flow runs that open them are.
        time.sleep(1.05)
        row = track_iteration(config, uri, n)
    assert row["iteration"] == 2 and _finite({k: v for k, v in row.items() if k != "iteration"}) == _finite(expected[2])

    events = EventAccumulator(f"{uri}/tensorboard").Reload()
    assert len(glob.glob(f"{uri}/tensorboard/events.out.tfevents.*")) == 3
    assert sorted(events.Tags()["scalars"]) == sorted(_finite(expected[1]))
    for name in _finite(expected[1]):
        points = events.Scalars(name)
        assert [p.step for p in points] == [1, 2], name  # the re-logged step replaced, not duplicated
        assert [p.value for p in points] == pytest.approx([expected[1][name], expected[2][name]], rel=1e-6), name
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"gamma": 0.99' in text and '"logger": "tensorboard"' in text
    hparams = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert hparams.session_start_info.hparams["algo.gamma"].number_value == pytest.approx(0.99)


def test_object_store_root_tracks_into_a_local_folder(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)  # non-local roots track into ./tracking of the driver
    root = f"memory://ppoflow-tracking-{tmp_path.name}"
    config = _config(tmp_path, f"storage.root={root}")
    uri = run_uri(root, "r1")
    expected = _commit_iteration(RunStore(uri), 1)
    track_iteration(config, uri, 1)
    events = EventAccumulator(str(tmp_path / "tracking" / "r1" / "tensorboard")).Reload()
    assert events.Scalars("rollout/reward_mean")[0].value == expected["rollout/reward_mean"]


def test_mlflow_offline_store_resumes_the_same_run(tmp_path):
    import logging

    from mlflow.tracking import MlflowClient

    config = _config(tmp_path, "tracking.logger=mlflow", "tracking.project=ppoflow-test")
    uri = run_uri(str(tmp_path), "r1")
    store = RunStore(uri)
    expected = {n: _commit_iteration(store, n) for n in (1, 2)}
    for n in (1, 2, 2):
        track_iteration(config, uri, n)
    # A second process resuming the run with a longer schedule: same MLflow run, params kept, new step appended.
    # (A handler of our own: MLflow's import reconfigures the root logger, which pytest's caplog relies on.)
    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("ppoflow").addHandler(handler)
    with open_tracker(config.tracking, uri) as tracker:
        tracker.log_config(_config(tmp_path, "tracking.logger=mlflow", "iterations=9").model_dump(mode="json"))
        tracker.log({"rollout/reward_mean": 0.75, "rollout/kl": None}, step=3)
    logging.getLogger("ppoflow").removeHandler(handler)
    assert any("changed since: iterations" in w for w in warnings)  # the params MLflow can't change are named

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("ppoflow-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "r1" and run.data.tags["ppoflow.run_uri"] == uri
    assert run.info.status == "FINISHED"
    assert run.data.params["algo.gamma"] == "1.0" and run.data.params["iterations"] == "3"
    assert run.data.params["tracking.logger"] == "mlflow"
    assert set(run.data.metrics) == set(_finite(expected[1]))
    for name in _finite(expected[1]):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
        want = [(1, expected[1][name]), (2, expected[2][name])] + ([(3, 0.75)] if name == "rollout/reward_mean"
                                                                   else [])
        assert history == want, name


def test_logger_none_writes_nothing(tmp_path):
    config = _config(tmp_path, "tracking.logger=none")
    uri = run_uri(str(tmp_path), "r1")
    expected = _commit_iteration(RunStore(uri), 1)
    before = sorted(p for p in glob.glob(f"{tmp_path}/**", recursive=True))
    row = track_iteration(config, uri, 1)
    assert sorted(glob.glob(f"{tmp_path}/**", recursive=True)) == before
    assert row["rollout/reward_mean"] == expected["rollout/reward_mean"]


def test_tensorboard_without_its_package_names_the_field(tmp_path, monkeypatch):
    """torch.utils.tensorboard imports only where the tensorboard package is installed (the GPU host's carried stack
    has none): the error says which field chose it and what to do, and nothing is written."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # an import of it raises ImportError
    config = _config(tmp_path)
    uri = run_uri(str(tmp_path), "r1")
    _commit_iteration(RunStore(uri), 1)
    with pytest.raises(ImportError, match="tracking.logger: tensorboard needs the tensorboard package.*"
                                          "tracking.logger: none"):
        track_iteration(config, uri, 1)


def _wandb_records(path: str):
    """The records of a W&B transaction log (`run-*.wandb`): a 7-byte header (":W&B", magic, version), then
    LevelDB-log chunks in 32 KiB blocks — crc32, length, type (1 full, 2 first, 3 middle, 4 last) and data."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos: pos + 7])
        pending += data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(pending)
            pending = b""


def test_wandb_offline_run_in_the_run_folder(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    config = _config(tmp_path, "tracking.logger=wandb", "algo.gamma=0.99")
    uri = run_uri(str(tmp_path), "r1")
    store = RunStore(uri)
    expected = {n: _commit_iteration(store, n) for n in (1, 2)}
    try:
        for n in (1, 2):
            track_iteration(config, uri, n)
    finally:
        wandb.teardown()  # stop the W&B service process this test started

    history, configs = {}, []
    for path in sorted(glob.glob(f"{uri}/wandb/offline-run-*/run-*.wandb")):
        for record in _wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                # wandb-core writes each key as a one-part nested_key; `key` is the older form.
                history[record.history.step.num] = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                                    for item in record.history.item}
            elif record.WhichOneof("record_type") == "config":
                configs.append({item.key: json.loads(item.value_json) for item in record.config.update})
    assert sorted(history) == [1, 2]
    for n in (1, 2):
        assert {k: v for k, v in history[n].items() if not k.startswith("_")} == pytest.approx(_finite(expected[n]))
    assert configs[0]["algo"]["gamma"] == 0.99 and configs[0]["tracking"]["logger"] == "wandb"


def test_tracking_is_operational_and_cheap_to_import(tmp_path):
    assert _config(tmp_path, "tracking.logger=mlflow").config_hash() == _config(tmp_path).config_hash()
    with pytest.raises(Exception, match="tracking.dir: .*local folder"):
        _config(tmp_path, "tracking.dir=s3://bucket/tb")
    heavy = ("prefect", "torch", "tensorboard", "mlflow", "wandb")
    loaded = subprocess.run([sys.executable, "-c", "import sys, stages.config, stages.tracking; "
                             f"print([m for m in {heavy!r} if m in sys.modules])"], capture_output=True, text=True,
                            check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__)))).stdout
    assert loaded.strip() == "[]"
