"""Generate stage: draw this iteration's prompts, sample n responses each from the engines, commit the rollout table.

The requests (one per prompt, with its own seed) are spread over generation.num_engines engines by the run's
`EnginePool` (workers/engine_pool.py); every engine must serve the previous iteration's policy, or with
algo.max_staleness = S ≥ 1 the policy of iteration − 1 − S (at least 0), while the trainers work on the iterations
before (stages/pipeline.py); each sample records its policy version and staleness. With
generation.enable_sleep_mode the engines wake before sampling and sleep again after it. An engine that dies while
sampling is restarted by Ray, synced back to that policy and sent its unfinished chunks again: the rollout is the one
an undisturbed run commits.

Prompts are read in a seeded per-pass shuffled order. Iteration n continues at the data position where iteration
n-1's committed generate stage stopped (recorded in its marker with a fingerprint of the prompt set; a changed prompt
set starts again at position 0), so a resumed run draws the same prompts. Each prompt's sampling seed is fixed too, so
generation does not depend on batching.

With algo.dynamic_sampling (DAPO) the stage scores each round of prompt groups with the reward function, keeps the
groups whose samples disagree and samples further prompts until prompts_per_iteration groups are kept (at most
algo.max_sampling_rounds rounds); the whole loop commits once, so a crash inside it repeats the same rounds.

With rollout.env each sample is a multi-turn episode with that environment (workers/episodes.py): the request of a
prompt becomes its n episodes, each turn seeded from the sample's seed, so a crash inside (fault point
`generate.turn{t}` before the engine batch of turn t) repeats the same turns.

Tests: tests/stages/test_generate.py; end to end: tests/flows/test_ppo_flow.py
"""

import functools
import json
import time

import numpy as np

from stages.common import Output, StageRun, logger, stage, trainers_lock


def prompt_order(n_prompts: int, start: int, count: int, seed: int, shuffle: bool) -> list[int]:
    """Prompt rows at data positions [start, start + count): consecutive slices of a per-pass shuffled order,
    wrapping over passes (pass p is shuffled with the seed [seed, p])."""
    out, orders = [], {}
    for pos in range(start, start + count):
        epoch, k = divmod(pos, n_prompts)
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([seed, epoch]).permutation(n_prompts) if shuffle else None
        out.append(int(orders[epoch][k]) if shuffle else k)
    return out


def data_start(previous: dict | None, fingerprint: str, iteration: int, per_iteration: int) -> int:
    """Data position where `iteration` starts: where the previous iteration's committed generate stage stopped (dynamic
    sampling may have read more than one batch), or 0 when that iteration read another prompt set — new rows would
    otherwise shift every position and silently skip or repeat prompts."""
    if iteration == 1:
        return 0
    data = (previous or {}).get("data")
    if data is None:  # a marker from before data positions were recorded: one batch per iteration
        return (iteration - 1) * per_iteration
    return data["end"] if data["fingerprint"] == fingerprint else 0


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def encode_prompt(tokenizer, prompt: str | list[dict], chat: bool, max_tokens: int,
                  input_template: str | None = None) -> tuple[list[int], bool]:
    """Token ids fed to the engine; over-long prompts keep their last tokens (the generation prompt survives).

    A string prompt is first formatted with `input_template` (data.input_template, e.g. "Question: {}\nAnswer:"),
    then, with the chat template (`chat`), wrapped as one user turn; a list of chat messages (system turns included)
    is rendered by the chat template as it is."""
    if isinstance(prompt, str) and input_template is not None:
        prompt = input_template.format(prompt)
    if chat:
        # Parquet structs give every message every key of the column, None where a message has none.
        messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                    else [{k: v for k, v in m.items() if v is not None} for m in prompt])
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    elif isinstance(prompt, str):
        text = prompt
    else:
        raise ValueError("a list of chat messages becomes model input only through the chat template "
                         "(data.apply_chat_template: true)")
    ids = tokenizer(text, add_special_tokens=not chat)["input_ids"]
    return (ids[-max_tokens:], True) if len(ids) > max_tokens else (ids, False)


_PROMPT_SETS: dict[tuple, tuple] = {}
"""(field, its sources and reading options) → (the sources' stamp, rows, fingerprint): prompt sets read in this
process (`prompt_set`)."""


