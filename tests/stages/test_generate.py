"""Prompt order is a pure function of (seed, data position); the position continues from the previous iteration's
marker unless the prompt set changed; prompts are encoded with the chat template."""

from stages.generate import data_start, encode_prompt, prompt_order


def test_each_pass_is_a_permutation_and_slices_are_reproducible():
    n, per = 10, 4
    order = [i for it in range(5) for i in prompt_order(n, it * per, per, seed=3, shuffle=True)]
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:20]) == list(range(10))
    assert order[:10] != order[10:20]  # a new shuffle per pass
    assert prompt_order(n, 4, per, seed=3, shuffle=True) == order[4:8]
    assert prompt_order(n, 6, 12, seed=3, shuffle=True) == order[6:18]  # any slice, across passes
    assert prompt_order(n, 4, per, seed=4, shuffle=True) != order[4:8]
    assert prompt_order(n, 8, per, seed=0, shuffle=False) == [8, 9, 0, 1]


def test_data_position_continues_from_the_previous_marker_and_resets_on_a_new_prompt_set():
    previous = {"data": {"fingerprint": "aaa", "start": 16, "end": 48}}  # dynamic sampling read 3 batches
    assert data_start(None, "aaa", 1, 16) == 0
    assert data_start(previous, "aaa", 3, 16) == 48
    assert data_start(previous, "bbb", 3, 16) == 0  # rows added or changed: start the new set from its beginning
    assert data_start({"seconds": 1.0}, "aaa", 3, 16) == 32  # marker written before positions were recorded


def test_encode_prompt_applies_template_and_truncates_from_the_left(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids, truncated = encode_prompt(tok, "What is 1+2?", chat=True, max_tokens=128)
    text = tok.decode(ids)
    assert not truncated and "What is 1+2?" in text and text.rstrip().endswith("assistant")
    short, truncated = encode_prompt(tok, "What is 1+2?", chat=True, max_tokens=5)
    assert truncated and short == ids[-5:]


def test_chat_message_prompts_and_the_input_template(tiny_model_dir):
    """A message list (system turn included) is rendered by the chat template as it is; input_template formats a
    string prompt before the template wraps it (and is all there is without the template)."""
    import pytest
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    chat = [{"role": "system", "content": "Answer with the number only."},
            {"role": "user", "content": "What is 1+2?", "name": None}]  # Parquet structs give absent keys as None
    ids, _ = encode_prompt(tok, chat, chat=True, max_tokens=128)
    assert ids == tok(tok.apply_chat_template([chat[0], {"role": "user", "content": "What is 1+2?"}], tokenize=False,
                                              add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    assert "Answer with the number only." in tok.decode(ids)
    templated, _ = encode_prompt(tok, "1+2", chat=True, max_tokens=128, input_template="What is {}?")
    assert templated == encode_prompt(tok, "What is 1+2?", chat=True, max_tokens=128)[0]
    plain, _ = encode_prompt(tok, "1+2", chat=False, max_tokens=128, input_template="Q: {}\nA:")
    assert tok.decode(plain) == "Q: 1+2\nA:"
    with pytest.raises(ValueError, match="data.apply_chat_template"):
        encode_prompt(tok, chat, chat=False, max_tokens=128)


def test_prompt_set_is_read_once_until_its_file_changes(tmp_path):
    """The generate stage reads its prompt set through a per-process cache: the same rows while the file stays as it
    is, the file again (rows and fingerprint) once it is rewritten, even to the same size; a glob is read every time
    (it has no stamp)."""
    import json
    import os

    from stages.config import load_config
    from stages.generate import prompt_set

    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is 2*{i}?", "answer": str(2 * i)}) + "\n" for i in range(5)))
    config = load_config("configs/quickstart.yaml", [f"data.prompts={path}", "eval.prompts=null"])
    rows, fingerprint = prompt_set(config)
    again, same = prompt_set(config)
    assert again is rows and same == fingerprint and [r["answer"] for r in rows] == ["0", "2", "4", "6", "8"]

    path.write_text(path.read_text().replace("2*4?", "2*5?"))  # same size: only the modification time tells
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    changed, new_fingerprint = prompt_set(config)
    assert changed is not rows and changed[4]["prompt"] == "What is 2*5?" and new_fingerprint != fingerprint

    globbed = load_config("configs/quickstart.yaml", [f"data.prompts={tmp_path}/*.jsonl", "eval.prompts=null"])
    first, _ = prompt_set(globbed)
    assert prompt_set(globbed)[0] is not first and prompt_set(globbed)[1] == new_fingerprint
