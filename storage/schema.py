"""Arrow schemas of the tables a PPO iteration persists: rollout → scored → experience.

Each stage adds columns to the previous table, so every table is self-contained and the experience table alone
holds everything a user needs to inspect an iteration with plain pyarrow. Per-token columns are Arrow lists over the
*response* tokens of one sample (length A = len(response_ids)); prompt tokens carry no per-token values.

A multi-turn episode (rollout.env) is one row too: its response is every token after the prompt, the policy's turns
and the environment's answers in order, and `response_mask` tells them apart. Environment tokens are holes: every
per-token column has a value there (logprobs of the tokens, values, ...) but no loss, estimator, metric or logprob
gate counts them (`policy_mask`). A sample without multi-turn columns (a single-turn run, or a table written before
they existed) has no holes.

Run alone to print the schemas:  python -m storage.schema
"""

import hashlib

import pyarrow as pa

TURN = pa.struct(
    [
        pa.field("role", pa.string()),  # "assistant" (a policy turn), the observation's chat role ("tool", "user"),
        #                                 or "environment" (an observation given as plain text)
        pa.field("text", pa.string()),  # assistant: the turn decoded (special tokens skipped, a stop string cut);
        #                                 observation: its content (the chat template's glue is not shown)
        pa.field("tool", pa.string()),  # the tool the assistant turn called / whose output this is; null for none
        pa.field("tokens", pa.int32()),  # response tokens the turn added (0 for an observation that ended the episode)
        pa.field("latency_s", pa.float64()),  # assistant: the engine batch it was sampled in; observation: env.step
        pa.field("reward", pa.float32()),  # assistant: env.step's reward increment for this action; 0 otherwise
        pa.field("seed", pa.int64()),  # assistant: the engine seed that sampled it (rerun it with this seed, n=1)
        pa.field("finish_reason", pa.string()),  # assistant: the engine's "stop" | "length"
        pa.field("error", pa.bool_()),  # observation: the environment flagged an error (a tool failed, timed out)
    ]
)
"""One turn of a multi-turn episode (the rollout's `turns` column)."""

ROLLOUT = pa.schema(
    [
        pa.field("sample_id", pa.string()),  # "it{iteration}-g{group_id}-p{prompt_index}-s{k}", unique in a run
        pa.field("iteration", pa.int64()),  # PPO iteration that generated the sample (1-based)
        pa.field("prompt_index", pa.int64()),  # row of the prompt in the prompt file
        pa.field("group_id", pa.int64()),  # prompt position within this iteration's batch; samples of a prompt share it
        pa.field("sample_index", pa.int32()),  # k in 0..n_samples_per_prompt-1
        pa.field("prompt", pa.string()),  # the prompt as in the prompt file: its text, or a chat-message list's JSON
        pa.field("prompt_ids", pa.list_(pa.int32())),  # (P,) token ids fed to the engine (chat template applied)
        pa.field("prompt_truncated", pa.bool_()),  # the templated prompt was longer than data.max_prompt_tokens
        pa.field("response", pa.string()),  # decoded response, special tokens skipped
        pa.field("response_ids", pa.list_(pa.int32())),  # (A,) sampled token ids, eos included when emitted
        pa.field("engine_logprobs", pa.list_(pa.float32())),  # (A,) log π_engine(a_t|s_t) reported by the engine
        pa.field("finish_reason", pa.string()),  # "stop" (eos / stop string) or "length" (max_new_tokens hit)
        pa.field("policy_version", pa.int64()),  # policy version the engine served (iteration - 1 - staleness)
        pa.field("staleness", pa.int64()),  # versions between it and the update's start: iteration - 1 - policy_version
        pa.field("metadata", pa.string()),  # JSON object of the prompt row's other columns (e.g. the answer)
        # Multi-turn columns (rollout.env); null on a single-turn sample, and null wherever they hold their trivial
        # value. With an env, `response` is the episode's last policy turn (its answer: what reward.fn scores),
        # `finish_reason` also "max_turns", and engine_logprobs holds 0.0 at environment tokens.
        pa.field("response_mask", pa.list_(pa.int8())),  # (A,) 1 = policy token (sampled), 0 = environment token
        #                                                  (a hole); null = all 1
        pa.field("turn_index", pa.list_(pa.int16())),  # (A,) index in `turns` of the turn each token belongs to;
        #                                                null = all 0
        pa.field("env_rewards", pa.list_(pa.float32())),  # (A,) env.step reward increments, each on the last token of
        #                                                   the policy turn that earned it; null = none
        pa.field("turns", pa.list_(TURN)),  # the episode turn by turn; null for a single-turn sample
    ]
)