def prompt_set(config, field: str = "data.prompts") -> tuple[list[dict], str]:
    """The rows of data.prompts or eval.prompts (`field`), checked against the data section (a prompt of the right
    type in data.prompt_key, a label at data.label_key when set: storage/prompts.py), and the set's fingerprint, a
    hash of its prompts that the generate marker records (`data_start`).

    Read once per process while the files stay as they are: generate used to read, check and hash the whole file at
    every iteration. The cache is keyed by each file's size and modification time (storage/prompts.py
    `source_stamp`), taken before the read, so a file rewritten between iterations or before a resume is read again;
    folders, globs and hub datasets have no stamp and are read at every call. Callers share the rows: read only."""
    import hashlib

    from storage.prompts import prompt_text, read_prompts, source_stamp

    data, opts = config.data, config.storage.storage_options
    uris = data.prompts if field == "data.prompts" else config.eval.prompts
    key = (field, json.dumps([uris, data.prompt_key, data.label_key, data.apply_chat_template, data.input_template,
                              opts], sort_keys=True, default=str))
    stamp = source_stamp(uris, opts)
    if stamp is not None and (cached := _PROMPT_SETS.get(key)) is not None and cached[0] == stamp:
        return cached[1], cached[2]
    rows = read_prompts(uris, data.prompt_key, opts, label_key=data.label_key, chat=data.apply_chat_template,
                        input_template=data.input_template, field=field)
    text = "\x1f".join(prompt_text(r[data.prompt_key]) for r in rows)
    fingerprint = hashlib.sha256(text.encode()).hexdigest()[:16]
    if stamp is not None:
        _PROMPT_SETS[key] = (stamp, rows, fingerprint)
    return rows, fingerprint


def read_prompt_rows(config, field: str = "data.prompts") -> list[dict]:
    """The rows of `prompt_set` (shared with other callers: read only)."""
    return prompt_set(config, field)[0]


def _sleep_engines(s: StageRun) -> None:
    # A resumed run past a committed generate: the stages after it still want the engines' memory (sleep mode).
    s.engines().sleep()


