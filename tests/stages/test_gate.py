"""The promotion gate's bookkeeping without training (stages/gate.py, stages/lineage.py, storage/lineage.py): which
run the next trigger starts from once a run was rejected, a trained run awaiting its gate, the serving pointer, the
comparison artifact's text, and the MLflow registered model and its `promoted` alias. The gate end to end (training,
evaluation, a rejected candidate): tests/flows/test_retrain.py."""

import json
from pathlib import Path

import pytest

QUICKSTART = str(Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml")


def _record(run_id: str, promotion: str | None, files: list[str], parent: str | None = None, **extra) -> dict:
    return {"lineage": "daily", "run_id": run_id, "parent": parent, "prompt_files": files, "overrides": [],
            "init_policy": "base", "status": "complete", "final_policy": f"/runs/{run_id}/merged",
            "final_adapter": f"/runs/{run_id}/hf", "promotion": promotion, **extra}


def test_the_next_run_starts_from_the_promoted_run_not_a_rejected_one(tmp_path, tiny_model_dir):
    from stages.lineage import next_run
    from storage.lineage import LineageStore

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    files = []
    for name in ("a", "b", "c"):
        (incoming / f"{name}.jsonl").write_text(json.dumps({"prompt": "What is 2*3?", "answer": "6"}) + "\n")
        files.append(str(incoming / f"{name}.jsonl"))
    lineage = LineageStore(str(tmp_path), "daily")
    lineage.write(_record("daily-0001", "promoted", files[:1]))
    lineage.write(_record("daily-0002", "rejected", files[1:2], parent="daily-0001"))
    lineage.promote(lineage.records()[0], tiny_model_dir, 0.5)
    overrides = [f"model.path={tiny_model_dir}", f"storage.root={tmp_path}", "eval.prompts=null",
                 "policy.lora.rank=8"]

    plan = next_run("daily", str(incoming), QUICKSTART, overrides)
    assert plan["action"] == "train" and plan["run_id"] == "daily-0003" and plan["parent"] == "daily-0001"
    assert plan["prompt_files"] == files[2:]  # the rejected run's files stay consumed
    assert "model.path=/runs/daily-0001/merged" in plan["overrides"]
    assert f"model.ref_path={tiny_model_dir}" in plan["overrides"]
    assert "policy.lora.init_adapter=/runs/daily-0001/hf" in plan["overrides"]
    assert "rejected: daily-0002" in plan["message"]
    assert lineage.serving()["run_id"] == "daily-0001" and [r["run_id"] for r in lineage.records()] == [
        "daily-0001", "daily-0002"]  # the pointer is no record

    lineage.write(_record("daily-0003", None, files[2:], parent="daily-0001"))  # trained; the gate never ran
    plan = next_run("daily", str(incoming), QUICKSTART, overrides)
    assert plan["action"] == "gate" and plan["run_id"] == "daily-0003"
    assert plan["run_uri"] == f"{tmp_path}/daily-0003"


def test_records_written_before_the_gate_count_as_promoted(tmp_path):
    from storage.lineage import LineageStore

    lineage = LineageStore(str(tmp_path), "old")
    old = _record("old-0001", None, [])
    del old["promotion"]
    lineage.write(old)
    assert lineage.promoted()["run_id"] == "old-0001"


def test_gate_table_and_mlflow_alias(tmp_path, tiny_model_dir):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from stages.config import load_config
    from stages.gate import _register, gate_table

    config = load_config(QUICKSTART, [f"model.path={tiny_model_dir}", f"storage.root={tmp_path}",
                                      "tracking.logger=mlflow", f"tracking.dir={tmp_path}"])
    gate = {"metric": "pass_rate", "candidate": 0.5, "promoted": 0.25, "promoted_run": None, "delta": 0.25,
            "min_delta": 0.0, "prompts": 64, "n_samples": 1,
            "candidate_metrics": {"eval/pass_rate": 0.5, "eval/reward_mean": 0.6},
            "promoted_metrics": {"eval/pass_rate": 0.25, "eval/reward_mean": 0.3}}
    first = _record("daily-0001", "promoted", [], gate=gate)
    second = _record("daily-0002", "rejected", [], gate={**gate, "candidate": 0.0, "promoted": 0.5,
                                                          "delta": -0.5, "promoted_run": "daily-0001"})
    text = gate_table("daily", second)
    assert "daily-0002 rejected" in text and "delta -0.5000" in text and "promoted (daily-0001) 0.5000" in text
    assert "| candidate | daily-0002 | /runs/daily-0002/merged |" in text

    _register(config, "daily", first)
    _register(config, "daily", second)
    store = f"sqlite:///{tmp_path}/mlflow.db"  # the trackers' default under tracking.dir
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    versions = {str(v.version): v for v in client.search_model_versions("name='ppoflow-daily'")}
    assert len(versions) == 2 and first["mlflow_model_version"] == "ppoflow-daily/1"
    promoted = client.get_model_version_by_alias("ppoflow-daily", "promoted")
    assert promoted.source == "/runs/daily-0001/merged" and promoted.tags["ppoflow.promotion"] == "promoted"
    assert versions[second["mlflow_model_version"].rsplit("/", 1)[1]].tags["ppoflow.promotion"] == "rejected"
