"""A run whose policy and critic are DeepSpeed groups of two ranks (`num_ranks: 2`, ZeRO-2 on gloo): the stages call
every rank, take rank 0's results, write both ranks' shards into the checkpoint, and a resumed process loads them.

The group must train like one rank on the same rollout (the math is held by tests/workers/test_trainer_group.py; this
holds the wiring): iteration 1 of a 1-rank and a 2-rank run sample the same rollout from the same base weights, so
their scores are equal and their update metrics agree within float32 reduction-order noise (1e-4 relative).
"""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from storage.run import PART_MARKER

pytestmark = pytest.mark.slow

COMMON = ("generation.backend=hf", "eval.prompts=null", "policy.zero_stage=2", "critic.zero_stage=2")
GROUPS = ("policy.num_ranks=2", "critic.num_ranks=2")


def _marker(run: Path, n: int, stage: str) -> dict:
    return json.loads((run / f"iter-{n:06d}" / stage / "_SUCCESS.json").read_text())


@pytest.mark.usefixtures("prefect_backend", "ray_session")
def test_two_rank_groups_train_like_one_rank_and_resume_from_their_shards(make_config):
    import ray

    from flows.ppo import ppo_train

    one = Path(ppo_train(config=make_config("run_id=one-rank", "iterations=1", *COMMON))["run_uri"])
    config = make_config("run_id=two-ranks", "iterations=1", *COMMON, *GROUPS)
    two = Path(ppo_train(config=config)["run_uri"])

    # Same base weights and request seeds: the same rollout, scored the same by one rank or two.
    assert pq.read_table(one / "iter-000001" / "generate").equals(pq.read_table(two / "iter-000001" / "generate"))
    scored = {name: pq.read_table(run / "iter-000001" / "score").to_pydict() for name, run in (("1", one), ("2", two))}
    for column in ("old_logprobs", "values", "ref_logprobs"):
        for a, b in zip(scored["1"][column], scored["2"][column]):
            assert b == pytest.approx(a, abs=1e-5), column
    m1, m2 = _marker(one, 1, "update")["metrics"], _marker(two, 1, "update")["metrics"]
    for name in ("ppo/policy_loss", "ppo/grad_norm", "ppo/clipfrac", "critic/value_loss", "critic/grad_norm"):
        assert m2[name] == pytest.approx(m1[name], rel=1e-4, abs=1e-7), name

    # Both ranks wrote their ZeRO-2 optimizer shard into the committed checkpoint.
    ckpt = _marker(two, 1, "update")["checkpoint"]
    files = [name for part in ckpt["parts"] for name in
             json.loads((two / "checkpoints" / "iter-000001" / PART_MARKER.format(part=part)).read_text())["files"]]
    for role in ("policy", "critic"):
        for rank in (0, 1):
            assert any(f"{role}/" in f and f"zero_pp_rank_{rank}_" in f and "optim_states" in f for f in files), \
                (role, rank, files)
    # close_run stopped every rank of both groups
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if "two-ranks" in a["name"]]

    # Resume to iteration 2: new rank actors load the 2-rank checkpoint of version 1, sample from it, and the
    # engine's logprobs (rank 0's export) match the reloaded group's.
    resumed = make_config("run_id=two-ranks", "iterations=2", *COMMON, *GROUPS)
    ppo_train(config=resumed)
    events = [json.loads(p.read_text()) for p in sorted((two / "events").iterdir())]
    started = [e for e in events if e["stage"] == "workers" and e["action"] == "started"]
    assert started[-1]["policy_version"] == 1
    for stage in ("generate", "score", "advantages", "update", "sync"):
        assert _marker(two, 2, stage)["policy_version" if stage == "sync" else "stage"] == (2 if stage == "sync"
                                                                                             else stage)
    assert _marker(two, 2, "score")["metrics"]["rollout/logprob_abs_diff_max"] < 1e-4