SCORED = pa.schema(
    list(ROLLOUT)
    + [
        pa.field("reward", pa.float32()),  # scalar reward of the response: reward function (+ overlong penalty)
        pa.field("old_logprobs", pa.list_(pa.float32())),  # (A,) log π_old(a_t|s_t), trainer, before the update
        pa.field("ref_logprobs", pa.list_(pa.float32())),  # (A,) log π_ref(a_t|s_t), frozen reference model
        pa.field("values", pa.list_(pa.float32())),  # (A,) critic V(s_t) before each token; null without a critic
    ]
)

EXPERIENCE = pa.schema(
    list(SCORED)
    + [
        pa.field("kl", pa.list_(pa.float32())),  # (A,) per-token KL estimate vs the reference (algo.kl_estimator)
        pa.field("token_rewards", pa.list_(pa.float32())),  # (A,) reward per token (KL penalty + final score)
        pa.field("advantages", pa.list_(pa.float32())),  # (A,) advantage estimate Â_t used by the policy loss
        pa.field("returns", pa.list_(pa.float32())),  # (A,) value targets R_t (GAE: Â_t + V(s_t)); zeros without critic
    ]
)

METRICS = pa.schema(
    [
        pa.field("name", pa.string()),  # stable metric name, e.g. "ppo/policy_loss"
        pa.field("step", pa.int64()),  # optimizer step within the iteration (0-based); -1 for iteration summaries
        pa.field("value", pa.float64()),
    ]
)

SYNC = pa.schema(
    [
        pa.field("engine", pa.string()),  # engine actor name
        pa.field("policy_version", pa.int64()),  # version the engine serves after the sync
        pa.field("method", pa.string()),  # how: "broadcast", "ipc", "object_store", "storage" or "already_current"
        pa.field("bytes", pa.int64()),  # size of the weights sent
        pa.field("seconds", pa.float64()),  # wall time of the transfer and in-place load
        pa.field("checksum", pa.float64()),  # engine-side checksum of the loaded weights (see workers.vllm_engine)
    ]
)

EVAL = pa.schema(
    [
        pa.field("sample_id", pa.string()),  # "eval{iteration}-p{prompt_index}-s{k}"
        pa.field("prompt_index", pa.int64()),  # row of the prompt in the evaluation prompt set
        pa.field("sample_index", pa.int64()),  # 0..eval.n_samples-1
        pa.field("prompt", pa.string()),  # the prompt as in the prompt file (text, or a message list's JSON)
        pa.field("response", pa.string()),  # decoded response (special tokens skipped)
        pa.field("response_len", pa.int64()),  # response tokens
        pa.field("finish_reason", pa.string()),  # "stop" | "length"
        pa.field("reward", pa.float32()),  # reward.fn score
        pa.field("passed", pa.bool_()),  # reward >= eval.pass_threshold
        pa.field("policy_version", pa.int64()),  # policy that answered (= the iteration; 0 = the starting policy)
        pa.field("metadata", pa.string()),  # JSON of the prompt row's other columns (what the reward function saw)
        pa.field("turns", pa.list_(TURN)),  # with rollout.env: the episode turn by turn (`response` is its last
        #                                     policy turn); null for a single-turn answer
    ]
)

SCHEMAS = {"rollout": ROLLOUT, "scored": SCORED, "experience": EXPERIENCE, "metrics": METRICS, "sync": SYNC,
           "eval": EVAL}


def policy_mask(table) -> list[list[int]]:
    """Per sample, 1 on each response token the policy sampled and 0 on environment tokens (holes): the
    `response_mask` column with its nulls, or its absence (tables of single-turn samples or from before multi-turn
    rollouts), read as all ones."""
    lengths = [len(ids) for ids in table["response_ids"].to_pylist()]
    if "response_mask" not in table.column_names:
        return [[1] * n for n in lengths]
    return [[1] * n if m is None else m for m, n in zip(table["response_mask"].to_pylist(), lengths)]


def fingerprint(schema: pa.Schema) -> str:
    """Short stable hash of the column names and types (not metadata), stored in every commit marker."""
    text = "\n".join(f"{f.name}:{f.type}:{f.nullable}" for f in schema)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


if __name__ == "__main__":
    for name, schema in SCHEMAS.items():
        print(f"# {name}  ({fingerprint(schema)})\n{schema}\n")
