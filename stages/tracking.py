"""Experiment tracking: each committed iteration's metrics (`iteration_summary`: rollout/…, ppo/…, critic/…,
perf/…, time/{stage}_s) go to TensorBoard, MLflow or Weights & Biases at step = iteration, and the resolved run
config is logged the first time a process tracks the run.

The flow's report (stages/report.py) logs through `run_tracker`: one tracker per run and process, opened at the first
iteration reported and kept open (in the run's context) until close_run closes it, rather than reopened every
iteration, which cost a new TensorBoard event file, an MLflow run lookup or a `wandb.init` per iteration.

Everything logged is read back from the commit markers, so a resumed run that logs an iteration again logs the same
values: TensorBoard drops the earlier points at and after the restart step, MLflow finds the run it logged before
(by the run URI tag) and ignores identical points, W&B drops steps older than its run's last one. Metric names
pass unchanged. With `logger: none` nothing is written; the trackers' heavy imports (torch, mlflow, wandb) happen on
first use. The settings, `TrackingConfig`, live in stages/config.py with the rest of the run config.

Run alone to log every committed iteration of an existing run (a run trained before tracking was on, or into
another tracker):
    python -m stages.tracking runs/my-run --set tracking.logger=mlflow
Tests: tests/stages/test_tracking.py
"""

import json
import math
import os
import sys
import time
from datetime import datetime

from stages.config import TrackingConfig

HPARAM_METRICS = ("rollout/reward_mean", "rollout/kl")
"""Metrics TensorBoard's HPARAMS tab shows beside each run's config."""

IMPORTS = {"tensorboard": ("torch.utils.tensorboard", "tensorboard.compat.proto.event_pb2"),
           "mlflow": ("mlflow.tracking", "mlflow.entities"), "wandb": ("wandb",)}
"""Modules each `tracking.logger` imports when its tracker opens: the report's prewarm (stages/report.py) imports them
while the actors start, so the first report does not."""


def flatten_config(config: dict, prefix: str = "") -> dict:
    """`{"algo": {"gamma": 1.0}}` → `{"algo.gamma": 1.0}`; lists and empty sections become JSON text, because
    TensorBoard hparams and MLflow params take scalars only."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flatten_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (dict, list)) else value
    return out


class Tracker:
    """The tracker interface and the null tracker (`logger: none`): callers never branch on the logger."""

    where = "nowhere (tracking.logger: none)"
    """Where the run's metrics go, for people: the report shows it in the Prefect UI."""

    def log_config(self, config: dict) -> None:
        """Log the run's resolved config (`RunConfig.model_dump(mode="json")`)."""

    def log(self, metrics: dict, step: int, timestamp: float | None = None) -> None:
        """Log `metrics` at `step`, skipping None, non-numbers and non-finite values. `timestamp` (seconds since the
        epoch) dates the points; the same timestamp on a re-logged step lets MLflow recognise the duplicate."""
        finite = {k: float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and math.isfinite(v)}
        if finite:
            self._log(finite, step, timestamp)

    def _log(self, metrics: dict[str, float], step: int, timestamp: float | None) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorBoardTracker(Tracker):
    def __init__(self, logdir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # torch's module is there, the tensorboard package it writes with may not be
            raise ImportError(f"tracking.logger: tensorboard needs the tensorboard package ({err}); install it "
                              "(`pip install tensorboard`) or set tracking.logger: none") from err

        self.writer = SummaryWriter(logdir)  # a new event file per writer; earlier files of the run stay
        self.where = f"TensorBoard: `tensorboard --logdir {logdir}`"
        self.started = False

    def log_config(self, config: dict) -> None:
        from torch.utils.tensorboard.summary import hparams

        # Text tab: the config as a code block (4-space indent); HPARAMS tab: flattened, beside reward and KL.
        text = json.dumps(config, indent=2, sort_keys=True)
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)
        for summary in hparams(flatten_config(config), {name: 0.0 for name in HPARAM_METRICS}):
            self.writer.file_writer.add_summary(summary)

    def _log(self, metrics, step, timestamp):
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        if not self.started:
            # TensorBoard's restart marker: readers drop the points of earlier files at steps >= this one, so a
            # resumed run that logs iteration k again shows k once, with the values logged last.
            self.writer.file_writer.add_event(Event(session_log=SessionLog(status=SessionLog.START)), step, timestamp)
            self.started = True
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step, walltime=timestamp)
        self.writer.flush()  # kept open across iterations: readers see each iteration now, not in flush_secs

    def close(self):
        self.writer.close()


class MlflowTracker(Tracker):
    MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit
    MAX_PARAM_LENGTH = 6000  # MLflow's param value limit

    def __init__(self, tracking_uri: str, experiment: str, run_id: str, run_uri: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
        # Matched on the run URI rather than the run id: two storage roots may both hold a run called `my-run`.
        found = self.client.search_runs([exp_id], filter_string=f"tags.`ppoflow.run_uri` = '{run_uri}'",
                                        max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(exp_id, run_name=run_id, tags={
                "ppoflow.run_uri": run_uri, "ppoflow.run_id": run_id}).info.run_id
        self.where = f"MLflow: run {self.run_id} of experiment {experiment!r} at {tracking_uri}"

    def log_config(self, config: dict) -> None:
        from mlflow.entities import Param

        # Params are immutable in MLflow: a resumed run logs only new keys and names the ones whose value changed
        # (only operational fields can: iterations, ray.*, flow.*, tracking.*).
        logged = self.client.get_run(self.run_id).data.params
        params = {k: str(v)[: self.MAX_PARAM_LENGTH] for k, v in flatten_config(config).items()}
        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
        if changed:
            from stages.common import logger

            logger().warning("mlflow run %s keeps the params it started with; changed since: %s", self.run_id,
                             ", ".join(changed))
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        for i in range(0, len(new), self.MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[i: i + self.MAX_PARAMS_PER_BATCH])

    def _log(self, metrics, step, timestamp):
        from mlflow.entities import Metric

        ms = int(1000 * (timestamp if timestamp is not None else time.time()))
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ms, step) for k, v in metrics.items()])

    def close(self):
        self.client.set_terminated(self.run_id, "FINISHED")


