"""Prompt sets: good ones load in every supported layout (JSONL, JSON, Parquet, folders, globs, `datasets` folders);
bad ones fail naming the file, row or line, and the field."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.prompts import PromptFileError, read_prompts


def test_jsonl_and_parquet(tmp_path):
    rows = [{"prompt": "What is 1+2?", "answer": "3"}, {"prompt": "What is 2+2?", "answer": "4"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    assert read_prompts(str(tmp_path / "p.jsonl")) == rows
    assert read_prompts(str(tmp_path / "p.parquet")) == rows


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"prompt": "a"}\n{"prompt": "b"\n', r"line 2: invalid JSON"),
        (b'{"prompt": "a"}\n\n{"question": "b"}\n', r"line 3: missing or empty column 'prompt'"),
        (b"", r"no prompts"),
        (b'{"prompt": "caf\xe9"}\n', r"not UTF-8"),
        (b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "caf\xe9"}\n', r"line 3: not UTF-8 text \(byte 47 of the file, "
                                                                      r"byte 15 of the line: b'\\xe9'\)"),
        (b"\n  \n\n", r"no prompts"),
        (b'{"prompt": "a"}\n{"prompt": ""}\n', r"line 2: missing or empty column 'prompt'"),
        (b'{"prompt": "a"}\n{"prompt": "b",}\n', r"line 2: invalid JSON \(.* at column 16\)"),
        (b'["prompt"]\n', r"line 1: expected a JSON object"),
    ],
)
def test_bad_files_name_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(PromptFileError, match=message) as err:
        read_prompts(str(path))
    assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(PromptFileError, match="data.prompts: file not found"):
        read_prompts(str(tmp_path / "nope.jsonl"))


def test_several_files_read_in_order_and_errors_name_the_file(tmp_path):
    from storage.prompts import list_prompt_files

    (tmp_path / "b.jsonl").write_text('{"prompt": "b1"}\n{"prompt": "b2"}\n')
    pq.write_table(pa.Table.from_pylist([{"prompt": "a1"}]), tmp_path / "a.parquet")
    (tmp_path / "notes.txt").write_text("not prompts")
    files = list_prompt_files(str(tmp_path))
    assert files == [f"{tmp_path}/a.parquet", f"{tmp_path}/b.jsonl"]
    assert [r["prompt"] for r in read_prompts(files)] == ["a1", "b1", "b2"]
    (tmp_path / "c.jsonl").write_text('{"prompt": "c1"}\n{"prompt": 3}\n')
    with pytest.raises(PromptFileError, match=r"c\.jsonl line 2: column 'prompt' \(data.prompt_key\) holds int 3"):
        read_prompts(list_prompt_files(str(tmp_path)))
    with pytest.raises(PromptFileError, match="empty list"):
        read_prompts([])
    with pytest.raises(PromptFileError, match="prompt folder not found"):
        list_prompt_files(str(tmp_path / "nope"))


def test_jsonl_lines_are_split_on_newlines_only(tmp_path):
    """U+2028 inside a JSON string (json.dumps(..., ensure_ascii=False)) is not a line break; a BOM is not content."""
    rows = [{"prompt": "line\u2028separator"}, {"prompt": "next"}]
    text = "\ufeff" + "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    (tmp_path / "p.jsonl").write_bytes(text.encode())
    assert read_prompts(str(tmp_path / "p.jsonl")) == rows
    (tmp_path / "q.jsonl").write_bytes(text.encode() + b"\r\n{oops\r\n")
    with pytest.raises(PromptFileError, match=r"q\.jsonl line 3: invalid JSON"):
        read_prompts(str(tmp_path / "q.jsonl"))


def test_bad_parquet_files_name_the_file_and_column(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"question": "a", "answer": "1"}]), tmp_path / "cols.parquet")
    with pytest.raises(PromptFileError, match=r"cols\.parquet: no column 'prompt' \(data.prompt_key\); its columns "
                                              r"are question, answer"):
        read_prompts(str(tmp_path / "cols.parquet"))
    assert read_prompts(str(tmp_path / "cols.parquet"), prompt_key="question") == [{"question": "a", "answer": "1"}]
    (tmp_path / "junk.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(PromptFileError, match=r"junk\.parquet: not a readable Parquet file"):
        read_prompts(str(tmp_path / "junk.parquet"))
    pq.write_table(pa.Table.from_pylist([{"prompt": "a"}, {"prompt": None}]), tmp_path / "null.parquet")
    with pytest.raises(PromptFileError, match=r"null\.parquet row 1: missing or empty column 'prompt'"):
        read_prompts(str(tmp_path / "null.parquet"))


def test_a_folder_without_prompt_files(tmp_path):
    (tmp_path / "notes.txt").write_text("not prompts")
    with pytest.raises(PromptFileError, match=r"data.prompts: .* is a folder without \.jsonl, \.json or \.parquet "
                                              r"files, and not a Hugging Face datasets folder"):
        read_prompts(str(tmp_path))
    with pytest.raises(PromptFileError, match=r"eval.prompts: .*/\*\.parquet matches no \.jsonl, \.json or "
                                              r"\.parquet file"):
        read_prompts(str(tmp_path / "*.parquet"), field="eval.prompts")


# ---- chat-message prompts, labels, the layouts of other frameworks -------------------------------------------------

CHAT = [{"role": "system", "content": "Answer with the number only."}, {"role": "user", "content": "What is 2*3?"}]


def test_chat_message_prompts_and_nested_labels_in_parquet_and_jsonl(tmp_path):
    """verl's layout: the prompt a list of messages (system turn included), the answer in a nested struct."""
    rows = [{"data_source": "arith", "prompt": CHAT, "reward_model": {"style": "rule", "ground_truth": "6"}},
            {"data_source": "arith", "prompt": [{"role": "user", "content": "What is 2*4?"}],
             "reward_model": {"style": "rule", "ground_truth": "8"}}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("train.parquet", "train.jsonl"):
        got = read_prompts(str(tmp_path / name), label_key="reward_model.ground_truth")
        assert got == rows, name
    from storage.prompts import lookup, prompt_text

    assert [lookup(r, "reward_model.ground_truth") for r in rows] == ["6", "8"]
    assert json.loads(prompt_text(CHAT)) == CHAT and prompt_text("What is 2*3?") == "What is 2*3?"


def test_openrlhf_style_keys_and_a_json_array(tmp_path):
    rows = [{"input": "What is 2*3?", "label": "6"}, {"input": "What is 2*4?", "label": "8"}]
    (tmp_path / "train.json").write_text(json.dumps(rows, indent=2))
    assert read_prompts(str(tmp_path / "train.json"), prompt_key="input", label_key="label") == rows
    (tmp_path / "bad.json").write_text(json.dumps([rows[0], "oops"]))
    with pytest.raises(PromptFileError, match=r"bad\.json row 1: expected a JSON object per row"):
        read_prompts(str(tmp_path / "bad.json"), prompt_key="input")


WRONG_TYPES = [  # (prompt of the bad row, read_prompts keywords, the message after "FILE line|row N: ")
    (CHAT + [{"role": "user", "content": "and 2*4?"}], {"chat": False},
     r"column 'prompt' \(data.prompt_key\) holds a list of 3 messages but data.apply_chat_template is false"),
    (CHAT, {"input_template": "Q: {}"}, r"column 'prompt' \(data.prompt_key\) holds a list of 2 messages but "
                                         r"data.input_template formats string prompts only"),
    ([], {}, r"column 'prompt' \(data.prompt_key\) holds an empty list of messages"),
    (["What is 2*3?"], {}, r"column 'prompt' \(data.prompt_key\) message 0 is 'What is 2\*3\?'; expected "
                           r"\{'role': '...', 'content': '...'\}"),
    ([{"role": "user"}], {}, r"column 'prompt' \(data.prompt_key\) message 0 is \{'role': 'user'\}; expected"),
    ([{"role": "user", "content": 6}], {}, r"column 'prompt' \(data.prompt_key\) message 0 is \{'role': 'user', "
                                           r"'content': 6\}; expected"),
    ({"role": "user", "content": "x"}, {}, r"column 'prompt' \(data.prompt_key\) holds dict \{'role': 'user', "
                                           r"'content': 'x'\}; expected a string or a list of chat messages"),
    (7, {}, r"column 'prompt' \(data.prompt_key\) holds int 7; expected a string or a list of chat messages"),
    (None, {}, r"missing or empty column 'prompt' \(data.prompt_key\)"),
    ("What is 2*3?", {"label_key": "reward_model.ground_truth"},
     r"no value at 'reward_model.ground_truth' \(data.label_key\); the row's columns are prompt, "
     r"reward_model"),
]


@pytest.mark.parametrize("layout, prompt, kwargs, message",
                         # A Parquet column has one type: a string column cannot hold a list, a dict or an int (the
                         # Parquet cases of those: test_a_parquet_column_of_the_wrong_type).
                         [("jsonl", *case) for case in WRONG_TYPES]
                         + [("parquet", *case) for case in WRONG_TYPES if isinstance(case[0], (str, type(None)))])
def test_each_wrong_type_names_file_row_and_field(tmp_path, layout, prompt, kwargs, message):
    good = {"prompt": "What is 1*1?", "reward_model": {"ground_truth": "1"}}
    bad = {"prompt": prompt, "reward_model": {"other": "x"}}
    path = tmp_path / f"p.{layout}"
    if layout == "jsonl":
        path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
        where = r"p\.jsonl line 3"  # the blank line counts
    else:
        pq.write_table(pa.Table.from_pylist([good, bad]), path)
        where = r"p\.parquet row 1"
    with pytest.raises(PromptFileError, match=rf"{where}: {message}"):
        read_prompts(str(path), **kwargs)


def test_a_parquet_column_of_the_wrong_type(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"prompt": [1, 2, 3]}]), tmp_path / "ints.parquet")
    with pytest.raises(PromptFileError, match=r"ints\.parquet row 0: column 'prompt' \(data.prompt_key\) message 0 "
                                              r"is 1"):
        read_prompts(str(tmp_path / "ints.parquet"))
    pq.write_table(pa.Table.from_pylist([{"question": CHAT}]), tmp_path / "chat.parquet")
    with pytest.raises(PromptFileError, match=r"chat\.parquet row 0: column 'question' \(data.prompt_key\) holds a "
                                              r"list of 2 messages but data.apply_chat_template is false"):
        read_prompts(str(tmp_path / "chat.parquet"), prompt_key="question", chat=False)


