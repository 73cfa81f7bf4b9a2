"""The `ppoflow train` progress bars: what they read from storage, and when they are drawn at all."""

import io
import time

import pyarrow as pa

from ppoflow.progress import enabled, snapshot
from storage.run import STAGES, RunStore, run_uri

SCHEMA = pa.schema([("x", pa.int64())])


def _commit(store, iteration, stage, **metrics):
    store.write_stage(iteration, stage, pa.table({"x": [1]}, schema=SCHEMA), "test", SCHEMA, metrics=metrics)


def test_snapshot_follows_the_commit_markers(tmp_path):
    store = RunStore(run_uri(str(tmp_path), "r"))
    assert snapshot(store, 3) == {"done": 0, "current": 1, "stage": "generate", "stages_done": 0, "reward": None,
                                  "pass_rate": None}
    _commit(store, 0, "eval", **{"eval/pass_rate": 0.25})
    for stage in STAGES:
        _commit(store, 1, stage, **({"rollout/reward_mean": 0.5} if stage == "score" else {}))
    _commit(store, 2, "generate")
    _commit(store, 2, "score", **{"rollout/reward_mean": 0.75})  # not the latest reward until iteration 2 commits
    assert snapshot(store, 3) == {"done": 1, "current": 2, "stage": "advantages", "stages_done": 2, "reward": 0.5,
                                  "pass_rate": 0.25}
    for stage in STAGES[2:]:
        _commit(store, 2, stage)
    _commit(store, 2, "eval", **{"eval/pass_rate": 0.5})
    for stage in STAGES:
        _commit(store, 3, stage)
    s = snapshot(store, 3)
    assert (s["done"], s["stage"], s["stages_done"], s["reward"], s["pass_rate"]) == (3, "done", 5, 0.75, 0.5)


def test_snapshot_reads_settled_iterations_once(tmp_path):
    """Between ticks the bars keep what they read of iterations that can no longer change (the next iteration's score
    is committed), so a tick reads the markers of the last iterations only, and shows what a fresh read shows."""
    store = RunStore(run_uri(str(tmp_path), "r"))
    _commit(store, 0, "eval", **{"eval/pass_rate": 0.25})
    for n in (1, 2, 3):
        for stage in STAGES:
            _commit(store, n, stage, **({"rollout/reward_mean": n / 10} if stage == "score" else {}))
    _commit(store, 4, "generate")
    reads = []
    marker = store.stage_marker
    store.stage_marker = lambda n, stage: reads.append(n) or marker(n, stage)
    settled = {}
    first = snapshot(store, 5, settled)
    assert first == snapshot(store, 5) and first["done"] == 3 and first["reward"] == 0.3
    assert sorted(settled) == [0, 1, 2]  # iteration 3's evaluation may still come: its next score is not committed
    reads.clear()
    assert snapshot(store, 5, settled) == first
    assert set(reads) == {3, 4, 5}  # the unsettled iterations, and the next score of the last
    _commit(store, 3, "eval", **{"eval/pass_rate": 0.5})
    assert snapshot(store, 5, settled)["pass_rate"] == 0.5


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_drawn_on_a_terminal_only_and_never_in_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    assert enabled(_Tty()) and not enabled(io.StringIO())
    monkeypatch.setenv("CI", "true")
    assert not enabled(_Tty())


def test_report_lines_are_printed_with_or_without_bars(tmp_path, monkeypatch):
    """The console's iteration lines come through `report`, each tick and once more at the end; on a terminal they
    print above the bars."""
    from ppoflow.progress import RunProgress

    monkeypatch.delenv("CI", raising=False)
    for stream in (io.StringIO(), _Tty()):
        pending = [["iteration 1"], [], ["iteration 2", "iteration 3"]]
        report = lambda: pending.pop(0) if pending else ["the end"]  # noqa: E731
        with RunProgress(run_uri(str(tmp_path), "r"), 3, interval=0.05, stream=stream, report=report):
            while pending:
                time.sleep(0.01)
        out = stream.getvalue()
        positions = [out.index(f"iteration {n}") for n in (1, 2, 3)]
        assert positions == sorted(positions) and out.rstrip().endswith("the end")
