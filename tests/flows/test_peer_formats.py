"""Data as OpenRLHF and verl users already have it trains with the documented example config and nothing else
(configs/from-verl.yaml, configs/from-openrlhf.yaml; only paths and the test scale are set here): a verl-style
Parquet (chat-message prompts with a system turn, the answer in reward_model.ground_truth), an OpenRLHF-style JSONL
(input / label) and a Hugging Face `datasets` folder (save_to_disk, DIR@split). One iteration each, end to end on the
real stack (the HF engine: the engine is beside the point), then the rollout is checked: the prompt as stored, the
chat template applied to the message list, and every reward recomputed from the question itself.

Run alone:  .venv/bin/pytest tests/flows/test_peer_formats.py
"""

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.ppo import ppo_train
from ppoflow.tasks import arith
from stages.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_backend", "ray_session")]

REPO = Path(__file__).resolve().parents[2]
SYSTEM = "Answer with the number only."


def _questions(n: int, seed: int) -> list[tuple[str, str]]:
    return [(r["prompt"], r["answer"]) for r in arith.make_prompts(n, seed)]


def verl_parquet(folder: Path) -> tuple[str, str]:
    """verl's layout (examples/data_preprocess/gsm8k.py): the prompt a list of messages, the answer nested."""
    folder.mkdir()
    for split, seed in (("train", 1), ("test", 2)):
        rows = [{"data_source": "arith", "prompt": [{"role": "system", "content": SYSTEM},
                                                    {"role": "user", "content": q}],
                 "ability": "math", "reward_model": {"style": "rule", "ground_truth": a},
                 "extra_info": {"split": split, "index": i, "question": q}}
                for i, (q, a) in enumerate(_questions(64, seed))]
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{split}.parquet")
    return str(folder / "train.parquet"), str(folder / "test.parquet")


def openrlhf_jsonl(folder: Path) -> tuple[str, str]:
    folder.mkdir()
    for split, seed in (("train", 1), ("test", 2)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"input": q, "label": a}) + "\n"
                                                       for q, a in _questions(64, seed)))
    return str(folder / "train.jsonl"), str(folder / "test.jsonl")


def datasets_folder(folder: Path) -> tuple[str, str]:
    import datasets

    datasets.DatasetDict({split: datasets.Dataset.from_list([{"input": q, "label": a} for q, a in _questions(64, seed)])
                          for split, seed in (("train", 1), ("test", 2))}).save_to_disk(str(folder))
    return f"{folder}@train", f"{folder}@test"


@pytest.mark.parametrize("layout, config_file", [
    (verl_parquet, "from-verl.yaml"),
    (openrlhf_jsonl, "from-openrlhf.yaml"),
    (datasets_folder, "from-openrlhf.yaml"),
], ids=["verl-parquet", "openrlhf-jsonl", "datasets-folder"])
def test_a_peer_format_trains_with_its_example_config(tmp_path, tiny_model_dir, test_scale, layout, config_file):
    from transformers import AutoTokenizer

    train, test = layout(tmp_path / "data")
    config = load_config(str(REPO / "configs" / config_file), [
        f"model.path={tiny_model_dir}", f"data.prompts={train}", f"eval.prompts={test}", "eval.max_prompts=16",
        f"storage.root={tmp_path / 'runs'}", "run_id=peer", "iterations=1", "generation.backend=hf",
        "tracking.logger=none", *test_scale])
    run = Path(ppo_train(config=config)["run_uri"])
    assert run == tmp_path / "runs" / "peer"
    for stage in ("generate", "score", "advantages", "update", "sync"):
        assert (run / "iter-000001" / stage / "_SUCCESS.json").exists(), stage

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = pq.read_table(run / "iter-000001" / "score").to_pylist()
    assert len(rows) == config.data.prompts_per_iteration * config.generation.n_samples_per_prompt
    for r in rows:
        prompt = r["prompt"]
        if config_file == "from-verl.yaml":  # stored as the JSON of its messages; rendered by the chat template
            messages = json.loads(prompt)
            assert messages[0] == {"role": "system", "content": SYSTEM} and messages[1]["role"] == "user"
            assert SYSTEM in tok.decode(r["prompt_ids"])
            question = messages[1]["content"]
        else:  # a string: stored as it is, wrapped as the user turn
            question = prompt
            assert question in tok.decode(r["prompt_ids"]) and "<|im_start|>user" in tok.decode(r["prompt_ids"])
        # The reference answer came from the row's label column, and the reward from it: recompute both from the
        # question alone ("What is 2*x?" -> 2x).
        answer = str(2 * int(re.fullmatch(r"What is 2\*(\d+)\?", question).group(1)))
        assert r["reward"] == pytest.approx(arith.reward([question], [r["response"]], [{}], labels=[answer])[0])
    for n in (0, 1):  # the held-out split, before and after the iteration
        assert (run / f"iter-{n:06d}" / "eval" / "_SUCCESS.json").exists()
        assert len(pq.read_table(run / f"iter-{n:06d}" / "eval")) == 16
