"""A run whose reward combines all three sources: the rule function, a reward model in its Ray actor and a remote
endpoint (a real HTTP server on 127.0.0.1, with a bearer token from the environment).

The stored score table is checked against the weighted sum recomputed here from its rows, each source computed
independently (the rule function, the HF reward model called directly, the server's own function); the endpoint's
token is sent but stored nowhere in the run. The HF engine keeps it short (~30 s on an idle 2-core machine).

Run alone:
    .venv/bin/pytest -q tests/flows/test_rewards.py
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_backend", "ray_session")]

TOKEN = "rm-e2e-SECRET-token-93be1d"


def endpoint_reward(prompt: str, response: str, metadata: dict) -> float:
    return len(response) / 8 - (response.strip() == metadata["answer"])


@pytest.fixture
def endpoint():
    """A reward endpoint answering endpoint_reward per sample; yields (url, the Authorization headers it saw)."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(self.headers.get("Authorization"))
            data = json.dumps({"rewards": [endpoint_reward(*x) for x in
                                           zip(body["prompts"], body["responses"], body["metadata"])]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/reward", seen
    httpd.shutdown()
    httpd.server_close()


def test_the_stored_reward_is_the_weighted_sum_of_rule_model_and_remote(make_config, tmp_path_factory, endpoint,
                                                                          monkeypatch):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from flows.ppo import ppo_train
    from ppoflow.tasks import arith
    from ppoflow.tiny_model import make_tiny_reward_model

    rm_dir = make_tiny_reward_model(str(tmp_path_factory.mktemp("models") / "tiny-reward"), log=lambda *_: None)
    url, seen = endpoint
    monkeypatch.setenv("PPOFLOW_TEST_REWARD_TOKEN", TOKEN)
    config = make_config(
        "run_id=combined-reward", "iterations=1", "generation.backend=hf", "algo.estimator=rloo", "eval.prompts=null",
        "reward.fn_weight=2.0",
        f"reward.model={{path: {rm_dir}, weight: 0.5, micro_batch_size: 16, num_cpus: 0.25, num_threads: 1}}",
        f"reward.remote={{url: '{url}', weight: -0.25, batch_size: 12, token_env: PPOFLOW_TEST_REWARD_TOKEN}}")
    run = Path(ppo_train(config=config)["run_uri"])

    rows = pq.read_table(run / "iter-000001" / "score").to_pylist()
    prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
    metadata = [json.loads(r["metadata"]) for r in rows]
    fn = np.array(arith.reward(prompts, responses, metadata))
    remote = np.array([endpoint_reward(*x) for x in zip(prompts, responses, metadata)])
    tokenizer = AutoTokenizer.from_pretrained(rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    with torch.no_grad():
        rm = np.array([model(**tokenizer(tokenizer.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False),
            add_special_tokens=False, return_tensors="pt")).logits[0, 0].item() for p, r in zip(prompts, responses)])
    np.testing.assert_allclose([r["reward"] for r in rows], 2.0 * fn + 0.5 * rm - 0.25 * remote, rtol=1e-5,
                               atol=1e-5)
    assert len(seen) == 3 and seen == [f"Bearer {TOKEN}"] * 3  # 32 samples in requests of at most 12

    metrics = json.loads((run / "iter-000001" / "score" / "_SUCCESS.json").read_text())["metrics"]
    for name, values in (("fn", fn), ("model", rm), ("remote", remote)):
        assert metrics[f"rollout/reward_{name}_mean"] == pytest.approx(values.mean(), rel=1e-5, abs=1e-6)
    assert metrics["rollout/reward_mean"] == pytest.approx(np.mean([r["reward"] for r in rows]), rel=1e-5)
    assert rm.std() > 0 and remote.std() > 0  # the check above compares varying numbers, not constants

    stored = [p for p in run.rglob("*") if p.is_file()]
    assert run / "run.json" in stored and [str(p) for p in stored if TOKEN.encode() in p.read_bytes()] == []
