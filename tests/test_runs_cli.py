"""`ppoflow runs list|show` and `ppoflow rollouts` on runs written to storage the way the stages write them: real
schemas, real commit markers (with the metrics the stages record), a real run manifest and a real run lock."""

import io
import re
import subprocess
import sys

import pyarrow as pa
import pytest
from PIL import Image

from ppoflow.cli import main
from storage.lock import RunLock
from storage.run import RunStore, run_uri
from storage.schema import EXPERIENCE, METRICS, ROLLOUT, SCORED, SYNC

GROUPS, SAMPLES = 3, 2  # prompts per iteration, samples per prompt


def experience_rows(iteration: int) -> list[dict]:
    """Doubling-task samples; rewards all differ (so best/worst are unambiguous) and rise with the iteration."""
    rows = []
    for g in range(GROUPS):
        for k in range(SAMPLES):
            x, j = 100 * iteration + g, g * SAMPLES + k
            reward = round(0.1 * iteration + 0.01 * ((j * 7) % (GROUPS * SAMPLES)), 4)  # a permutation of j
            a = 3 + k
            rows.append({
                "sample_id": f"it{iteration}-g{g}-p{x}-s{k}", "iteration": iteration, "prompt_index": x,
                "group_id": g, "sample_index": k, "prompt": f"What is 2*{x}? [b]not markup[/b]",
                "prompt_ids": [5, 6, 7], "prompt_truncated": False, "response": str(2 * x + k),
                "response_ids": list(range(a)), "engine_logprobs": [-0.5] * a,
                "finish_reason": "length" if k else "stop", "policy_version": iteration - 1,
                "metadata": f'{{"answer": {2 * x}}}', "reward": reward, "old_logprobs": [-0.5] * a,
                "ref_logprobs": [-0.6] * a, "values": [0.1] * a, "kl": [0.1 * iteration] * a,
                "token_rewards": [0.0] * (a - 1) + [reward], "advantages": [reward - 0.2] * a,
                "returns": [reward] * a,
            })
    return rows


def write_run(root: str, run_id: str, created: str, estimator: str, iterations: int,
              stages: dict[int, int]) -> RunStore:
    """A run whose iteration n has its first stages[n] stages committed, with the metrics each stage records."""
    store = RunStore(run_uri(root, run_id))
    store.write_manifest({"run_id": run_id, "created_at": created, "config_hash": "h", "seed": 0,
                          "config": {"iterations": iterations, "algo": {"estimator": estimator}}})
    for n, count in stages.items():
        rows = experience_rows(n)
        table = pa.Table.from_pylist(rows, schema=EXPERIENCE)
        rewards = [r["reward"] for r in rows]
        mean = sum(rewards) / len(rewards)
        commits = [
            ("generate", table, "rollout", ROLLOUT, {"rollout/response_len": 3.5}),
            ("score", table, "scored", SCORED, {"rollout/reward_mean": mean, "rollout/reward_std": 0.02}),
            ("advantages", table, "experience", EXPERIENCE, {"rollout/kl": 0.1 * n}),
            ("update", pa.Table.from_pylist([{"name": "ppo/policy_loss", "step": 0, "value": -0.01 * n}],
                                            schema=METRICS), "metrics", METRICS,
             {"ppo/policy_loss": -0.01 * n, "ppo/approx_kl": 0.001, "ppo/clipfrac": 0.05}),
            ("sync", pa.Table.from_pylist([{"engine": "engine", "policy_version": n, "method": "object_store",
                                            "bytes": 1000, "seconds": 0.1, "checksum": 1.0}], schema=SYNC),
             "sync", SYNC, {"perf/sync_s": 0.1}),
        ]
        for stage, data, name, schema, metrics in commits[:count]:
            store.write_stage(n, stage, data, name, schema, metrics=metrics, seconds=0.25)
    return store


@pytest.fixture
def root(tmp_path) -> str:
    root = str(tmp_path)
    write_run(root, "a-ppo", "2026-01-02T10:00:00+00:00", "gae", 3, {1: 5, 2: 5, 3: 5})
    write_run(root, "b-grpo", "2026-01-01T09:00:00+00:00", "group_norm", 4, {1: 5, 2: 5, 3: 2})
    write_run(root, "c-live", "2026-01-03T08:00:00+00:00", "rloo", 2, {1: 5, 2: 1})
    return root


def row_of(out: str, first: str) -> list[str]:
    return next(line.split() for line in out.splitlines() if line.split()[:1] == [first])


