"""Read prompt sets into rows, with errors that name the file, row (or line) and field.

A prompt set (`data.prompts`, `eval.prompts`; a list of them is read in order as one set) is any of:
  - a JSONL file (one JSON object per line; `.json` may also hold one array of objects),
  - a Parquet file,
  - a folder of `.parquet` / `.jsonl` / `.json` files (read in name order), or a glob of such files
    (`data/train-*.parquet`),
  - a Hugging Face `datasets` folder written by `save_to_disk`: a Dataset, or a DatasetDict with `@split` appended
    (`data/gsm8k@train`; a DatasetDict of one split needs none),
  - a Hugging Face hub dataset name, `owner/name` or `owner/name@split`, where the network allows (datasets caches
    it; offline, the error says so),
each local or behind any fsspec URI (`s3://bucket/prompts.parquet`, `hf://datasets/owner/name/data/*.parquet`).

Every row is a dict. Its prompt column (data.prompt_key) holds a non-empty string, or a non-empty list of chat
messages `[{"role": ..., "content": ...}, ...]` (system turns included, as verl stores them); a list needs the chat
template (data.apply_chat_template). With data.label_key the row must hold the reference answer at that dotted
path (`reward_model.ground_truth`). The row's other columns reach the reward function as metadata.

Run alone to validate prompt sets:  python -m storage.prompts PROMPTS_URI [PROMPTS_URI ...]
"""

import json
import re
import sys

import fsspec
import pyarrow.parquet as pq


class PromptFileError(ValueError):
    pass


PROMPT_SUFFIXES = (".jsonl", ".json", ".parquet")
"""Files a folder or a glob of prompt files contributes."""

_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def read_prompts(uris: str | list[str], prompt_key: str = "prompt", storage_options: dict | None = None, *,
                 label_key: str | None = None, chat: bool = True, input_template: str | None = None,
                 field: str = "data.prompts") -> list[dict]:
    """Rows of the prompt set(s) as dicts, sources in the given order, each checked: its `prompt_key` holds a
    non-empty string or list of chat messages (a list only when `chat`, the chat template, is on, and only strings
    when an `input_template` is set), and `label_key`, when given, a value. `field` names the config field in errors.
    """
    if isinstance(uris, str):
        uris = [uris]
    elif not uris:
        raise PromptFileError(f"{field}: an empty list of prompt files")
    out = []
    for uri in uris:
        for name, rows, where in _load(uri, storage_options, field):
            if not rows:
                raise PromptFileError(f"{name}: no prompts in the file")
            if not any(prompt_key in row for row in rows):
                columns = list(dict.fromkeys(k for row in rows[:100] for k in row))
                raise PromptFileError(f"{name}: no column {prompt_key!r} (data.prompt_key); its columns are "
                                      f"{', '.join(columns) or 'none'}")
            for i, row in enumerate(rows):
                _check_row(row, where(i), prompt_key, label_key, chat, input_template)
            out += rows
    return out


def source_stamp(uris: str | list[str], storage_options: dict | None = None) -> tuple | None:
    """(uri, size, modification time) of every source when each is one plain file, else None (a folder, a glob, a
    hub name, a file whose store reports no time): what a reader may key a cache of the rows by, since a file
    rewritten in place changes its size or its time. None means: read the sources again."""
    stamps = []
    for uri in [uris] if isinstance(uris, str) else uris:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        if any(c in path for c in "*?["):
            return None
        try:
            info = fs.info(path)
        except (FileNotFoundError, OSError):
            return None
        mtime = info.get("mtime", info.get("LastModified", info.get("last_modified")))
        if info.get("type") != "file" or mtime is None:
            return None
        stamps.append((uri, info.get("size"), str(mtime)))
    return tuple(stamps)


def list_prompt_files(folder: str, storage_options: dict | None = None) -> list[str]:
    """URIs of the *.jsonl / *.parquet files directly in `folder`, sorted by name."""
    fs, path = fsspec.core.url_to_fs(folder, **(storage_options or {}))
    if not fs.isdir(path):
        raise PromptFileError(f"prompt folder not found: {folder}")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    return [f"{folder.rstrip('/')}/{n}" for n in names if n.endswith((".jsonl", ".parquet"))]


