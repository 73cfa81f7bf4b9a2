"""Prompt files: good ones load; bad ones fail naming the file, line and column."""

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
    with pytest.raises(PromptFileError, match=r"c\.jsonl line 2: missing or empty column"):
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


def test_a_folder_given_as_a_prompt_file(tmp_path):
    with pytest.raises(PromptFileError, match=r"data.prompts: .* is a folder"):
        read_prompts(str(tmp_path))