def test_runs_list_one_row_per_run_oldest_first(root, capsys):
    lock = RunLock(run_uri(root, "c-live")).acquire()  # c-live is being written by this process
    try:
        assert main(["runs", "list", "--root", root]) == 0
    finally:
        lock.release()
    out = capsys.readouterr().out
    ids = [line.split()[0] for line in out.splitlines() if line.split()[:1] in (["a-ppo"], ["b-grpo"], ["c-live"])]
    assert ids == ["b-grpo", "a-ppo", "c-live"]  # by creation time, not by name
    reward_3 = sum(r["reward"] for r in experience_rows(3)) / (GROUPS * SAMPLES)
    assert row_of(out, "a-ppo") == ["a-ppo", "2026-01-02", "10:00:00", "gae", "3/3", f"{reward_3:.3f}", "complete"]
    reward_2 = sum(r["reward"] for r in experience_rows(2)) / (GROUPS * SAMPLES)  # iteration 3 is not synced
    assert row_of(out, "b-grpo") == ["b-grpo", "2026-01-01", "09:00:00", "group_norm", "2/4", f"{reward_2:.3f}",
                                     "stopped"]
    assert row_of(out, "c-live")[3:] == ["rloo", "1/2", f"{sum(r['reward'] for r in experience_rows(1)) / 6:.3f}",
                                         "in", "progress"]


def test_lock_left_by_a_dead_process_means_stopped(root, capsys):
    uri = run_uri(root, "c-live")
    code = f"from storage.lock import RunLock; RunLock({uri!r}).acquire(); import os; os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True)  # a writer that died holding the lock
    assert RunLock(uri).read()["pid"] is not None
    assert main(["runs", "list", "--root", root]) == 0
    assert row_of(capsys.readouterr().out, "c-live")[-1] == "stopped"


def test_runs_list_of_empty_root(tmp_path, capsys):
    assert main(["runs", "list", "--root", str(tmp_path)]) == 0
    assert f"no runs under {tmp_path}\n" in capsys.readouterr().out


def test_runs_show_prints_iterations_and_writes_curves_png(root, capsys):
    assert main(["runs", "show", "b-grpo", "--root", root]) == 0
    out = capsys.readouterr().out
    header = row_of(out, "iter")
    assert header[:5] == ["iter", "reward", "kl", "eval_pass", "pg_loss"]
    for n in (1, 2):
        cells = dict(zip(header, row_of(out, str(n))))
        mean = sum(r["reward"] for r in experience_rows(n)) / (GROUPS * SAMPLES)
        assert cells["reward"] == f"{mean:.3f}" and cells["kl"] == f"{0.1 * n:.4f}"
        assert cells["pg_loss"] == f"{-0.01 * n:.4f}" and cells["upd_s"] == "0.2" and cells["sync_s"] == "0.25"
    cells = dict(zip(header, row_of(out, "3")))  # generate and score committed: reward known, KL and loss not yet
    assert cells["kl"] == "-" and cells["pg_loss"] == "-" and cells["gen_s"] == "0.2"
    assert "2/4 iterations committed · stopped · partly committed: iteration 3: generate, score" in out

    png = f"{run_uri(root, 'b-grpo')}/plots/curves.png"
    assert f"curves: {png}" in out
    data = open(png, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data)).convert("RGB")
    assert image.size == (800, 600)
    colours = image.getcolors(maxcolors=1 << 20)
    assert len(colours) > 100  # two panels of lines, markers, text, a shaded band: not a blank canvas
    assert max(count for count, _ in colours) < 0.95 * 800 * 600


def test_runs_show_writes_the_png_through_storage(capsys, tmp_path):
    root = f"memory://ppoflow-runs-cli-{tmp_path.name}"
    store = write_run(root, "m1", "2026-01-01T00:00:00+00:00", "gae", 2, {1: 5, 2: 5})
    assert main(["runs", "show", "m1", "--root", root]) == 0
    assert f"curves: {root}/m1/plots/curves.png" in capsys.readouterr().out
    assert Image.open(io.BytesIO(store.read_file("plots/curves.png"))).size == (800, 600)


def test_runs_show_with_nothing_scored_writes_no_plot(root, capsys):
    write_run(root, "d-new", "2026-01-04T00:00:00+00:00", "gae", 2, {1: 1})
    assert main(["runs", "show", "d-new", "--root", root]) == 0
    assert "nothing to plot" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError):
        RunStore(run_uri(root, "d-new")).read_file("plots/curves.png")


def rollout_ids(out: str) -> list[str]:
    return re.findall(r"^\s*(it\d+-g\d+-p\d+-s\d+) ", out, flags=re.M)


