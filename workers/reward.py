"""Reward sources besides rule functions: a reward model in a Ray actor, and a remote reward endpoint over HTTP.

- `RewardModelWorker` (the actor `{run}:reward`, created by workers/launch.py when `reward.model` is set): an HF
  `AutoModelForSequenceClassification` with one label, loaded with `from_pretrained` like any user's reward model,
  on cuda when the actor was given a GPU, else on the CPU. A sample's reward is the model's score of the last
  non-pad token of its text (the chat-templated conversation, or prompt + response).
- `RemoteReward` (called in the driver by the score stage when `reward.remote` is set): POSTs
  `{"prompts", "responses", "metadata"}` in batches of at most `batch_size` samples and reads `{"rewards": [...]}`;
  retries connection errors, timeouts, HTTP 5xx and 429 with exponential backoff; any other 4xx fails at once with
  the server's message. A bearer token comes from the environment variable named by `token_env`, never from the
  config. Standard library only (urllib).

The score stage (stages/score.py) combines them with the rule function: reward = Σ weight × source reward.

Run alone to score one prompt/response pair with a reward-model folder, or with an endpoint:
    python -m workers.reward /path/to/reward-model "What is 2*3?" "6"
    python -m workers.reward http://127.0.0.1:8000/reward "What is 2*3?" "6"    # token, if any, in $REWARD_TOKEN

Tests: tests/workers/test_reward.py; end to end: tests/flows/test_rewards.py
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from workers.cluster import RunActor


class RewardModelWorker(RunActor):
    """A frozen reward model π_rm → one scalar per (prompt, response): eval mode, no optimizer, no DeepSpeed."""

    def __init__(self, model_path: str, dtype: str, micro_batch_size: int, num_threads: int,
                 apply_chat_template: bool = True):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.set_num_threads(num_threads)
        self.device = torch.device("cuda" if _has_gpu() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=1, dtype=dtypes[dtype]).to(self.device).eval()
        config = self.model.config.get_text_config()
        # The classification head reads the rightmost token that is not config.pad_token_id, and no other rule: so
        # that id must be set and be the one batches are padded with (many reward models leave it unset; Llama-style
        # tokenizers have no pad token and pad with eos).
        if config.pad_token_id is None:
            config.pad_token_id = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                                   else self.tokenizer.eos_token_id)
        if config.pad_token_id is None:
            raise ValueError(f"reward.model.path: {model_path} defines neither a pad nor an eos token, so a padded "
                             "batch cannot be scored; set pad_token_id in its config.json")
        self.pad_id = config.pad_token_id
        self.max_len = getattr(config, "max_position_embeddings", None)
        self.micro_batch_size = micro_batch_size
        self.apply_chat_template = apply_chat_template and self.tokenizer.chat_template is not None

    def text(self, prompt: str, response: str) -> str:
        """The text scored for one sample: the conversation in the reward model's chat template, else the two
        strings joined. A prompt that was a list of chat messages arrives as their JSON text (storage/prompts.py
        prompt_text) and is scored as that conversation."""
        import json

        turns = [{"role": "user", "content": prompt}]
        if prompt.startswith("[{"):
            try:
                decoded = json.loads(prompt)
            except json.JSONDecodeError:
                decoded = None
            if isinstance(decoded, list) and all(isinstance(m, dict) and "content" in m for m in decoded):
                turns = [{k: v for k, v in m.items() if v is not None} for m in decoded]
        if not self.apply_chat_template:
            return "\n".join(m["content"] for m in turns) + response
        return self.tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": response}], tokenize=False)

    def encode(self, prompt: str, response: str) -> list[int]:
        # A rendered template already holds its special tokens; plain text gets the tokenizer's (e.g. a bos).
        ids = self.tokenizer(self.text(prompt, response), add_special_tokens=not self.apply_chat_template)["input_ids"]
        # Over the context length: keep the end, where the response (and the token that is scored) is.
        return ids[-self.max_len:] if self.max_len and len(ids) > self.max_len else ids

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """One reward per (prompt, response), in order, in micro-batches of right-padded token ids."""
        import torch

        if len(prompts) != len(responses):
            raise ValueError(f"reward model: {len(prompts)} prompts but {len(responses)} responses")
        encoded = [self.encode(p, r) for p, r in zip(prompts, responses)]
        out: list[float] = []
        with torch.no_grad():
            for start in range(0, len(encoded), self.micro_batch_size):
                batch = encoded[start:start + self.micro_batch_size]
                width = max(map(len, batch))
                input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                for i, ids in enumerate(batch):
                    input_ids[i, :len(ids)] = torch.tensor(ids)
                    attention_mask[i, :len(ids)] = 1
                logits = self.model(input_ids=input_ids.to(self.device),
                                    attention_mask=attention_mask.to(self.device)).logits  # (B, 1)
                out += logits[:, 0].float().cpu().tolist()
        return out


def _has_gpu() -> bool:
    """cuda is used only by an actor Ray gave a GPU (a CPU actor on a GPU host may still see the devices)."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        import ray

        return not ray.is_initialized() or bool(ray.get_gpu_ids())
    except ImportError:
        return True


class RemoteRewardError(RuntimeError):
    """A remote reward request failed for good; the message names the reward.remote field to look at."""