MISSING = object()


def lookup(row: dict, dotted: str):
    """The value at a dotted path of nested dicts (`reward_model.ground_truth`), or MISSING."""
    node = row
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


def prompt_text(prompt: str | list[dict]) -> str:
    """How a prompt is stored in the rollout and eval tables (a string column) and handed to the reward function: a
    string as it is, a list of chat messages as its JSON text (`json.loads` gives the messages back)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)


def _check_row(row: dict, where: str, prompt_key: str, label_key: str | None, chat: bool,
               input_template: str | None) -> None:
    value = row.get(prompt_key)
    column = f"column {prompt_key!r} (data.prompt_key)"
    if isinstance(value, list):
        if not value:
            raise PromptFileError(f"{where}: {column} holds an empty list of messages")
        for j, message in enumerate(value):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise PromptFileError(f"{where}: {column} message {j} is {_short(message)}; expected "
                                      "{'role': '...', 'content': '...'} with string values")
        if not chat:
            raise PromptFileError(
                f"{where}: {column} holds a list of {len(value)} messages but data.apply_chat_template is false; "
                "a conversation becomes model input only through the tokenizer's chat template: set "
                "data.apply_chat_template: true, or store the prompt as a string")
        if input_template is not None:
            raise PromptFileError(
                f"{where}: {column} holds a list of {len(value)} messages but data.input_template formats string "
                "prompts only; drop data.input_template (the chat template renders the messages) or store the "
                "prompt as a string")
    elif value is None or value == "":
        raise PromptFileError(f"{where}: missing or empty {column}")
    elif not isinstance(value, str):
        raise PromptFileError(f"{where}: {column} holds {type(value).__name__} {_short(value)}; expected a string or "
                              "a list of chat messages [{'role': ..., 'content': ...}, ...]")
    if label_key is not None and lookup(row, label_key) in (MISSING, None):
        raise PromptFileError(f"{where}: no value at {label_key!r} (data.label_key); the row's columns are "
                              f"{', '.join(row) or 'none'}")


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---- sources ---------------------------------------------------------------------------------------------------

def _load(uri: str, storage_options: dict | None, field: str) -> list[tuple]:
    """[(name, rows, where)] of one source: `where(i)` locates row i in errors."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if any(c in path for c in "*?["):
        files = sorted(p for p in fs.glob(path) if p.endswith(PROMPT_SUFFIXES))
        if not files:
            raise PromptFileError(f"{field}: {uri} matches no .jsonl, .json or .parquet file")
        return [_load_file(fs, p, _unstrip(uri, fs, p)) for p in files]
    if fs.isdir(path):
        if _is_datasets_folder(fs, path):
            return [_load_datasets(uri, storage_options, split=None, field=field)]
        files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(PROMPT_SUFFIXES))
        if not files:
            raise PromptFileError(f"{field}: {uri} is a folder without .jsonl, .json or .parquet files, and not a "
                                  "Hugging Face datasets folder (save_to_disk); name a file, a glob or such a folder")
        return [_load_file(fs, p, _unstrip(uri, fs, p)) for p in files]
    if fs.exists(path):
        return [_load_file(fs, path, uri)]
    base, at, split = uri.rpartition("@")
    if at and split and "/" not in split:
        fs_base, path_base = fsspec.core.url_to_fs(base, **(storage_options or {}))
        if fs_base.isdir(path_base) and _is_datasets_folder(fs_base, path_base):
            return [_load_datasets(base, storage_options, split=split, field=field)]
    name = base if at and split else uri
    # Like OpenRLHF's --prompt_data: a name that is nothing local may be a hub dataset (a typo of a file name with
    # its suffix is not tried; without network the hub client retries for ~30 s unless HF_HUB_OFFLINE=1).
    if ("://" not in uri and not uri.startswith((".", "/", "~")) and _HUB_NAME.fullmatch(name)
            and not name.endswith(PROMPT_SUFFIXES)):
        return [_load_hub(name, split if at else None, uri, field)]
    raise PromptFileError(f"{field}: file not found: {uri}")


