"""Scheduled retraining: each run of a lineage trains only on the prompt files that arrived since the previous run,
warm-started from its final policy; a trigger with nothing new exits cleanly; a run that did not finish is resumed."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.retrain import ppo_retrain

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_backend", "ray_session")]

QUICKSTART = str(Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml")


def _write(folder: Path, name: str, numbers: list[int]) -> str:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text("".join(json.dumps({"prompt": f"What is 2*{x}?", "answer": str(2 * x)}) + "\n" for x in numbers))
    return str(path)


def test_lineage_trains_on_new_files_only_and_warm_starts(tmp_path, tiny_model_dir, test_scale):
    incoming = tmp_path / "incoming"
    overrides = [f"model.path={tiny_model_dir}", f"storage.root={tmp_path}", "iterations=1", "eval.prompts=null",
                 *test_scale, "algo.estimator=group_norm", "generation.backend=hf"]  # HF: starts in seconds
    first_file = _write(incoming, "2026-11-01.jsonl", list(range(100, 120)))

    one = ppo_retrain("daily", str(incoming), QUICKSTART, overrides)
    assert one["action"] == "train" and one["run_id"] == "daily-0001" and one["parent"] is None
    assert one["prompt_files"] == [first_file]

    second_file = _write(incoming, "2026-11-02.jsonl", list(range(500, 520)))
    two = ppo_retrain("daily", str(incoming), QUICKSTART, overrides)
    assert two["run_id"] == "daily-0002" and two["parent"] == "daily-0001"
    assert two["prompt_files"] == [second_file]  # only what arrived since
    run = tmp_path / "daily-0002"
    prompts = set(pq.read_table(run / "iter-000001" / "generate").column("prompt").to_pylist())
    assert prompts and all(int(p.split("*")[1].rstrip("?")) >= 500 for p in prompts)
    config = json.loads((run / "run.json").read_text())["config"]
    assert config["model"]["path"] == one["final_policy"]  # warm start from daily-0001's final HF export
    assert config["model"]["ref_path"] == tiny_model_dir  # the KL anchor stays the base model
    assert Path(one["final_policy"], "model.safetensors").exists()
    assert Path(one["final_policy"]).parent.joinpath("_PINNED.json").exists()  # checkpoint rotation never deletes it

    three = ppo_retrain("daily", str(incoming), QUICKSTART, overrides)
    assert three["action"] == "nothing_new" and "no new prompt files" in three["message"]
    assert not (tmp_path / "daily-0003").exists()
    records = sorted((tmp_path / "lineages" / "daily").glob("*.json"))
    assert [json.loads(p.read_text())["status"] for p in records] == ["complete", "complete"]


def test_unfinished_run_is_resumed_not_replaced(tmp_path, tiny_model_dir):
    from stages.lineage import next_run, plan_retrain

    incoming = tmp_path / "incoming"
    overrides = [f"model.path={tiny_model_dir}", f"storage.root={tmp_path}", "eval.prompts=null"]
    _write(incoming, "a.jsonl", [1, 2, 3])
    started = plan_retrain("weekly", str(incoming), QUICKSTART, overrides)  # then the process died
    _write(incoming, "b.jsonl", [4, 5, 6])
    again = next_run("weekly", str(incoming), QUICKSTART, overrides)
    assert again["action"] == "resume" and again["run_id"] == started["run_id"] == "weekly-0001"
    assert again["overrides"] == started["overrides"]  # same files, same config: the run resumes from storage
