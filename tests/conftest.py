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

    ray.init(num_cpus=2, include_dashboard=False, namespace="ppoflow-tests", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_backend():
    """A temporary Prefect API for in-process flow runs (one per session: it costs ~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


@pytest.fixture
def make_config(tmp_path, tiny_model_dir, prompts_dir):
    """The quickstart config pointed at the test model, prompts and a temporary storage root, plus overrides."""
    from pathlib import Path

    from stages.config import load_config

    quickstart = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"

    def make(*overrides: str):
        return load_config(str(quickstart), [f"model.path={tiny_model_dir}", f"data.prompts={prompts_dir}/train.jsonl",
                                             f"eval.prompts={prompts_dir}/eval.jsonl", "eval.max_prompts=16",
                                             f"storage.root={tmp_path}", "data.prompts_per_iteration=8",
                                             *overrides])

    return make
