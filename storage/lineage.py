"""Retraining lineages: chains of runs, each warm-started from its parent's final policy and trained on the prompt
files that arrived since the parent started.

Layout: `{root}/lineages/{name}/{run_id}.json`, one record per run of the lineage, run ids `{name}-0001`, `-0002`, ...

    lineage        name of the lineage
    run_id         the run `{root}/{run_id}`
    parent         run id of the previous run of the lineage; None for the first
    prompt_files   the prompt file URIs this run trains on: consumed from the moment the record exists, so no file is
                   trained on twice (a crashed run is resumed, not replaced) and none is skipped
    init_policy    model folder the policy started from (the parent's final HF export; the base model for the first)
    status         "started" until the run finished its iterations, then "complete"
    final_policy   HF export of the run's last policy (set with status "complete")

Run alone to show a lineage:  python -m storage.lineage ROOT NAME
"""

import json
import sys

import fsspec

from storage.run import now_iso, write_json


class LineageStore:
    def __init__(self, root: str, name: str, storage_options: dict | None = None):
        self.name = name
        self.uri = f"{root.rstrip('/')}/lineages/{name}"
        self.fs, self.path = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))

    def records(self) -> list[dict]:
        """Every run of the lineage, oldest first."""
        try:
            paths = sorted(p for p in self.fs.ls(self.path, detail=False) if p.endswith(".json"))
        except FileNotFoundError:
            return []
        return [json.loads(self.fs.cat_file(p)) for p in paths]

    def next_run_id(self) -> str:
        return f"{self.name}-{len(self.records()) + 1:04d}"

    def write(self, record: dict) -> None:
        """Create or update a run's record (whole-file replace)."""
        self.fs.makedirs(self.path, exist_ok=True)
        write_json(self.fs, f"{self.path}/{record['run_id']}.json", {**record, "updated_at": now_iso()})


if __name__ == "__main__":
    for r in LineageStore(sys.argv[1], sys.argv[2]).records():
        print(f"{r['run_id']}  {r['status']:<9} parent={r['parent']}  files={len(r['prompt_files'])}  "
              f"init={r['init_policy']}")
