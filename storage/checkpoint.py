"""Local folders for checkpoint files that live under any fsspec URI, and the markers that say a part is written.

DeepSpeed and `save_pretrained` write to local paths. For a local run root the checkpoint folder is used directly;
for a remote one (s3://, memory://, ...) files are written to a temporary folder and uploaded when the writer is done
(and downloaded before a load). A checkpoint is written in parts (each rank of each trainer group, the HF export),
possibly by a background thread; each part, once its files are whole, writes `_PART-{part}.json` listing them. The
run's storage (storage/run.py) trusts a checkpoint once its update is committed and every part it names is there.

Run alone to download a checkpoint:  python -m storage.checkpoint CHECKPOINT_URI LOCAL_DIR
"""

import contextlib
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator

import fsspec

def staging_dir(uri: str, storage_options: dict | None = None) -> tuple[str, Callable[[], None]]:
    """A local folder to write the files of `uri` into, and `publish()`, which puts them in place once they are
    whole: the folder itself for a local root (publish does nothing), a temporary one uploaded by publish for a
    remote root. For writers that finish later than they start (a background thread)."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if "file" in fs.protocol:
        fs.makedirs(path, exist_ok=True)
        return path, lambda: None
    tmp = tempfile.mkdtemp(prefix="ppoflow-ckpt-")

    def publish() -> None:
        try:
            fs.put(tmp + "/", path, recursive=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    return tmp, publish


@contextlib.contextmanager
def local_dir_for_write(uri: str, storage_options: dict | None = None) -> Iterator[str]:
    path, publish = staging_dir(uri, storage_options)
    yield path
    publish()


def write_part(checkpoint_uri: str, part: str, files: dict[str, int], storage_options: dict | None = None,
               **fields) -> None:
    """Declare part `part` of a checkpoint whole: `{checkpoint}/_PART-{part}.json` lists its files (path relative
    to the checkpoint folder → bytes), written after them, atomically (storage/run.py write_json)."""
    from storage.run import PART_MARKER, write_json

    fs, path = fsspec.core.url_to_fs(checkpoint_uri, **(storage_options or {}))
    fs.makedirs(path, exist_ok=True)
    write_json(fs, f"{path}/{PART_MARKER.format(part=part)}", {"part": part, "files": files, **fields})


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
