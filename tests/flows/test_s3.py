"""The quickstart flow on S3 (moto's server on loopback) on the real stack (Ray, DeepSpeed, Prefect; the HF engine):
every stage and checkpoint lands in the bucket, a resume recomputes nothing committed, and no secret of the
environment reaches the bucket, the tracker's files, the Prefect API or the logs.

Credentials come from the environment only (tests/conftest.py `fake_aws_credentials`, set before Ray starts: the Ray
workers, which upload checkpoints, inherit the raylet's environment); the config holds just the endpoint.
"""

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from storage.run import MARKER, PART_MARKER, STAGES

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_backend", "ray_session")]

WANDB_SECRET = "sk-test-SECRET123-wandb"


def _objects(bucket, run_key: str) -> dict[str, str]:
    """md5 of every object of the run but the event records and the lock (written by every process)."""
    out = {}
    for key in sorted(bucket.fs.find(run_key, refresh=True)):
        rel = key[len(run_key) + 1:]
        if not rel.startswith("events/") and rel != "_LOCK.json":
            out[rel] = hashlib.md5(bucket.fs.cat_file(key)).hexdigest()
    return out


def _actions(bucket, run_key: str) -> list[tuple]:
    paths = sorted(bucket.fs.find(f"{run_key}/events", refresh=True))
    events = [json.loads(bucket.fs.cat_file(p)) for p in paths]
    return [(e["stage"], e.get("iteration"), e["action"]) for e in events]


def _prefect_api_text() -> str:
    """Every flow run's parameters and every log line the Prefect API holds, as one string."""
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # log lines still queued in this process
    chunks = []
    with get_client(sync_client=True) as client:
        for read in (client.read_flow_runs, client.read_logs):
            offset = 0
            while batch := read(limit=200, offset=offset):
                chunks += [item.model_dump_json() for item in batch]
                offset += len(batch)
    return "\n".join(chunks)


def test_quickstart_on_s3_commits_in_the_bucket_resumes_and_leaks_no_secret(
        make_config, s3_bucket, fake_aws_credentials, tmp_path, monkeypatch, capfd):
    import ray

    from flows.ppo import ppo_train

    monkeypatch.setenv("WANDB_API_KEY", WANDB_SECRET)  # a credential of another service, present but unused
    secrets = [WANDB_SECRET, fake_aws_credentials["AWS_SECRET_ACCESS_KEY"]]

    @ray.remote(num_cpus=0)
    def worker_env(name: str) -> str | None:
        import os

        return os.environ.get(name)

    # What lets the workers write checkpoints: they inherited the credentials from the process that started Ray.
    assert ray.get(worker_env.remote("AWS_SECRET_ACCESS_KEY")) == fake_aws_credentials["AWS_SECRET_ACCESS_KEY"]

    overrides = ["run_id=on-s3", "generation.backend=hf", "flow.retries=0",
                 f"storage.root={s3_bucket.uri('runs-prefix')}",
                 f"storage.storage_options={json.dumps(s3_bucket.storage_options)}", "tracking.logger=tensorboard",
                 f"tracking.dir={tmp_path / 'tracking'}"]
    config = make_config(*overrides, "iterations=2")
    result = ppo_train(config=config)
    assert result["run_uri"] == f"{s3_bucket.uri('runs-prefix')}/on-s3" and not result["resumed"]
    run_key = f"{s3_bucket.name}/runs-prefix/on-s3"

    # Read back with plain s3fs + pyarrow, not through storage/.
    fs = s3_bucket.fs
    for n in (1, 2):
        for stage in STAGES:
            marker = json.loads(fs.cat_file(f"{run_key}/iter-{n:06d}/{stage}/{MARKER}"))
            assert marker["config_hash"] == config.config_hash() and marker["rows"] > 0, (n, stage)
            for f in marker["files"]:
                assert fs.size(f"{run_key}/iter-{n:06d}/{stage}/{f['name']}") == f["bytes"]
        table = pq.read_table(f"{run_key}/iter-{n:06d}/advantages/part-00000.parquet", filesystem=fs)
        assert table.num_rows == 8 * config.generation.n_samples_per_prompt
        update = json.loads(fs.cat_file(f"{run_key}/iter-{n:06d}/update/{MARKER}"))
        ckpt = f"{run_key}/checkpoints/iter-{n:06d}"
        # Each part of the checkpoint the update names lists its files in its own marker, written after them.
        listed = {name: size for part in update["checkpoint"]["parts"]
                  for name, size in json.loads(fs.cat_file(f"{ckpt}/{PART_MARKER.format(part=part)}"))["files"].items()}
        assert {name.split("/")[0] for name in listed} == {"policy", "critic", "hf"}
        for name, size in listed.items():  # every file of the checkpoint is in the bucket, at its size
            assert fs.size(f"{ckpt}/{name}") == size, name
        assert fs.exists(f"{ckpt}/hf/model.safetensors") and fs.exists(f"{ckpt}/hf/config.json")
    assert json.loads(fs.cat_file(f"{run_key}/iter-000002/generate/{MARKER}"))["policy_version"] == 1
    for n in (0, 1, 2):
        assert fs.exists(f"{run_key}/iter-{n:06d}/eval/{MARKER}")
    assert json.loads(fs.cat_file(f"{run_key}/run.json"))["config"]["storage"]["storage_options"] == \
        s3_bucket.storage_options
    assert not fs.exists(f"{run_key}/_LOCK.json")  # released at the end

    # Resume to 3 iterations: nothing committed is recomputed or rewritten; iteration 3 is added.
    before, n_events = _objects(s3_bucket, run_key), len(_actions(s3_bucket, run_key))
    resumed = ppo_train(config=make_config(*overrides, "iterations=3"))
    assert resumed["resumed"] and resumed["first_iteration"] == 3
    ran = {(stage, n) for stage, n, action in _actions(s3_bucket, run_key)[n_events:] if action == "ran"}
    assert ran == {(stage, 3) for stage in (*STAGES, "eval")}
    after = _objects(s3_bucket, run_key)
    assert {k: after.get(k) for k in before} == before  # byte-identical
    assert {k.split("/")[0] for k in after.keys() - before.keys()} == {"iter-000003", "checkpoints"}
    assert fs.exists(f"{run_key}/iter-000003/sync/{MARKER}")

    # No secret anywhere: the bucket (manifest, markers, events, Parquet, checkpoints), the tracker's files, what
    # Prefect stored (flow parameters, log lines), what this process printed and what the Ray workers logged.
    stored = {f"s3://{k}": fs.cat_file(k) for k in fs.find(run_key, refresh=True)}
    stored |= {str(p): p.read_bytes() for p in (tmp_path / "tracking").rglob("*") if p.is_file()}
    assert any("tfevents" in name for name in stored)
    from ray._private.worker import _global_node

    stored |= {str(p): p.read_bytes() for p in Path(_global_node.get_logs_dir_path()).rglob("*") if p.is_file()}
    out, err = capfd.readouterr()
    stored |= {"prefect-api": _prefect_api_text().encode(), "stdout": out.encode(), "stderr": err.encode()}
    assert "iteration 3: reward" in out + err + stored["prefect-api"].decode()  # the logs were captured
    for secret in secrets:
        assert [name for name, data in stored.items() if secret.encode() in data] == [], secret