class WandbTracker(Tracker):
    def __init__(self, project: str, mode: str, run_id: str, run_uri: str, wandb_dir: str):
        import hashlib

        import wandb

        # W&B ids are unique per project: the run URI's hash tells apart runs of the same name in two storage roots.
        wandb_id = f"{run_id}-{hashlib.sha256(run_uri.encode()).hexdigest()[:8]}"
        # console off: the driver's stdout is Prefect's; no system stats: the GPUs are in the Ray workers, not here.
        self.run = wandb.init(project=project, id=wandb_id, name=run_id, dir=wandb_dir, mode=mode, resume="allow",
                              reinit="create_new", settings=wandb.Settings(console="off", x_disable_stats=True))
        self.where = f"W&B ({mode}): run {project}/{wandb_id} in {wandb_dir}"

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def _log(self, metrics, step, timestamp):
        self.run.log(metrics, step=step)

    def close(self):
        self.run.finish()


def open_tracker(config: TrackingConfig, run_uri: str) -> Tracker:
    """The tracker of the run at `run_uri` (`{root}/{run_id}`); use it as a context manager or close it."""
    if config.logger == "none":
        return Tracker()
    import fsspec

    run_id = run_uri.rstrip("/").rsplit("/", 1)[-1]
    if config.dir is not None:
        base = config.dir
    elif fsspec.utils.get_protocol(run_uri) in ("file", "local"):
        base = fsspec.core.strip_protocol(run_uri).rstrip("/").rsplit("/", 1)[0]
    else:
        base = "tracking"  # an object-store root: these trackers write local files (see TrackingConfig.dir)
    base = os.path.abspath(os.path.expanduser(base))
    if config.logger == "tensorboard":
        return TensorBoardTracker(os.path.join(base, run_id, "tensorboard"))
    if config.logger == "mlflow":
        if config.mlflow_tracking_uri is not None:
            return MlflowTracker(config.mlflow_tracking_uri, config.project, run_id, run_uri)
        os.makedirs(base, exist_ok=True)
        return MlflowTracker(f"sqlite:///{base}/mlflow.db", config.project, run_id, run_uri)
    os.makedirs(os.path.join(base, run_id), exist_ok=True)
    return WandbTracker(config.project, config.wandb_mode, run_id, run_uri, os.path.join(base, run_id))


def run_tracker(config, run_uri: str) -> Tracker:
    """The run's tracker, kept open in the run's context (stages/context.py): opened (and the config logged) on the
    first call; close_run closes it."""
    from stages.context import run_context

    ctx = run_context(run_uri)
    if ctx.tracker is None:
        ctx.tracker = open_tracker(config.tracking, run_uri)
        if not ctx.config_logged:
            ctx.tracker.log_config(config.model_dump(mode="json"))
            ctx.config_logged = True
    return ctx.tracker


def track_iteration(config, run_uri: str, iteration: int, tracker: Tracker | None = None) -> dict:
    """Log the committed metrics of `iteration` at step = iteration into `tracker`, or into a tracker opened and
    closed for this call (logging the config the first time this process tracks the run); returns
    `iteration_summary` of the iteration."""
    from stages.common import iteration_summary, store_of
    from stages.context import run_context
    from storage.run import STAGES

    store = store_of(config, run_uri)
    row = iteration_summary(store, iteration)
    # Dated by the last commit of the iteration, so logging it again gives identical points.
    commits = [m["committed_at"] for s in STAGES if (m := store.stage_marker(iteration, s)) is not None]
    timestamp = datetime.fromisoformat(max(commits)).timestamp() if commits else None
    metrics = {k: v for k, v in row.items() if k != "iteration"}
    if tracker is not None:
        tracker.log(metrics, step=iteration, timestamp=timestamp)
        return row
    ctx = run_context(run_uri)
    with open_tracker(config.tracking, run_uri) as opened:
        if not ctx.config_logged:
            opened.log_config(config.model_dump(mode="json"))
        opened.log(metrics, step=iteration, timestamp=timestamp)
    ctx.config_logged = True
    return row


if __name__ == "__main__":
    from stages.config import load_config
    from storage.run import RunStore

    uri, args = sys.argv[1].rstrip("/"), sys.argv[2:]
    uri = uri if "://" in uri else os.path.abspath(uri)  # the flow's run URI of a local run is an absolute path
    store = RunStore(uri)
    if (manifest := store.read_manifest()) is None:
        sys.exit(f"{uri}: no run.json; give the folder of a run, `{{storage.root}}/{{run_id}}`")
    run_config = load_config(base=manifest["config"], overrides=[args[i + 1] for i, a in enumerate(args)
                                                                 if a == "--set"])
    for n in store.iterations():
        if store.stage_marker(n, "sync") is not None:
            row = track_iteration(run_config, uri, n)
            print(f"iteration {n}: {len(row) - 1} metrics → {run_config.tracking.logger}")
