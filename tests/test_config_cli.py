"""`ppoflow config show` and `ppoflow config schema`: the resolved config with each field's description and the source
of its value; the JSON schema with a description for every field."""

import json
import re
from pathlib import Path

import yaml

from ppoflow.cli import main
from stages.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def _fields(model_cls, prefix=""):
    """Dotted path of every leaf field of a config model (sections expanded)."""
    from pydantic import BaseModel

    for name, field in model_cls.model_fields.items():
        section = next((t for t in (field.annotation, *getattr(field.annotation, "__args__", ()))
                        if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if section is not None:
            yield from _fields(section, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def test_show_gives_every_field_its_value_description_and_source(capsys):
    sets = ["algo.gamma=0.99", "reward.model={path: my-rm, weight: 0.5}", 'storage.storage_options={anon: false}']
    assert main(["config", "show", "--config", QUICKSTART, *(a for s in sets for a in ("--set", s))]) == 0
    out = capsys.readouterr().out
    # The output is a config file: loading it gives the same config.
    assert load_config(base=yaml.safe_load(out)) == load_config(QUICKSTART, sets)

    lines = out.splitlines()
    sources, path = {}, []
    for i, line in enumerate(lines):
        m = re.fullmatch(r"( *)([a-z_]+):(?: (.*?)  # (default|file|override))?", line)
        if not m:
            continue
        depth = len(m.group(1)) // 2
        path[depth:] = [m.group(2)]
        assert lines[i - 1].lstrip().startswith("# "), f"no description above {'.'.join(path)}"
        if m.group(4):
            sources[".".join(path)] = m.group(4)
    # every leaf field of the quickstart's config (reward.remote, policy.lora and retrain.gate are null: one line for
    # the section)
    unset = ("reward.remote", "policy.lora", "retrain.gate")
    expected = {f for f in _fields(RunConfig) if not f.startswith(tuple(f"{u}." for u in unset))} | set(unset)
    assert set(sources) == expected
    assert sources["seed"] == "file" and sources["iterations"] == "file" and sources["run_id"] == "default"
    assert sources["algo.gamma"] == "override" and sources["algo.lam"] == "file"
    assert sources["algo.clip_eps"] == "default"
    assert sources["reward.model.path"] == sources["reward.model.weight"] == "override"
    assert sources["reward.model.micro_batch_size"] == "default" and sources["reward.fn"] == "file"
    assert sources["storage.storage_options"] == "override" and sources["storage.keep_checkpoints"] == "file"


def test_show_names_a_bad_field(capsys):
    assert main(["config", "show", "--config", QUICKSTART, "--set", "algo.gama=1"]) == 2
    assert "algo.gama: unknown key" in capsys.readouterr().err


def test_schema_describes_every_field(tmp_path, capsys):
    assert main(["config", "schema", "--out", str(tmp_path / "schema.json")]) == 0
    schema = json.loads((tmp_path / "schema.json").read_text())
    assert schema == RunConfig.model_json_schema()
    undescribed = [f"{name}.{prop}" for name, d in [("RunConfig", schema), *schema["$defs"].items()]
                   for prop, p in d.get("properties", {}).items() if not p.get("description")]
    assert undescribed == []
