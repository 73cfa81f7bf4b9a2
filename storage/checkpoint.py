"""Local folders for checkpoint files that live under any fsspec URI.

DeepSpeed and `save_pretrained` write to local paths. For a local run root the checkpoint folder is used directly;
for a remote one (s3://, memory://, ...) files are written to a temporary folder and uploaded when the block ends
(and downloaded before a load). Commit is the caller's business: the update stage's marker lists the files.

Run alone to download a checkpoint:  python -m storage.checkpoint CHECKPOINT_URI LOCAL_DIR
"""

import contextlib
import shutil
import sys
import tempfile
from collections.abc import Iterator

import fsspec


@contextlib.contextmanager
def local_dir_for_write(uri: str, storage_options: dict | None = None) -> Iterator[str]:
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if "file" in fs.protocol:
        fs.makedirs(path, exist_ok=True)
        yield path
        return
    tmp = tempfile.mkdtemp(prefix="ppoflow-ckpt-")
    try:
        yield tmp
        fs.put(tmp + "/", path, recursive=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def local_dir_for_read(uri: str, storage_options: dict | None = None) -> Iterator[str]:
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if "file" in fs.protocol:
        yield path
        return
    tmp = tempfile.mkdtemp(prefix="ppoflow-ckpt-")
    try:
        fs.get(path.rstrip("/") + "/", tmp, recursive=True)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    with local_dir_for_read(sys.argv[1]) as src:
        shutil.copytree(src, sys.argv[2], dirs_exist_ok=True)
