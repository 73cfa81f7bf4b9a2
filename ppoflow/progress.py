"""Progress of `ppoflow train`, read from storage: two bars (iterations of the run, stages of the current iteration)
and the lines a `report` callback returns each tick (the console's iteration lines, ppoflow/console.py).

A thread of the CLI process watches the run's commit markers, so what it shows is what is committed (a resumed run
starts at its committed iterations) and it needs no hook in the flow, the stages or the actors. The bars are drawn
only on a terminal and never under CI (`CI` set); the lines are printed either way, above the bars.

Try it:  ppoflow train --config configs/quickstart.yaml   (in a terminal)
"""

from __future__ import annotations

import os
import sys
import threading

from storage.run import STAGES, RunStore


def enabled(stream=None) -> bool:
    stream = stream if stream is not None else sys.stderr
    return stream.isatty() and not os.environ.get("CI")


def snapshot(store: RunStore, iterations: int, settled: dict[int, dict] | None = None) -> dict:
    """What the bars show: committed iterations, the stage running now and the latest reward and eval pass rate.

    `settled`, kept by the caller from one tick to the next, holds what was read of the iterations that can no longer
    change: committed markers are never rewritten, and once iteration n+1's score is committed, n's stages and its
    evaluation (which runs before that score) are all there will be. A tick then reads the markers of the last
    iteration or two, not every marker of the run (six per iteration, every second, on the driver's cores)."""
    settled = {} if settled is None else settled
    done, stage, reward, pass_rate = 0, STAGES[0], None, None
    for n in store.iterations():
        row = settled.get(n)
        if row is None:
            ev = store.stage_marker(n, "eval")  # iteration 0: the starting policy
            committed = store.committed_stages(n) if n > 0 else []
            score = store.stage_marker(n, "score") if len(committed) == len(STAGES) else None
            row = {"committed": committed, "pass_rate": (ev or {}).get("metrics", {}).get("eval/pass_rate"),
                   "reward": (score or {}).get("metrics", {}).get("rollout/reward_mean")}
            if store.stage_marker(n + 1, "score") is not None:
                settled[n] = row
        if row["pass_rate"] is not None:
            pass_rate = row["pass_rate"]
        if n == 0:
            continue
        if len(row["committed"]) == len(STAGES):
            done = n
            reward = row["reward"] if row["reward"] is not None else reward
        else:
            stage = next(s for s in STAGES if s not in row["committed"])
    current = min(done + 1, iterations)
    stages_done = len(store.committed_stages(current)) if done < iterations else len(STAGES)
    return {"done": done, "current": current, "stage": stage if done < iterations else "done",
            "stages_done": stages_done, "reward": reward, "pass_rate": pass_rate}


class RunProgress:
    """Two rich bars refreshed every `interval` seconds until the context ends (drawn only where `enabled(stream)`),
    and the lines `report()` returns printed on `stream` each tick and once more at the end."""

    def __init__(self, run_uri: str, iterations: int, storage_options: dict | None = None, interval: float = 1.0,
                 stream=None, report=None):
        self.store, self.iterations, self.interval = RunStore(run_uri, storage_options), iterations, interval
        self.stream = stream if stream is not None else sys.stderr
        self.report = report
        self._bars = enabled(self.stream)
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self._bars or self.report is not None:
            self._thread = threading.Thread(target=self._draw if self._bars else self._lines,
                                            name="ppoflow-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._print(self._report())  # what committed since the last tick (the run's last iteration)

    def _report(self) -> list[str]:
        if self.report is None:
            return []
        try:
            return self.report()
        except Exception:  # storage briefly unreadable (e.g. mid-write): try again next tick
            return []

    def _print(self, lines: list[str], bars=None) -> None:
        for line in lines:
            if bars is not None:
                bars.console.print(line, markup=False, highlight=False, soft_wrap=True)
            else:
                self.stream.write(line + "\n")
        self.stream.flush()

    def _lines(self) -> None:
        while not self._stop.wait(self.interval):
            self._print(self._report())

    def _draw(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), transient=True,
                      console=Console(file=self.stream)) as bars:
            run = bars.add_task("iterations", total=self.iterations, info="")
            stage = bars.add_task("stages", total=len(STAGES), info="")
            settled: dict[int, dict] = {}
            while True:
                try:
                    s = snapshot(self.store, self.iterations, settled)
                except Exception:  # storage briefly unreadable (e.g. mid-write): try again next tick
                    s = None
                if s is not None:
                    info = "  ".join(f"{k} {v:.3f}" for k, v in (("reward", s["reward"]), ("eval", s["pass_rate"]))
                                     if v is not None)
                    bars.update(run, completed=s["done"], info=info)
                    bars.update(stage, completed=s["stages_done"], description=f"iteration {s['current']}",
                                info=s["stage"])
                self._print(self._report(), bars)
                if self._stop.wait(self.interval):
                    break
