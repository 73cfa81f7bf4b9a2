"""Reward sources besides rule functions: the reward-model actor on a tiny local reward model, and the remote
endpoint client against a real HTTP server on 127.0.0.1 (transient failures retried, permanent ones reported, the
token sent but never stored); their weighted sum through the score stage's `compute_rewards`.

Run alone (~20 s on 2 cores):
    .venv/bin/pytest -q tests/workers/test_reward.py
"""

import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pytest

from stages.config import ConfigError, RewardConfig, load_config
from stages.score import RewardError, compute_rewards, rewards_by_source
from workers.reward import RemoteReward, RemoteRewardError, RewardModelWorker

PROMPTS = ["What is 2*4?", "What is 2*17?", "Hi", "What is 2*4827?", "Tell me a long story about numbers please"]
RESPONSES = ["8", "34", "a much longer response with several words", "9654", ""]


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory) -> str:
    from ppoflow.tiny_model import make_tiny_reward_model

    return make_tiny_reward_model(str(tmp_path_factory.mktemp("models") / "tiny-reward"), log=lambda *_: None)


def hf_scores(model_dir: str, prompts: list[str], responses: list[str]) -> list[float]:
    """The reward model's own output, one unpadded text at a time, rendered with its chat template."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            text = tokenizer.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                                 tokenize=False)
            out.append(model(**tokenizer(text, add_special_tokens=False, return_tensors="pt")).logits[0, 0].item())
    return out


# ---- reward model ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reward_actor(ray_session, reward_model_dir):
    """The reward model in a Ray actor, as workers/cluster.py starts it; micro_batch_size 2 over the 5 samples of
    different lengths: every batch is right-padded, the last one holds a single sample."""
    import ray

    worker = ray.remote(RewardModelWorker).options(num_cpus=0.25).remote(reward_model_dir, "float32", 2, 1)
    yield worker
    ray.kill(worker)


def test_reward_model_actor_scores_like_the_hf_model_and_is_deterministic(reward_actor, reward_model_dir):
    import ray

    first = ray.get(reward_actor.score.remote(PROMPTS, RESPONSES))
    second = ray.get(reward_actor.score.remote(PROMPTS, RESPONSES))
    assert first == second
    assert first == pytest.approx(hf_scores(reward_model_dir, PROMPTS, RESPONSES), rel=1e-5, abs=1e-6)
    assert len({round(s, 4) for s in first}) == len(PROMPTS)  # the texts really reach the model


def test_a_chat_message_prompt_is_scored_as_its_conversation(reward_model_dir):
    """A message-list prompt reaches the reward model as its JSON text (the rollout table's string column): it is
    rendered as that conversation, system turn included, not as one user message holding JSON."""
    import json

    worker = RewardModelWorker(reward_model_dir, "float32", 2, 1)
    chat = [{"role": "system", "content": "Answer with the number only."}, {"role": "user", "content": "What is 2*4?"}]
    expected = worker.tokenizer.apply_chat_template(chat + [{"role": "assistant", "content": "8"}], tokenize=False)
    assert worker.text(json.dumps(chat), "8") == expected
    assert worker.text("What is 2*4?", "8") == worker.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2*4?"}, {"role": "assistant", "content": "8"}], tokenize=False)
    assert worker.text('["not", "messages"]', "8").count("<|im_start|>user") == 1  # a JSON-looking string stays text


def test_a_reward_model_without_pad_token_id_still_scores_the_last_real_token(reward_model_dir, tmp_path):
    from transformers import AutoConfig

    # Many HF reward models leave pad_token_id unset; with right padding the head would then read a pad position.
    config = AutoConfig.from_pretrained(reward_model_dir)
    config.pad_token_id = None
    unpadded = tmp_path / "no-pad"
    shutil.copytree(reward_model_dir, unpadded)
    config.save_pretrained(unpadded)
    assert AutoConfig.from_pretrained(unpadded).pad_token_id is None

    worker = RewardModelWorker(str(unpadded), "float32", 8, 1)
    assert worker.model.config.pad_token_id == worker.tokenizer.pad_token_id
    assert worker.score(PROMPTS, RESPONSES) == pytest.approx(hf_scores(reward_model_dir, PROMPTS, RESPONSES),
                                                             rel=1e-5, abs=1e-6)


# ---- remote endpoint ---------------------------------------------------------------------------------------------

def server_reward(prompt: str, response: str, metadata: dict) -> float:
    """What the test endpoint answers: any deterministic function of all three inputs."""
    return len(response) / 4 - len(prompt) / 100 + metadata.get("bonus", 0)


class RewardServer:
    """A reward endpoint on 127.0.0.1 (a free port) in a thread. `plan` is consumed one entry per request: "ok",
    503 / 429 / 400 (that status), "drop" (close the connection without answering), "slow" (answer after
    `slow_s`), "short" (one reward too few). Once the plan is used up every request is "ok". `requests` records
    each request's headers and JSON body."""

    def __init__(self, plan=(), slow_s: float = 1.0):
        self.plan, self.slow_s, self.requests, self.lock = list(plan), slow_s, [], threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"headers": dict(self.headers), "body": body})
                    step = server.plan.pop(0) if server.plan else "ok"
                try:
                    if step == "drop":
                        self.close_connection = True
                        self.connection.close()
                        return
                    if isinstance(step, int):
                        message = b"prompts must be strings" if step == 400 else b"try again later"
                        self.send_response(step)
                        if step == 429:
                            self.send_header("Retry-After", "0")
                        self.send_header("Content-Length", str(len(message)))
                        self.end_headers()
                        self.wfile.write(message)
                        return
                    if step == "slow":
                        time.sleep(server.slow_s)
                    rewards = [server_reward(p, r, m) for p, r, m in
                               zip(body["prompts"], body["responses"], body["metadata"])]
                    if step == "short":
                        rewards = rewards[:-1]
                    data = json.dumps({"rewards": rewards}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up on a slow answer
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/reward"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(plan=(), slow_s: float = 1.0) -> RewardServer:
        servers.append(RewardServer(plan, slow_s))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


METADATA = [{"answer": a, "bonus": i} for i, a in enumerate(["8", "34", "7", "9654", "1"])]  # what arith.reward reads
EXPECTED = [server_reward(p, r, m) for p, r, m in zip(PROMPTS, RESPONSES, METADATA)]


def test_transient_failures_are_retried_to_success(serve):
    server = serve([503, "drop", 429])  # the first request fails three ways before it gets through
    logged = []
    client = RemoteReward(server.url, batch_size=2, concurrency=1, retries=3, backoff_s=0.01, log=logged.append)
    assert client.score(PROMPTS, RESPONSES, METADATA) == EXPECTED
    sizes = [len(r["body"]["prompts"]) for r in server.requests]
    assert sizes == [2, 2, 2, 2, 2, 1]  # 3 failed attempts of the first request, then 3 requests of <= 2 samples
    assert server.requests[0]["body"] == {"prompts": PROMPTS[:2], "responses": RESPONSES[:2], "metadata": METADATA[:2]}
    assert len(logged) == 3 and "HTTP 503" in logged[0] and "retry 1 of 3" in logged[0]


def test_concurrent_requests_keep_the_samples_order(serve):
    server = serve(["slow"], slow_s=0.5)  # the first request to arrive answers last
    client = RemoteReward(server.url, batch_size=1, concurrency=3, backoff_s=0.01)
    assert client.score(PROMPTS, RESPONSES, METADATA) == EXPECTED
    assert len(server.requests) == len(PROMPTS)


def test_a_client_error_fails_at_once_with_the_servers_message(serve):
    server = serve([400])
    client = RemoteReward(server.url, batch_size=8, retries=3, backoff_s=0.01)
    with pytest.raises(RemoteRewardError) as err:
        client.score(PROMPTS, RESPONSES, METADATA)
    assert len(server.requests) == 1  # not retried
    assert str(err.value).startswith(f"reward.remote.url: {server.url} answered HTTP 400 Bad Request")
    assert "prompts must be strings" in str(err.value)


def test_a_timeout_is_retried_then_fails_naming_the_url(serve):
    server = serve(["slow"] * 3, slow_s=2.0)
    client = RemoteReward(server.url, timeout_s=0.3, retries=2, backoff_s=0.01)
    started = time.perf_counter()
    with pytest.raises(RemoteRewardError) as err:
        client.score(PROMPTS, RESPONSES, METADATA)
    assert time.perf_counter() - started < 5.0  # gave up on each attempt after timeout_s (waiting 3 x 2 s: >= 6 s)
    assert len(server.requests) == 3
    assert str(err.value).startswith(f"reward.remote.url: {server.url} failed 3 times")
    assert "reward.remote.retries = 2" in str(err.value) and "reward.remote.timeout_s = 0.3 s" in str(err.value)


def test_an_unreachable_endpoint_fails_naming_the_url(serve):
    server = serve()
    server.close()  # nothing listens on that port any more
    with pytest.raises(RemoteRewardError, match=r"reward.remote.url: http://127.0.0.1:\d+/reward failed 2 times"):
        RemoteReward(server.url, batch_size=8, retries=1, backoff_s=0.01).score(PROMPTS, RESPONSES, METADATA)


# ---- through the score stage's compute_rewards: weights, checks, the token -----------------------------------------

def _rollout() -> pa.Table:
    return pa.table({"sample_id": [f"it1-p{i}-s0" for i in range(len(PROMPTS))], "prompt": PROMPTS,
                     "response": RESPONSES, "metadata": [json.dumps(m) for m in METADATA]})


def test_the_combined_reward_is_the_weighted_sum_of_rule_model_and_remote(reward_actor, reward_model_dir, serve):
    from ppoflow.tasks import arith

    server = serve()
    reward = RewardConfig(fn="ppoflow.tasks.arith:reward", fn_weight=2.0,
                          model={"path": reward_model_dir, "weight": 0.5, "micro_batch_size": 2},
                          remote={"url": server.url, "weight": -0.25, "batch_size": 2})
    by_source = rewards_by_source(reward, _rollout(), reward_actor)
    combined = compute_rewards(reward, _rollout(), reward_actor)
    fn = arith.reward(PROMPTS, RESPONSES, METADATA)
    model = hf_scores(reward_model_dir, PROMPTS, RESPONSES)
    assert by_source["fn"] == fn and by_source["remote"] == EXPECTED
    assert by_source["model"] == pytest.approx(model, rel=1e-5, abs=1e-6)
    assert combined == pytest.approx([2.0 * f + 0.5 * m - 0.25 * r for f, m, r in zip(fn, model, EXPECTED)],
                                     rel=1e-5, abs=1e-6)


def test_a_rule_function_alone_is_unchanged():
    from ppoflow.tasks import arith

    reward = load_config(base={"model": {"path": "m"}, "data": {"prompts": "p"}}).reward
    assert (reward.fn, reward.fn_weight, reward.model, reward.remote) == ("ppoflow.tasks.arith:reward", 1.0, None, None)
    expected = arith.reward(PROMPTS, RESPONSES, METADATA)
    assert compute_rewards(reward, _rollout()) == expected == compute_rewards(reward.fn, _rollout())


def test_remote_values_are_checked_naming_the_source_and_sample(serve):
    server = serve(["short"])
    with pytest.raises(RewardError, match=rf"reward.remote {server.url} returned 1 values for 2 samples \(request 1 "
                                          r"of 3: samples it1-p0-s0 \.\. it1-p1-s0\)"):
        compute_rewards(RewardConfig(remote={"url": server.url, "batch_size": 2, "concurrency": 1}), _rollout())

    bad = _rollout().set_column(3, "metadata", pa.array([json.dumps({**m, "bonus": float("nan") if i == 3 else 0})
                                                         for i, m in enumerate(METADATA)]))
    with pytest.raises(RewardError, match=rf"reward.remote {server.url} returned nan for sample it1-p3-s0; "
                                          "expected a finite number"):
        compute_rewards(RewardConfig(remote={"url": server.url}), bad)


def test_the_token_reaches_the_server_but_never_the_config(serve, monkeypatch):
    secret = "rm-test-SECRET-token-5f0c2a"
    monkeypatch.setenv("PPOFLOW_TEST_REWARD_TOKEN", secret)
    server = serve()
    config = load_config(base={"model": {"path": "m"}, "data": {"prompts": "p"}},
                         overrides=[f"reward.remote.url={server.url}",
                                    "reward.remote.token_env=PPOFLOW_TEST_REWARD_TOKEN"])
    assert config.reward.fn is None  # a remote reward alone: the default rule function is not added to it
    assert compute_rewards(config.reward, _rollout()) == EXPECTED
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {secret}"
    # What is stored (run.json, markers' hash), logged to trackers and shown as a flow parameter holds its name only.
    assert secret not in config.model_dump_json() and secret not in json.dumps(config.resume_fingerprint())
    assert config.model_dump()["reward"]["remote"]["token_env"] == "PPOFLOW_TEST_REWARD_TOKEN"

    monkeypatch.delenv("PPOFLOW_TEST_REWARD_TOKEN")
    with pytest.raises(RewardError, match="reward.remote.token_env: the environment variable "
                                          "PPOFLOW_TEST_REWARD_TOKEN is not set"):
        compute_rewards(config.reward, _rollout())


@pytest.mark.parametrize("overrides, field", [
    (["reward.fn=null"], "reward: no reward source"),
    (["reward.remote.url=https://user:pw@example.com/r"], "reward.remote.url: the URL carries credentials"),
    (["reward.remote.url=https://example.com/r?api_key=abc"], "reward.remote.url: the URL carries credentials"),
    (["reward.remote.url=https://example.com/r", "reward.remote.token_env=sk-live-abc123"],
     "reward.remote.token_env: expected the NAME of an environment variable"),
    (["reward.model.path=m", "reward.model.weight=.nan"], "reward.model.weight"),
])
def test_bad_reward_configs_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config(base={"model": {"path": "m"}, "data": {"prompts": "p"}}, overrides=overrides)
    assert field in str(err.value)
    assert "abc123" not in str(err.value) and "pw@" not in str(err.value)  # a misplaced secret is not echoed