def test_folders_and_globs_of_files(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):
        pq.write_table(pa.Table.from_pylist([{"prompt": f"p{i}-{j}"} for j in range(2)]),
                       shards / f"train-{i:05d}-of-00003.parquet")
    (shards / "README.md").write_text("a dataset card is not prompts")
    expected = [f"p{i}-{j}" for i in range(3) for j in range(2)]
    assert [r["prompt"] for r in read_prompts(str(shards))] == expected
    assert [r["prompt"] for r in read_prompts(str(shards / "train-*.parquet"))] == expected
    assert [r["prompt"] for r in read_prompts(f"file://{shards}/train-0000[12]-*.parquet")] == expected[2:]
    pq.write_table(pa.Table.from_pylist([{"prompt": 5}]), shards / "train-00003-of-00003.parquet")
    with pytest.raises(PromptFileError, match=r"shards/train-00003-of-00003\.parquet row 0: column 'prompt'"):
        read_prompts(str(shards / "*.parquet"))


def test_a_datasets_folder_written_by_save_to_disk(tmp_path):
    import datasets  # the `datasets` extra (in the dev extra)

    rows = [{"input": f"What is 2*{i}?", "label": str(2 * i)} for i in range(5)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    assert read_prompts(str(tmp_path / "one"), prompt_key="input", label_key="label") == rows
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3]),
                                   "test": datasets.Dataset.from_list(rows[3:])})
    splits.save_to_disk(str(tmp_path / "dict"))
    assert read_prompts(f"{tmp_path}/dict@test", prompt_key="input") == rows[3:]
    with pytest.raises(PromptFileError, match=rf"data.prompts: {tmp_path}/dict holds the splits test, train; name one "
                                              rf"as {tmp_path}/dict@test"):
        read_prompts(str(tmp_path / "dict"), prompt_key="input")
    with pytest.raises(PromptFileError, match=r"\(no split 'validation'\)"):
        read_prompts(f"{tmp_path}/dict@validation", prompt_key="input")
    with pytest.raises(PromptFileError, match=rf"{tmp_path}/dict@train: no column 'prompt' \(data.prompt_key\); its "
                                              r"columns are input, label"):
        read_prompts(f"{tmp_path}/dict@train")
    with pytest.raises(PromptFileError, match=rf"{tmp_path}/dict@train row 0: no value at 'answer' \(data.label_key\)"):
        read_prompts(f"{tmp_path}/dict@train", prompt_key="input", label_key="answer")


def test_a_hub_name_without_network_fails_clearly(monkeypatch):
    import datasets
    import huggingface_hub.constants

    # No network in tests: offline mode makes the client fail at once instead of retrying for ~30 s.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PromptFileError, match=r"data.prompts: ppoflow-tests/no-such-dataset@train is no file, folder "
                                              r"or glob here, and loading it as the Hugging Face hub dataset "
                                              r"'ppoflow-tests/no-such-dataset' \(split train\) failed: "
                                              r".*save_to_disk"):
        read_prompts("ppoflow-tests/no-such-dataset@train")
    # a file name with its suffix is a missing file, never a hub name
    with pytest.raises(PromptFileError, match=r"data.prompts: file not found: data/no-such-file\.jsonl"):
        read_prompts("data/no-such-file.jsonl")