def _unstrip(uri: str, fs, path: str) -> str:
    """The URI of `path` as the user would write it (a local path stays a path, a remote one keeps its scheme)."""
    return path if "://" not in uri else fs.unstrip_protocol(path)


def _load_file(fs, path: str, uri: str) -> tuple:
    if path.endswith(".parquet"):
        try:
            rows = pq.read_table(path, filesystem=fs).to_pylist()
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise PromptFileError(f"{uri}: not a readable Parquet file ({err})") from None
        return uri, rows, lambda i: f"{uri} row {i}"
    raw = fs.cat_file(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1)
        raise PromptFileError(f"{uri} line {line}: not UTF-8 text (byte {err.start} of the file, byte {column} "
                              f"of the line: {raw[err.start:err.start + 1]!r}); save the file as UTF-8") from None
    text = text.removeprefix("\ufeff")  # a byte-order mark (Windows editors) is not content
    if path.endswith(".json") and text.lstrip().startswith("["):  # one JSON array of rows
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise PromptFileError(f"{uri} line {err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
        if bad is not None:
            raise PromptFileError(f"{uri} row {bad}: expected a JSON object per row")
        return uri, rows, lambda i: f"{uri} row {i}"
    rows, linenos = [], []
    # Split on newlines only: str.splitlines() also splits on U+2028 and friends, which JSON strings may hold.
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptFileError(f"{uri} line {lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise PromptFileError(f"{uri} line {lineno}: expected a JSON object per line")
        rows.append(row)
        linenos.append(lineno)
    return uri, rows, lambda i: f"{uri} line {linenos[i]}"


def _is_datasets_folder(fs, path: str) -> bool:
    return any(fs.exists(f"{path.rstrip('/')}/{name}") for name in ("dataset_dict.json", "state.json"))


def _datasets():
    try:
        import datasets
    except ImportError:
        raise PromptFileError("reading a Hugging Face datasets folder or hub dataset needs the `datasets` package: "
                              'pip install -e ".[datasets]"') from None
    return datasets


def _pick_split(loaded, split: str | None, uri: str, field: str):
    """The Dataset of `loaded` (a Dataset, or a DatasetDict and the split asked for)."""
    if not hasattr(loaded, "keys"):  # a Dataset
        if split is not None:
            raise PromptFileError(f"{field}: {uri} holds one Dataset, not splits; drop @{split}")
        return loaded
    splits = sorted(loaded.keys())
    if split is None and len(splits) == 1:
        split = splits[0]
    if split not in loaded:
        raise PromptFileError(f"{field}: {uri} holds the splits {', '.join(splits)}; name one as "
                              f"{uri}@{splits[0]}" + (f" (no split {split!r})" if split is not None else ""))
    return loaded[split]


def _load_datasets(uri: str, storage_options: dict | None, split: str | None, field: str) -> tuple:
    datasets = _datasets()
    try:
        loaded = datasets.load_from_disk(uri, storage_options=storage_options or None)
    except (OSError, ValueError) as err:  # FileNotFoundError, a folder from another datasets version, ...
        raise PromptFileError(f"{field}: {uri}: not a readable Hugging Face datasets folder ({err})") from None
    name = f"{uri}@{split}" if split else uri
    rows = _pick_split(loaded, split, uri, field).to_list()
    return name, rows, lambda i: f"{name} row {i}"


def _load_hub(name: str, split: str | None, uri: str, field: str) -> tuple:
    datasets = _datasets()
    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as err:  # no network (offline, a firewall), no such dataset, an auth wall: all end the same
        raise PromptFileError(
            f"{field}: {uri} is no file, folder or glob here, and loading it as the Hugging Face hub dataset "
            f"{name!r}{f' (split {split})' if split else ''} failed: {type(err).__name__}: {err}. Without network "
            "access, download it elsewhere (datasets.load_dataset(...).save_to_disk(DIR)) and point to DIR") from None
    return uri, _pick_split(loaded, None, uri, field).to_list(), lambda i: f"{uri} row {i}"


if __name__ == "__main__":
    rows = read_prompts(sys.argv[1:])
    print(f"{len(rows)} prompts; first: {rows[0]}")
