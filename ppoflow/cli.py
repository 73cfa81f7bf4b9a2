"""The `ppoflow` command.

    ppoflow train --config configs/quickstart.yaml [--set algo.gamma=0.99 ...] [--run-id RUN] [--verbose]
    ppoflow config show [--config F] [--set key=value ...]   every field: value, description, default|file|override
    ppoflow config schema [--out FILE]                        the run config's JSON schema
    ppoflow make-tiny-model models/tiny [--sft-steps N] [--tools]
    ppoflow make-prompts data/arith [--n-train N --n-eval N] [--task calc]
    ppoflow runs list [--root ROOT]
    ppoflow runs show RUN [--root ROOT]
    ppoflow rollouts RUN --iter N [--k 5] [--order best|worst|random|all] [--root ROOT]
    ppoflow lineage show NAME [--root ROOT]                   a retraining lineage: runs, gate scores, what serves

`train` with the id of an existing run resumes it from storage (committed stages are not redone); it prints a header,
one line per iteration and a summary, the workers' output going to `{run}/logs/` (ppoflow/console.py). `runs` and
`rollouts` read what runs committed to storage (ppoflow/runs.py).
"""

import argparse
import os
import sys
import time


def _env_defaults() -> None:
    # Before Prefect is imported: its analytics ping fails offline and clutters logs with "database is locked".
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary API server Prefect starts when no server is configured gets 20 s by default; on a busy 2-core
    # machine that is not always enough, and a run should not fail before it starts.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cmd_train(args) -> int:
    if not args.verbose:
        # Before Prefect is imported: its console handler, writing into driver.log, would add colour codes.
        os.environ.setdefault("PREFECT_LOGGING_COLORS", "false")
    from stages.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.set + ([f"run_id={args.run_id}"] if args.run_id else []))
    except ConfigError as err:
        print(f"ppoflow: {err}", file=sys.stderr)
        return 2

    from stages.score import LogprobGateError, RewardError
    from stages.setup import RunSetupError, new_run_id, preflight
    from storage.lock import RunLocked
    from storage.prompts import PromptFileError
    from storage.run import RunStore, find_run

    refused = (RunSetupError, RewardError, LogprobGateError, PromptFileError, RunLocked)
    try:
        # open_run checks again, but here a bad input fails in a second: before Prefect's server starts, with
        # nothing written.
        preflight(config)
    except refused as err:
        print(f"ppoflow: {err}", file=sys.stderr)
        return 2
    if config.run_id is None:  # named here, so the console knows which run to watch
        config = config.model_copy(update={"run_id": new_run_id()})
    uri, legacy = find_run(config.storage.root, config.run_id, config.storage.storage_options)
    store = RunStore(uri, config.storage.storage_options)
    committed = (None if store.read_manifest() is None
                 else sum(store.stage_marker(n, "sync") is not None for n in range(1, config.iterations + 1)))

    from ppoflow.console import RunConsole, header
    from ppoflow.progress import RunProgress

    started = time.perf_counter()
    with RunConsole(config, uri, verbose=args.verbose) as console:
        console.print(*header(config, config.run_id, uri, console.log_dir, committed, legacy, args.verbose))
        from flows.ppo import ppo_train

        try:
            with RunProgress(uri, config.iterations, config.storage.storage_options, stream=console.out,
                             report=console.poll):
                ppo_train(config=config)
        except refused as err:
            print(f"ppoflow: {err}", file=console.err)
            return 2
        except KeyboardInterrupt:
            print(f"ppoflow: interrupted; what was committed stays: resume with --run-id {config.run_id}",
                  file=console.err)
            return 130
        except Exception as err:  # a stage that failed past its retries, an actor that died: say where to look
            print(*console.failure(err), sep="\n", file=console.err)
            return 1
        console.print(*console.summary(time.perf_counter() - started))
    return 0


def cmd_make_tiny_model(args) -> int:
    from ppoflow.tiny_model import make_tiny_model

    make_tiny_model(args.out_dir, seed=args.seed, sft_steps=args.sft_steps, tools=args.tools)
    return 0