@stage("generate", schema="rollout", on_skip=_sleep_engines)
def generate(s: StageRun) -> Output:
    import copy

    import pyarrow as pa
    import torch

    from algorithms.dapo import informative_groups
    from stages.score import compute_rewards
    from stages.pipeline import behaviour_version
    from storage.faults import fault_point
    from storage.prompts import prompt_text
    from storage.schema import ROLLOUT
    from workers.engine_pool import check_serving
    from workers.engines import engine_versions
    from workers.episodes import EPISODE_COLUMNS, episode_metrics, play

    config, store, iteration = s.config, s.store, s.iteration
    pool = s.engines()
    # The rollout must come from the committed policy `version` (the previous iteration's, or S before it), whatever
    # the engines held. Beside the trainer stages (S ≥ 1) they hold it already, and nothing moves; at the start of a
    # run or a resume the sync moves the policy, under the run's trainer lock.
    version = behaviour_version(config, iteration)
    if any(v != version for v in engine_versions(pool.handles)):
        with trainers_lock(s.run_uri):
            pool.bring_to(version)
        check_serving(pool.handles, version)  # engines that were all at `version` need no second question
    # Every request (or episode turn) from policy `version`; re-syncing a restarted engine takes the trainer lock.
    sample = functools.partial(pool.generate, version=version, stage="generate", iteration=iteration,
                               guard=lambda: trainers_lock(s.run_uri))
    pool.wake()

    data, gen, algo = config.data, config.generation, config.algo
    batch, n = data.prompts_per_iteration, gen.n_samples_per_prompt
    rows, fingerprint = prompt_set(config)
    previous = store.stage_marker(iteration - 1, "generate") if iteration > 1 else None
    position = start = data_start(previous, fingerprint, iteration, batch)
    tok = _tokenizer(config.model.path)

    kept, dropped, rounds, gen_seconds, requests_sent = [], [], 0, 0.0, 0
    while rounds < (algo.max_sampling_rounds if algo.dynamic_sampling else 1) and len(kept) < batch:
        groups = []
        for index in prompt_order(len(rows), position, batch, config.seed, data.shuffle):
            ids, truncated = encode_prompt(tok, rows[index][data.prompt_key], data.apply_chat_template,
                                           data.max_prompt_tokens, data.input_template)
            groups.append({"index": index, "ids": ids, "truncated": truncated})
        requests = [{
            "prompt_ids": g["ids"], "n": n, "temperature": gen.temperature, "top_p": gen.top_p, "top_k": gen.top_k,
            "max_new_tokens": gen.max_new_tokens, "stop": gen.stop or None,
            # The engine draws sample i of a request with seed + i: space requests n apart so no two samples of
            # the iteration share a random stream.
            "seed": (config.seed * 1_000_003 + iteration * 100_003 + (rounds * batch + j) * n) % (2**31 - 1),
        } for j, g in enumerate(groups)]
        t_gen = time.perf_counter()
        # An engine that dies mid-sampling is restarted by Ray, synced back to `version` and sent its chunks again.
        if config.rollout.env is None:
            results = sample(requests)
        else:  # multi-turn episodes (workers/episodes.py); a SIGKILL inside repeats the same turns on resume
            # Copies: the rows are shared with later iterations (prompt_set), and an environment may change its own.
            own = [copy.deepcopy(rows[g["index"]]) for g in groups]
            results, _ = play(requests, own, sample, tok, functools.partial(
                encode_prompt, tok, chat=data.apply_chat_template, max_tokens=data.max_prompt_tokens,
                input_template=data.input_template), config.rollout, prompt_key=data.prompt_key,
                chat=data.apply_chat_template, max_model_len=gen.max_model_len,
                on_turn=lambda t: fault_point(f"generate.turn{t}", iteration))
        gen_seconds += time.perf_counter() - t_gen
        requests_sent += len(requests)
        position, rounds = position + batch, rounds + 1
        for g, samples in zip(groups, results):
            meta = {k: v for k, v in rows[g["index"]].items() if k != data.prompt_key}
            g["rows"] = [{
                "sample_id": f"it{iteration}-r{rounds}-p{g['index']}-s{k}", "iteration": iteration,
                "prompt_index": g["index"], "group_id": -1, "sample_index": k,
                "prompt": prompt_text(rows[g["index"]][data.prompt_key]),
                "prompt_ids": s.get("prompt_ids", g["ids"]),
                "prompt_truncated": s.get("prompt_truncated", g["truncated"]), "response": s["text"],
                "response_ids": s["response_ids"], "engine_logprobs": s["logprobs"],
                "finish_reason": s["finish_reason"], "policy_version": version, "staleness": iteration - 1 - version,
                "metadata": json.dumps(meta, default=str),
                **{c: s.get(c) for c in EPISODE_COLUMNS},
            } for k, s in enumerate(samples)]
        if not algo.dynamic_sampling:
            kept = groups
            break
        flat = [r for g in groups for r in g["rows"]]
        scores = torch.tensor(compute_rewards(config.reward.fn, pa.Table.from_pylist(flat, schema=ROLLOUT),
                                              label_key=data.label_key))
        keep = informative_groups(scores, torch.tensor([j for j, g in enumerate(groups) for _ in g["rows"]]))
        keep = keep.view(len(groups), n)[:, 0].tolist()
        kept += [g for g, ok in zip(groups, keep) if ok]
        dropped += [g for g, ok in zip(groups, keep) if not ok]

    filled = max(0, batch - len(kept))
    if filled:
        logger().warning(
            "iteration %d: dynamic sampling found %d of %d informative prompt groups in %d rounds; filling the batch "
            "with %d groups without signal (raise algo.max_sampling_rounds to look further)",
            iteration, len(kept), batch, rounds, filled)
    out = []
    for group_id, g in enumerate(kept[:batch] + dropped[:filled]):
        for r in g["rows"]:
            out.append({**r, "group_id": group_id,
                        "sample_id": f"it{iteration}-g{group_id}-p{g['index']}-s{r['sample_index']}"})
    pool.sleep()
    lengths = [len(r["response_ids"]) for r in out]
    metrics = {
        **(episode_metrics(out, "rollout") if config.rollout.env is not None else {}),
        "rollout/response_len": float(np.mean(lengths)),
        "rollout/finish_length_frac": float(np.mean([r["finish_reason"] == "length" for r in out])),
        "rollout/prompt_truncated_frac": float(np.mean([r["prompt_truncated"] for r in out])),
        "perf/gen_tokens_per_s": sum(lengths) / max(gen_seconds, 1e-9),
        "rollout/staleness": iteration - 1 - version,
    }
    if algo.dynamic_sampling:
        metrics.update({"rollout/sampling_rounds": rounds, "rollout/groups_dropped": len(dropped),
                        "rollout/groups_filled": filled})
    return Output(pa.Table.from_pylist(out, schema=ROLLOUT), metrics,
                  {"policy_version": version, "engine_requests": requests_sent,
                   "data": {"fingerprint": fingerprint, "prompts": len(rows), "start": start, "end": position}})


generate_task = generate.task
