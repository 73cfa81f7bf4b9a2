"""Retraining lineages: chains of runs, each warm-started from the lineage's promoted policy and trained on the prompt
files that arrived since the previous run started; a promotion gate decides which runs serve.

Layout: `{root}/lineages/{name}/`, one record per run of the lineage, run ids `{name}-0001`, `-0002`, ...

    {run_id}.json
      lineage        name of the lineage
      run_id         the run `{root}/{run_id}`
      parent         run id of the run whose policy this one starts from (the lineage's promoted run when it was
                     planned); None for the first, or while no run is promoted (it starts from the base model)
      prompt_files   the prompt file URIs this run trains on: consumed from the moment the record exists, so no file is
                     trained on twice (a crashed run is resumed, not replaced) and none is skipped (a rejected run's
                     files stay consumed)
      init_policy    model folder the policy started from (the parent's final policy; the base model for the first)
      status         "started" until the run finished its iterations, then "complete"
      final_policy   HF folder of the run's last policy, full weights that `from_pretrained` loads (set with status
                     "complete"; a LoRA run's merged export)
      final_adapter  a LoRA run's adapter folder (PEFT: load it on the base model), else None
      promotion      None until decided, then "promoted" or "rejected" (the gate's verdict; "promoted" without a gate)
      gate           the gate's comparison: metric, candidate and promoted scores, the promoted run, delta, min_delta
    _SERVING.json    the serving pointer: the promoted run, its weights (HF folder), adapter and base model, its score
                     and when it was promoted; moved only by a promotion

Run alone to show a lineage:  python -m storage.lineage ROOT NAME   (or `ppoflow lineage show NAME --root ROOT`)
"""

import json
import sys

import fsspec

from storage.run import now_iso, write_json

SERVING = "_SERVING.json"


class LineageStore:
    def __init__(self, root: str, name: str, storage_options: dict | None = None):
        self.name = name
        self.uri = f"{root.rstrip('/')}/lineages/{name}"
        self.fs, self.path = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))

    def records(self) -> list[dict]:
        """Every run of the lineage, oldest first."""
        try:
            paths = sorted(p for p in self.fs.ls(self.path, detail=False)
                           if p.endswith(".json") and not p.rsplit("/", 1)[-1].startswith("_"))
        except FileNotFoundError:
            return []
        return [json.loads(self.fs.cat_file(p)) for p in paths]

    def promoted(self) -> dict | None:
        """The record of the lineage's promoted run (the latest promotion), or None: the base model serves. A record
        written before the gate existed counts as promoted once complete, as every finished run then was."""
        return next((r for r in reversed(self.records())
                     if r.get("promotion", "promoted" if r["status"] == "complete" else None) == "promoted"), None)

    def next_run_id(self) -> str:
        return f"{self.name}-{len(self.records()) + 1:04d}"

    def write(self, record: dict) -> None:
        """Create or update a run's record (whole-file replace)."""
        self.fs.makedirs(self.path, exist_ok=True)
        write_json(self.fs, f"{self.path}/{record['run_id']}.json", {**record, "updated_at": now_iso()})

    def serving(self) -> dict | None:
        """The serving pointer, or None before the first promotion."""
        try:
            return json.loads(self.fs.cat_file(f"{self.path}/{SERVING}"))
        except FileNotFoundError:
            return None

    def promote(self, record: dict, base_model: str, score: float | None) -> dict:
        """Move the serving pointer to `record`'s run (written after its record says `promoted`)."""
        pointer = {"lineage": self.name, "run_id": record["run_id"], "weights": record["final_policy"],
                   "adapter": record.get("final_adapter"), "base_model": base_model, "score": score,
                   "promoted_at": now_iso()}
        self.fs.makedirs(self.path, exist_ok=True)
        write_json(self.fs, f"{self.path}/{SERVING}", pointer)
        return pointer


if __name__ == "__main__":
    for r in LineageStore(sys.argv[1], sys.argv[2]).records():
        print(f"{r['run_id']}  {r['status']:<9} {r.get('promotion') or '-':<9} parent={r['parent']}  "
              f"files={len(r['prompt_files'])}  init={r['init_policy']}")
