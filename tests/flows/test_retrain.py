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
    records = sorted((tmp_path / "lineages" / "daily").glob("daily-*.json"))  # beside _SERVING.json
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


POISON = '''
from ppoflow.tasks.arith import reward as arith


def reward(prompts, responses, metadata):
    """The quickstart's reward turned against itself: a correct answer costs what it used to earn."""
    return [-r for r in arith(prompts, responses, metadata)]
'''


def test_gate_rejects_a_worse_lora_candidate_and_the_next_run_starts_from_the_promoted_one(
        tmp_path, sft_model_dir, prompts_dir, test_scale, monkeypatch, capsys):
    """Three triggers of a LoRA lineage with a promotion gate: the first run (true reward) is promoted over the base
    model; the second is trained on purpose with a reward that punishes correct answers, loses the gate and is kept,
    marked rejected; the third starts from the first run's adapter (not the rejected one's), and `ppoflow lineage
    show` says so. The gate tolerates 0.1 of evaluation noise (min_delta -0.1 on 64 greedy answers, one answer is
    0.016): the honest runs train gently (lr 5e-4, two steps; seen: the first 0.047 below the base, the third 0.031
    above the first), the poisoned one hard (lr 2e-2, four steps; seen: a pass rate of 0 from 0.27)."""
    from ppoflow.cli import main as ppoflow
    from storage.lineage import LineageStore

    (tmp_path / "rewards").mkdir()
    (tmp_path / "rewards" / "poison_reward.py").write_text(POISON)
    monkeypatch.syspath_prepend(str(tmp_path / "rewards"))
    incoming = tmp_path / "incoming"
    overrides = [f"model.path={sft_model_dir}", f"storage.root={tmp_path}", "iterations=2", "eval.prompts=null",
                 *test_scale, "algo.estimator=group_norm", "generation.backend=hf", "policy.lora.rank=8",
                 "policy.lr=5e-4", f"retrain.gate.eval_prompts={prompts_dir}/eval.jsonl", "retrain.gate.max_prompts=64",
                 "retrain.gate.min_delta=-0.1", "retrain.gate.reward_fn=ppoflow.tasks.arith:reward"]
    _write(incoming, "2026-11-01.jsonl", list(range(1000, 1064)))
    one = ppo_retrain("lora", str(incoming), QUICKSTART, overrides)
    assert one["promotion"] == "promoted", one["gate"]
    assert one["gate"]["promoted_run"] is None  # judged against the base model

    _write(incoming, "2026-11-02.jsonl", list(range(2000, 2064)))
    two = ppo_retrain("lora", str(incoming), QUICKSTART,
                      [*overrides, "reward.fn=poison_reward:reward", "iterations=4", "policy.lr=2e-2"])
    assert two["parent"] == "lora-0001" and two["promotion"] == "rejected", two["gate"]
    assert two["gate"]["promoted_run"] == "lora-0001" and two["gate"]["delta"] < -0.1

    _write(incoming, "2026-11-03.jsonl", list(range(3000, 3064)))
    three = ppo_retrain("lora", str(incoming), QUICKSTART, overrides)
    assert three["parent"] == "lora-0001", three  # the promoted run, not the rejected one before it
    records = {r["run_id"]: r for r in LineageStore(str(tmp_path), "lora").records()}
    first = records["lora-0001"]
    config = json.loads((tmp_path / "lora-0003" / "run.json").read_text())["config"]
    assert config["policy"]["lora"]["init_adapter"] == first["final_adapter"]  # the first run's adapter ...
    assert config["model"]["path"] == first["final_policy"]  # ... merged into the base: what the engines start from
    assert config["model"]["ref_path"] == sft_model_dir  # the KL anchor stays the base model
    assert Path(first["final_adapter"], "adapter_model.safetensors").exists()
    assert not Path(first["final_adapter"], "model.safetensors").exists()  # the adapter only
    assert Path(first["final_policy"], "model.safetensors").exists()
    assert [records[r]["promotion"] for r in ("lora-0001", "lora-0002")] == ["promoted", "rejected"]
    assert records["lora-0003"]["gate"]["promoted_run"] == "lora-0001"
    serving = LineageStore(str(tmp_path), "lora").serving()
    assert serving["run_id"] == ("lora-0003" if three["promotion"] == "promoted" else "lora-0001")

    capsys.readouterr()
    assert ppoflow(["lineage", "show", "lora", "--root", str(tmp_path)]) == 0
    shown = capsys.readouterr().out
    rows = {line.split()[0]: line for line in shown.splitlines() if line.strip().startswith("lora-")}
    assert "rejected" in rows["lora-0002"] and "lora-0001" in rows["lora-0003"].split()[2], shown
    assert f"serving: {serving['run_id']}" in shown and serving["adapter"] in shown and "rejected (kept" in shown
