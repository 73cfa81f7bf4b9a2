"""Read a prompt file (JSONL or Parquet, any fsspec URI) into rows, with errors that name the file, line and field.

Run alone to validate a prompt file:  python -m storage.prompts PROMPTS_URI [PROMPT_KEY]
"""

import json
import sys

import fsspec
import pyarrow.parquet as pq


class PromptFileError(ValueError):
    pass


def read_prompts(uri: str, prompt_key: str = "prompt", storage_options: dict | None = None) -> list[dict]:
    """Rows of the prompt file as dicts; every row has a non-empty string under `prompt_key`."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if not fs.exists(path):
        raise PromptFileError(f"data.prompts: file not found: {uri}")
    if path.endswith(".parquet"):
        rows = pq.read_table(path, filesystem=fs).to_pylist()
        where = lambda i: f"{uri} row {i}"  # noqa: E731
    else:
        rows = []
        raw = fs.cat_file(path)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise PromptFileError(f"{uri}: not UTF-8 text (byte {err.start}); save the file as UTF-8") from None
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise PromptFileError(f"{uri} line {lineno}: invalid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise PromptFileError(f"{uri} line {lineno}: expected a JSON object per line")
            rows.append(row)
        linenos = [i for i, line in enumerate(text.splitlines(), 1) if line.strip()]
        where = lambda i: f"{uri} line {linenos[i]}"  # noqa: E731
    if not rows:
        raise PromptFileError(f"{uri}: no prompts in the file")
    for i, row in enumerate(rows):
        value = row.get(prompt_key)
        if not isinstance(value, str) or not value:
            raise PromptFileError(f"{where(i)}: missing or empty column {prompt_key!r} (data.prompt_key)")
    return rows


if __name__ == "__main__":
    rows = read_prompts(sys.argv[1], *(sys.argv[2:3]))
    print(f"{len(rows)} prompts; first: {rows[0]}")