def test_rollouts_best_and_worst_by_reward(root, capsys):
    rows = sorted(experience_rows(2), key=lambda r: r["reward"])
    assert main(["rollouts", "a-ppo", "--iter", "2", "--k", "2", "--order", "best", "--root", root]) == 0
    out = capsys.readouterr().out
    assert rollout_ids(out) == [rows[-1]["sample_id"], rows[-2]["sample_id"]]
    assert "iteration 2 · best 2 of 6 samples (advantages stage)" in out
    best = rows[-1]
    assert row_of(out, best["sample_id"]) == [
        best["sample_id"], "What", "is", f"2*{best['prompt_index']}?", "[b]not", "markup[/b]", best["response"],
        f"{best['reward']:.3f}", f"{best['reward'] - 0.2:+.3f}", str(len(best["response_ids"])), best["finish_reason"]]
    assert main(["rollouts", "a-ppo", "--iter", "2", "--k", "3", "--order", "worst", "--root", root]) == 0
    assert rollout_ids(capsys.readouterr().out) == [r["sample_id"] for r in rows[:3]]


def test_rollouts_random_is_seeded_and_all_lists_every_sample(root, capsys):
    picks = []
    for seed in (0, 0, 1):
        assert main(["rollouts", "a-ppo", "--iter", "1", "--k", "3", "--seed", str(seed), "--root", root]) == 0
        picks.append(rollout_ids(capsys.readouterr().out))
    assert picks[0] == picks[1] and len(picks[0]) == 3 and picks[0] != picks[2]
    assert main(["rollouts", "a-ppo", "--iter", "1", "--order", "all", "--root", root]) == 0
    assert rollout_ids(capsys.readouterr().out) == [r["sample_id"] for r in experience_rows(1)]


def test_rollouts_fall_back_to_the_scored_table(root, capsys):
    assert main(["rollouts", "b-grpo", "--iter", "3", "--k", "6", "--order", "best", "--root", root]) == 0
    out = capsys.readouterr().out
    assert "(score stage)" in out and "advantages not committed" in out
    assert len(rollout_ids(out)) == 6 and all(row_of(out, i)[-3] == "-" for i in rollout_ids(out))


def test_unknown_run_is_a_clear_error(root, capsys):
    assert main(["runs", "show", "nope", "--root", root]) == 2
    err = capsys.readouterr().err
    assert f"no run 'nope' under {root} (runs there: a-ppo, b-grpo, c-live)" in err
    assert main(["rollouts", "nope", "--iter", "1", "--root", root]) == 2
    assert "no run 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("iteration, committed", [(2, "generate"), (9, "nothing")])
def test_iteration_without_samples_is_a_clear_error(root, capsys, iteration, committed):
    assert main(["rollouts", "c-live", "--iter", str(iteration), "--root", root]) == 2
    err = capsys.readouterr().err
    assert (f"run c-live has no scored samples for iteration {iteration} (committed there: {committed}); "
            "iterations with samples: 1") in err


def test_runs_of_the_old_layout_are_listed_and_shown(root, capsys):
    """Runs lived in {root}/runs/{run_id} before; a folder that is no run (logs of a refused start, lineages) is
    not listed."""
    from pathlib import Path

    from storage.run import find_run

    write_run(f"{root}/runs", "e-old", "2026-01-05T00:00:00+00:00", "gae", 1, {1: 5})
    (Path(root) / "lineages" / "daily").mkdir(parents=True)
    (Path(root) / "refused" / "logs").mkdir(parents=True)
    assert find_run(root, "e-old") == (f"{root}/runs/e-old", True)
    assert find_run(root, "a-ppo") == (f"{root}/a-ppo", False)
    assert main(["runs", "list", "--root", root]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.split()[:1] and "-" in line.split()[0][1:]]
    assert listed == ["b-grpo", "a-ppo", "c-live", "e-old"]
    assert main(["runs", "show", "e-old", "--root", root]) == 0
    assert f"run e-old  ({root}/runs/e-old)" in capsys.readouterr().out


def test_rollouts_show_a_chat_message_prompt_turn_by_turn(tmp_path, capsys):
    import json

    store = write_run(str(tmp_path), "chat", "2026-01-06T00:00:00+00:00", "group_norm", 1, {})
    rows = experience_rows(1)
    chat = [{"role": "system", "content": "Answer with the number only."}, {"role": "user", "content": "What is 2*3?"}]
    for r in rows:
        r["prompt"] = json.dumps(chat)  # as the generate stage stores a message-list prompt
    store.write_stage(1, "score", pa.Table.from_pylist(rows, schema=EXPERIENCE).select(SCORED.names), "scored",
                      SCORED)
    assert main(["rollouts", "chat", "--iter", "1", "--order", "all", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "system: Answer with the number only." in out and "user: What is 2*3?" in out and '"role"' not in out