def cmd_make_prompts(args) -> int:
    if args.task == "calc":
        from ppoflow.tasks.calc import write_prompts
    else:
        from ppoflow.tasks.arith import write_prompts

    print(write_prompts(args.out_dir, n_train=args.n_train, n_eval=args.n_eval, seed=args.seed))
    return 0


def _described(model_cls, values: dict, sources: dict, prefix: str = "", indent: str = "") -> list[str]:
    """`values` (a section of the resolved config) as YAML: each field's description as comments above it and where
    its value came from (`sources`: dotted path -> default | file | override) after it."""
    import json
    import textwrap

    import yaml
    from pydantic import BaseModel

    def scalar(value) -> str:
        plain = isinstance(value, str) and value and not any(c in value for c in "#:{}[]")
        if plain and yaml.safe_load(value) == value:
            return value
        return json.dumps(value, ensure_ascii=False)

    lines = []
    for name, field in model_cls.model_fields.items():
        path, value = f"{prefix}{name}", values[name]
        lines += textwrap.wrap(" ".join((field.description or "").split()), 116 - len(indent),
                               initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# ")
        section = next((t for t in (field.annotation, *getattr(field.annotation, "__args__", ()))
                        if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if section is not None and isinstance(value, dict):
            lines.append(f"{indent}{name}:")
            lines += _described(section, value, sources, f"{path}.", indent + "  ")
        else:
            lines.append(f"{indent}{name}: {scalar(value)}  # {sources.get(path, 'default')}")
        if not indent:
            lines.append("")
    return lines


def _sources(file_data: dict, overrides: list[str], config: dict) -> dict:
    """Dotted path of every field of `config` -> where its value came from: `override` (a --set of it, of a key
    inside it, or of a section value that holds it), `file` (in the YAML, not replaced by a --set), else `default`."""
    import yaml

    from stages.config import apply_overrides

    def leaves(value, prefix: str) -> set:
        if isinstance(value, dict):
            return {prefix}.union(*(leaves(v, f"{prefix}.{k}") for k, v in value.items()))
        return {prefix}

    overridden = set()
    for item in overrides:
        key, _, raw = item.partition("=")
        overridden |= leaves(yaml.safe_load(raw), key)
    merged = apply_overrides(file_data, overrides)
    out = {}

    def walk(node: dict, given, prefix: str) -> None:
        for k, v in node.items():
            path = f"{prefix}{k}"
            inner = given.get(k) if isinstance(given, dict) else None
            if isinstance(v, dict) and v and not path.endswith(("storage_options", "resources")):
                walk(v, inner, f"{path}.")
            elif any(s == path or s.startswith(f"{path}.") for s in overridden):
                out[path] = "override"
            elif isinstance(given, dict) and k in given:
                out[path] = "file"

    walk(config, merged, "")
    return out


def cmd_config(args) -> int:
    import json

    from stages.config import ConfigError, RunConfig, load_config

    if args.config_command == "schema":
        text = json.dumps(RunConfig.model_json_schema(), indent=2) + "\n"
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                f.write(text)
            print(f"wrote {args.out}")
        else:
            sys.stdout.write(text)
        return 0
    import yaml

    try:
        config = load_config(args.config, args.set)
        file_data = yaml.safe_load(open(args.config, encoding="utf-8")) if args.config else {}
    except ConfigError as err:
        print(f"ppoflow: {err}", file=sys.stderr)
        return 2
    values = config.model_dump(mode="json")
    sources = _sources(file_data or {}, args.set, values)
    origin = " + ".join(filter(None, [args.config, f"{len(args.set)} override(s)" if args.set else ""])) or "defaults"
    print(f"# ppoflow run config, resolved from {origin}. Each field: what it means (above it) and where its value")
    print("# came from (after it: default | file | override). This output is itself a valid config file.\n")
    print("\n".join(_described(RunConfig, values, sources)).rstrip())
    return 0


def cmd_inspect(args) -> int:
    from ppoflow import runs

    try:
        if args.command == "lineage":
            return runs.show_lineage(args.name, root=args.root)
        if args.command == "rollouts":
            return runs.show_rollouts(args.run, args.iter, k=args.k, order=args.order, seed=args.seed, root=args.root)
        if args.runs_command == "show":
            return runs.show_run(args.run, root=args.root)
        return runs.list_runs(root=args.root)
    except runs.RunNotFound as err:
        print(f"ppoflow: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    _env_defaults()
    parser = argparse.ArgumentParser(prog="ppoflow", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train or resume a run")
    p.add_argument("--config", required=True, help="YAML run config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable")
    p.add_argument("--run-id", help="run to resume (or name of a new run)")
    p.add_argument("--verbose", action="store_true",
                   help="print what the engines, trainers, Ray and Prefect print (else only in {run}/logs/)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("make-tiny-model", help="build a small Qwen2 + tokenizer locally (HF format)")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sft-steps", type=int, default=None, help="SFT steps on the quickstart task (0: random init)")
    p.add_argument("--tools", action="store_true", help="the tool-use model: SFT on 4-digit multiplication with some "
                                                        "calc-tool episodes (ppoflow/tasks/calc.py)")
    p.set_defaults(fn=cmd_make_tiny_model)

    p = sub.add_parser("make-prompts", help="write the quickstart task's train.jsonl and eval.jsonl")
    p.add_argument("out_dir")
    p.add_argument("--task", choices=["arith", "calc"], default="arith",
                   help="arith: doubling (the quickstart); calc: 4-digit multiplication (the tool-use task)")
    p.add_argument("--n-train", type=int, default=2048)
    p.add_argument("--n-eval", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_make_prompts)

    p = sub.add_parser("config", help="show a resolved config with every field's description, or the JSON schema")
    config_sub = p.add_subparsers(dest="config_command", required=True)
    q = config_sub.add_parser("show", help="the resolved config: each field's value, description and source")
    q.add_argument("--config", help="YAML run config")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable")
    q.set_defaults(fn=cmd_config)
    q = config_sub.add_parser("schema", help="the JSON schema of the run config (what Prefect's form shows)")
    q.add_argument("--out", help="file to write (default: stdout)")
    q.set_defaults(fn=cmd_config)

    root_help = "storage root of the runs (storage.root of their config; default: runs)"
    p = sub.add_parser("runs", help="list runs, or show one run's iterations and reward/KL curves")
    runs_sub = p.add_subparsers(dest="runs_command", required=True)
    q = runs_sub.add_parser("list", help="one row per run: created, estimator, iterations, last reward, state")
    q.add_argument("--root", help=root_help)
    q.set_defaults(fn=cmd_inspect)
    q = runs_sub.add_parser("show", help="iteration table; writes {run}/plots/curves.png")
    q.add_argument("run", help="run id")
    q.add_argument("--root", help=root_help)
    q.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("rollouts", help="sample prompts, responses, rewards and advantages of one iteration")
    p.add_argument("run", help="run id")
    p.add_argument("--iter", type=int, required=True, metavar="N", help="iteration (1-based)")
    p.add_argument("--k", type=int, default=5, help="samples to show (ignored with --order all)")
    p.add_argument("--order", choices=["best", "worst", "random", "all"], default="random",
                   help="highest or lowest reward first, a seeded random pick, or every sample in stored order")
    p.add_argument("--seed", type=int, default=0, help="seed of --order random")
    p.add_argument("--root", help=root_help)
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("lineage", help="a retraining lineage: its runs, the promotion gate's scores, what serves")
    lineage_sub = p.add_subparsers(dest="lineage_command", required=True)
    q = lineage_sub.add_parser("show", help="runs, gate scores and verdicts, the promoted run and its weights")
    q.add_argument("name", help="lineage name")
    q.add_argument("--root", help=root_help)
    q.set_defaults(fn=cmd_inspect)

    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