class RemoteReward:
    """Client of a remote reward endpoint (see the module docstring); arguments are `reward.remote`'s fields."""

    MAX_RETRY_AFTER_S = 60.0
    """Cap on a server's Retry-After (a misconfigured server must not stall the run for hours)."""

    def __init__(self, url: str, batch_size: int = 64, concurrency: int = 4, timeout_s: float = 60.0,
                 retries: int = 3, backoff_s: float = 1.0, token_env: str | None = None,
                 log: Callable[[str], None] | None = None):
        self.url, self.batch_size, self.concurrency = url, batch_size, concurrency
        self.timeout_s, self.retries, self.backoff_s, self.token_env = timeout_s, retries, backoff_s, token_env
        self.log = log or (lambda message: None)

    def score(self, prompts: list[str], responses: list[str], metadata: list[dict],
              sample_ids: list[str] | None = None) -> list:
        """The endpoint's rewards for every sample, in order (values as the server sent them; the caller checks
        they are finite numbers). Raises RemoteRewardError when a request fails for good or answers the wrong
        number of values."""
        token = self._token()  # read once per batch, so a rotated token is picked up by the next one
        n = len(prompts)
        starts = list(range(0, n, self.batch_size))
        sample_ids = sample_ids or [str(i) for i in range(n)]

        def request(k: int) -> list:
            s, e = starts[k], min(starts[k] + self.batch_size, n)
            body = {"prompts": prompts[s:e], "responses": responses[s:e], "metadata": metadata[s:e]}
            rewards = self._post(body, token, f"request {k + 1} of {len(starts)}")
            if len(rewards) != e - s:
                raise RemoteRewardError(
                    f"reward.remote {self.url} returned {len(rewards)} values for {e - s} samples (request {k + 1} of "
                    f"{len(starts)}: samples {sample_ids[s]} .. {sample_ids[e - 1]}); the endpoint must answer one "
                    "reward per sample, in order")
            return rewards

        if len(starts) <= 1 or self.concurrency == 1:
            batches = [request(k) for k in range(len(starts))]
        else:
            with ThreadPoolExecutor(min(self.concurrency, len(starts)), thread_name_prefix="reward-remote") as pool:
                batches = list(pool.map(request, range(len(starts))))  # raises the first failed request's error
        return [r for batch in batches for r in batch]

    def _token(self) -> str | None:
        if self.token_env is None:
            return None
        token = os.environ.get(self.token_env)
        if not token:
            raise RemoteRewardError(f"reward.remote.token_env: the environment variable {self.token_env} is not set "
                                    "(or empty) in the driver; export the endpoint's token there")
        return token

    def _post(self, body: dict, token: str | None, what: str) -> list:
        """POST one request with retries; returns the `rewards` list of the answer."""
        import http.client
        import urllib.error
        import urllib.request

        data = json.dumps(body).encode()
        attempts = self.retries + 1
        for attempt in range(1, attempts + 1):
            req = urllib.request.Request(self.url, data=data, method="POST",
                                         headers={"Content-Type": "application/json", "Accept": "application/json"})
            if token is not None:
                # Unredirected: a redirect to another host must not carry the token along.
                req.add_unredirected_header("Authorization", f"Bearer {token}")
            retry_after = None
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
                return self._rewards(raw)
            except urllib.error.HTTPError as err:
                message = _body_snippet(err)
                if err.code < 500 and err.code != 429:
                    raise RemoteRewardError(
                        f"reward.remote.url: {self.url} answered HTTP {err.code} {err.reason} to {what} (not "
                        f"retried: the server refused the request itself): {message}") from None
                problem = f"HTTP {err.code} {err.reason}: {message}"
                retry_after = _seconds(err.headers.get("Retry-After") if err.headers else None)
            except (TimeoutError, urllib.error.URLError, http.client.HTTPException, ConnectionError) as err:
                reason = getattr(err, "reason", err)
                if isinstance(reason, TimeoutError) or isinstance(err, TimeoutError):
                    problem = f"no answer within reward.remote.timeout_s = {self.timeout_s} s"
                else:
                    problem = f"{type(reason).__name__}: {reason}"
            if attempt == attempts:
                raise RemoteRewardError(
                    f"reward.remote.url: {self.url} failed {attempts} times on {what} (reward.remote.retries = "
                    f"{self.retries}); last error: {problem}. Check that the endpoint is up and reachable from the "
                    "driver, or raise reward.remote.timeout_s / retries")
            delay = self.backoff_s * 2 ** (attempt - 1)
            if retry_after is not None:
                delay = min(retry_after, self.MAX_RETRY_AFTER_S)
            self.log(f"reward.remote: {what} to {self.url} failed ({problem}); retry {attempt} of {self.retries} "
                     f"in {delay:.3g} s")
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _rewards(self, raw: bytes) -> list:
        try:
            answer = json.loads(raw)
        except ValueError:
            raise RemoteRewardError(f"reward.remote.url: {self.url} answered something that is not JSON: "
                                    f"{_snippet(raw)}; expected {{\"rewards\": [...]}}") from None
        if not isinstance(answer, dict) or not isinstance(answer.get("rewards"), list):
            raise RemoteRewardError(f"reward.remote.url: {self.url} answered {_snippet(raw)}; expected a JSON object "
                                    "{\"rewards\": [one number per sample]}")
        return answer["rewards"]


def _snippet(raw: bytes, limit: int = 500) -> str:
    text = raw.decode("utf-8", errors="replace").strip()
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _body_snippet(err) -> str:
    try:
        return _snippet(err.read())
    except Exception:  # the body may be gone with the connection; the status line still says what happened
        return "(no body)"


def _seconds(value: str | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is ignored: the backoff applies)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


if __name__ == "__main__":
    target, prompt, response = sys.argv[1:4]
    if target.startswith(("http://", "https://")):
        token_env = "REWARD_TOKEN" if "REWARD_TOKEN" in os.environ else None
        print("reward:", RemoteReward(target, token_env=token_env, log=print).score([prompt], [response], [{}]))
    else:
        print("reward:", RewardModelWorker(target, "float32", 1, 2).score([prompt], [response]))
