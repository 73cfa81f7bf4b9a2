"""Session fixtures shared by the suite: environment, the tiny model, prompt files, one Ray and one Prefect backend.

Everything is built locally (no downloads). Expensive things are session-scoped and built once.
"""

import os
import tempfile

import pytest

_HOME = tempfile.mkdtemp(prefix="ppoflow-test-home-")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # busy 2-core CI machines
os.environ.setdefault("PREFECT_HOME", os.path.join(_HOME, "prefect"))
os.environ.setdefault("PREFECT_MEMO_STORE_PATH", os.path.join(_HOME, "prefect", "memo_store.toml"))
os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(_HOME, "vllm"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def _reap_session(sid: int) -> None:
    import signal

    import psutil

    victims = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                victims.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    for p in victims:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs(victims, timeout=30)


@pytest.fixture(scope="session")
def reap_session():
    """SIGKILL every process of a session (a subprocess started with start_new_session=True and all it spawned:
    Ray, vLLM, Prefect workers) — what a crashed run leaves behind."""
    return _reap_session


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A random-init tiny Qwen2 + tokenizer in HF format (fast; for plumbing tests)."""
    from ppoflow.tiny_model import make_tiny_model

    out = str(tmp_path_factory.mktemp("models") / "tiny-random")
    make_tiny_model(out, sft_steps=0)
    return out


@pytest.fixture(scope="session")
def sft_model_dir(tmp_path_factory) -> str:
    """The quickstart's starting policy: tiny Qwen2 after its short SFT (~30 s), so rewards vary between samples."""
    from ppoflow.tiny_model import make_tiny_model

    out = str(tmp_path_factory.mktemp("models") / "tiny-sft")
    make_tiny_model(out, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def prompts_dir(tmp_path_factory) -> str:
    """train.jsonl / eval.jsonl of the quickstart task."""
    from ppoflow.tasks.arith import write_prompts

    out = str(tmp_path_factory.mktemp("data") / "arith")
    write_prompts(out, n_train=256, n_eval=64, seed=0)
    return out


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the session (2 CPUs as on the CI machines)."""
    import ray

    from workers.cluster import worker_env

    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="ppoflow-tests", log_to_driver=False,
             runtime_env={"env_vars": worker_env()})
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_backend():
    """A temporary Prefect API for in-process flow runs (one per session: it costs ~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    # The harness has its own start-up wait (30 s), apart from the setting above: too short on a busy machine.
    with prefect_test_harness(server_startup_timeout=180):
        yield


TEST_SCALE = ["data.prompts_per_iteration=8", "generation.n_samples_per_prompt=4", "eval.every=1",
              "policy.lr=5e-5", "policy.mini_batch_size=32", "policy.micro_batch_size=16",
              "critic.lr=1e-4", "critic.mini_batch_size=32", "critic.micro_batch_size=16"]
"""Overrides that shrink configs/quickstart.yaml to test size: its batch, learning rates and evaluation cadence are
tuned to learn in ten minutes; tests keep their speed and meaning when it is retuned."""


@pytest.fixture
def test_scale() -> list[str]:
    return list(TEST_SCALE)


@pytest.fixture
def make_config(tmp_path, tiny_model_dir, prompts_dir):
    """The quickstart config pointed at the test model, prompts and a temporary storage root, plus overrides. Sized by
    TEST_SCALE."""
    from pathlib import Path

    from stages.config import load_config

    quickstart = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"

    def make(*overrides: str):
        return load_config(str(quickstart), [f"model.path={tiny_model_dir}", f"data.prompts={prompts_dir}/train.jsonl",
                                             f"eval.prompts={prompts_dir}/eval.jsonl", "eval.max_prompts=16",
                                             f"storage.root={tmp_path}", *TEST_SCALE, *overrides])

    return make


# ---- S3: a real S3 server (moto) on loopback ---------------------------------------------------------------------

FAKE_AWS_SECRET = "sk-test-SECRET-aws-7c41e9"
"""The session's fake AWS secret access key: tests assert it is stored and logged nowhere."""


@pytest.fixture(scope="session", autouse=True)
def fake_aws_credentials():
    """Fake AWS credentials in the environment for the whole session, set before any test starts Ray: Ray workers
    (which write checkpoints to s3://) inherit the environment the first `ray.init` gave the raylet, so credentials
    set later would never reach them. Real credentials of the shell are hidden: the tests talk only to moto."""
    fake = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": FAKE_AWS_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1"}
    hidden = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
    saved = {k: os.environ.get(k) for k in (*fake, *hidden)}
    for k in hidden:
        os.environ.pop(k, None)
    os.environ.update(fake)
    yield fake
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def s3_server(fake_aws_credentials) -> str:
    """moto's S3 server on 127.0.0.1 on a free port, for the session; yields its endpoint URL."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


class S3Bucket:
    """A fresh bucket on the test S3 server: `uri(prefix)` → `s3://bucket/prefix`; `storage_options` is what
    `storage.storage_options` must hold (the endpoint only; credentials come from the environment)."""

    def __init__(self, name: str, endpoint_url: str):
        import s3fs

        self.name, self.endpoint_url = name, endpoint_url
        self.storage_options = {"endpoint_url": endpoint_url}
        self.fs = s3fs.S3FileSystem(**self.storage_options)

    def uri(self, prefix: str = "") -> str:
        return f"s3://{self.name}/{prefix}".rstrip("/")


@pytest.fixture
def s3_bucket(s3_server) -> S3Bucket:
    import uuid

    bucket = S3Bucket(f"ppoflow-test-{uuid.uuid4().hex[:12]}", s3_server)
    bucket.fs.mkdir(bucket.name)
    return bucket
