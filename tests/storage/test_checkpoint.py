"""Checkpoint folders round-trip through local and remote (memory://) storage."""

from pathlib import Path

import fsspec

from storage.checkpoint import local_dir_for_read, local_dir_for_write


def test_remote_checkpoint_roundtrip(tmp_path):
    uri = f"memory://ckpt-{tmp_path.name}/iter-000001/policy"
    with local_dir_for_write(uri) as d:
        (Path(d) / "state").mkdir()
        (Path(d) / "state" / "model.pt").write_bytes(b"weights")
        (Path(d) / "meta.json").write_text("{}")
    fs, path = fsspec.core.url_to_fs(uri)
    assert fs.cat_file(f"{path}/state/model.pt") == b"weights"
    with local_dir_for_read(uri) as d:
        assert (Path(d) / "state" / "model.pt").read_bytes() == b"weights"
        assert (Path(d) / "meta.json").read_text() == "{}"


def test_local_checkpoint_is_written_in_place(tmp_path):
    with local_dir_for_write(str(tmp_path / "c")) as d:
        assert Path(d) == tmp_path / "c"
        (Path(d) / "x").write_text("1")
    with local_dir_for_read(str(tmp_path / "c")) as d:
        assert (Path(d) / "x").read_text() == "1"
