"""Read prompt files (JSONL or Parquet, any fsspec URI) into rows, with errors that name the file, line and field.

Run alone to validate prompt files:  python -m storage.prompts PROMPTS_URI [PROMPTS_URI ...]
"""

import json
import sys

import fsspec
import pyarrow.parquet as pq


class PromptFileError(ValueError):
    pass


def read_prompts(uris: str | list[str], prompt_key: str = "prompt", storage_options: dict | None = None) -> list[dict]:
    """Rows of the prompt file(s) as dicts, files in the given order; every row has a non-empty `prompt_key` string."""
    if isinstance(uris, str):
        return _read_file(uris, prompt_key, storage_options)
    if not uris:
        raise PromptFileError("data.prompts: an empty list of prompt files")
    return [row for uri in uris for row in _read_file(uri, prompt_key, storage_options)]


def list_prompt_files(folder: str, storage_options: dict | None = None) -> list[str]:
    """URIs of the *.jsonl / *.parquet files directly in `folder`, sorted by name."""
    fs, path = fsspec.core.url_to_fs(folder, **(storage_options or {}))
    if not fs.isdir(path):
        raise PromptFileError(f"prompt folder not found: {folder}")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    return [f"{folder.rstrip('/')}/{n}" for n in names if n.endswith((".jsonl", ".parquet"))]


def _read_file(uri: str, prompt_key: str, storage_options: dict | None) -> list[dict]:
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if not fs.exists(path):
        raise PromptFileError(f"data.prompts: file not found: {uri}")
    if fs.isdir(path):
        raise PromptFileError(f"data.prompts: {uri} is a folder; name a .jsonl or .parquet file (or a list of them)")
    if path.endswith(".parquet"):
        try:
            table = pq.read_table(path, filesystem=fs)
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise PromptFileError(f"{uri}: not a readable Parquet file ({err})") from None
        if prompt_key not in table.column_names:
            raise PromptFileError(f"{uri}: no column {prompt_key!r} (data.prompt_key); its columns are "
                                  f"{', '.join(table.column_names) or 'none'}")
        rows = table.to_pylist()
        where = lambda i: f"{uri} row {i}"  # noqa: E731
    else:
        rows = []
        raw = fs.cat_file(path)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            line = raw.count(b"\n", 0, err.start) + 1
            column = err.start - (raw.rfind(b"\n", 0, err.start) + 1)
            raise PromptFileError(f"{uri} line {line}: not UTF-8 text (byte {err.start} of the file, byte {column} "
                                  f"of the line: {raw[err.start:err.start + 1]!r}); save the file as UTF-8") from None
        # Split on newlines only: str.splitlines() also splits on U+2028 and friends, which JSON strings may hold.
        lines = text.removeprefix("\ufeff").split("\n")  # a byte-order mark (Windows editors) is not content
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise PromptFileError(f"{uri} line {lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise PromptFileError(f"{uri} line {lineno}: expected a JSON object per line")
            rows.append(row)
        linenos = [i for i, line in enumerate(lines, 1) if line.strip()]
        where = lambda i: f"{uri} line {linenos[i]}"  # noqa: E731
    if not rows:
        raise PromptFileError(f"{uri}: no prompts in the file")
    for i, row in enumerate(rows):
        value = row.get(prompt_key)
        if not isinstance(value, str) or not value:
            raise PromptFileError(f"{where(i)}: missing or empty column {prompt_key!r} (data.prompt_key)")
    return rows


if __name__ == "__main__":
    rows = read_prompts(sys.argv[1:])
    print(f"{len(rows)} prompts; first: {rows[0]}")
