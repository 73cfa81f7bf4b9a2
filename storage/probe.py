"""Is a storage root the same filesystem on every machine? A probe file written on one, read back on the others.

A run on a Ray cluster of several nodes writes its folder from the driver and from the workers on every node
(checkpoints, weight exports), so a local path is a valid storage root there only when every node mounts the same
filesystem at that path. `SharedProbe` writes a random token in a scratch folder of its own under the root
(`{root}/.ppoflow-probe-{hex}/probe`: nothing a run owns, so no stored file can be overwritten), `seen_here()` runs on
each node (stages/setup.py:check_cluster_storage sends it there in a Ray task) and `remove()` deletes the folder.

Run alone to probe a root from this machine only (writes, reads back, removes):
    python -m storage.probe /mnt/shared/ppoflow
"""

import secrets
import sys

import fsspec


def is_local(root: str, storage_options: dict | None = None) -> bool:
    """Whether `root` is a path on the local filesystem of whichever machine opens it (a plain path or file://)."""
    fs, _ = fsspec.core.url_to_fs(root, **(storage_options or {}))
    return "file" in fs.protocol


class SharedProbe:
    """A token in a scratch folder of the storage root. Picklable: send it to other machines and ask `seen_here()`."""

    def __init__(self, root: str, storage_options: dict | None = None):
        self.options = dict(storage_options or {})
        fs, path = fsspec.core.url_to_fs(root, **self.options)
        # The absolute path: a relative root would resolve against each process's working directory.
        self.folder = f"{path.rstrip('/')}/.ppoflow-probe-{secrets.token_hex(6)}"
        self.protocol = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
        self.token = secrets.token_hex(16).encode()
        fs.makedirs(self.folder, exist_ok=False)
        fs.pipe_file(f"{self.folder}/probe", self.token)

    def seen_here(self) -> bool:
        """True when this machine reads the token at the same path (the same filesystem as the writer's)."""
        fs = fsspec.filesystem(self.protocol, **self.options)
        try:
            return fs.cat_file(f"{self.folder}/probe") == self.token
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return False

    def remove(self) -> None:
        fs = fsspec.filesystem(self.protocol, **self.options)
        try:
            fs.rm(self.folder, recursive=True)
        except FileNotFoundError:
            pass


if __name__ == "__main__":
    probe = SharedProbe(sys.argv[1])
    try:
        print(f"{probe.folder}/probe: local {is_local(sys.argv[1])}, read back here {probe.seen_here()}")
    finally:
        probe.remove()
