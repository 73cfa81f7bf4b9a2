"""The run configuration: one pydantic model composed of each component's config, loaded from YAML.

The same model is the YAML schema, the Prefect flow parameter (Prefect validates it and draws its form from it) and
what the run manifest stores. Unknown keys and invalid values fail here, before any worker starts, naming the field
path (`algo.gamma: ...`).

Run alone to validate a config and print it resolved:
    python -m stages.config configs/quickstart.yaml --set algo.gamma=0.99
"""

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from algorithms.config import AlgoConfig
from algorithms.registry import ESTIMATORS
from storage.config import CREDENTIAL_OPTIONS, CheckpointConfig, StorageConfig
from workers.config import GenerationConfig, ModelConfig, PolicyConfig, RayConfig, RolloutConfig, TrainerConfig


class ConfigError(ValueError):
    """A config that cannot run; the message names every offending field path."""


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    prompts: str | list[str]
    """The training prompts, one per row: a JSONL or Parquet file (local or any fsspec URI), a folder or a glob of
    such files, a Hugging Face `datasets` folder written by `save_to_disk` (`DIR@split` for a DatasetDict), or a
    hub dataset name (`owner/name@split`, where the network allows); or a list of these read in order as one
    prompt set (what retraining passes: the files that arrived since the previous run). storage/prompts.py reads
    them."""

    prompt_key: str = "prompt"
    """Column holding the prompt: a string (the user's message), or a list of chat messages
    `[{"role": ..., "content": ...}, ...]`, system turns included (verl's format; needs apply_chat_template). The
    rollout table stores a string prompt as it is and a message list as its JSON text. The row's other columns
    reach the reward function as metadata (OpenRLHF's `--input_key`, verl's `data.prompt_key`)."""

    label_key: str | None = None
    """Column of the reference answer, handed to the reward function as its `labels` argument (see reward.fn); a
    dotted path reaches into nested columns (`reward_model.ground_truth`, verl's format). Every row must hold one.
    None: no labels (the reward function can still read any column from its metadata)."""

    input_template: str | None = None
    """Format string with one `{}` that wraps each string prompt before the chat template, e.g. "Question: {}
    Answer briefly." (OpenRLHF's `--input_template`, which OpenRLHF applies only without the chat template). Refused for
    prompts that are message lists. None: the prompt as it is."""

    prompts_per_iteration: int = Field(16, ge=1)
    """Prompts drawn per PPO iteration (the batch holds prompts_per_iteration × n_samples_per_prompt samples)."""

    max_prompt_tokens: int = Field(128, ge=1)
    """Templated prompts longer than this are handled per `overlong_prompts`."""

    overlong_prompts: Literal["truncate", "reject"] = "truncate"
    """`truncate`: an over-long prompt keeps its last max_prompt_tokens tokens (the generation prompt survives), the
    sample is flagged `prompt_truncated` and `rollout/prompt_truncated_frac` counts them. `reject`: the run refuses
    to start when any prompt of data.prompts or eval.prompts is over the limit, naming the first one."""

    apply_chat_template: bool = True
    """Render each prompt with the tokenizer's chat template (with the generation prompt): a string as one user
    turn, a message list as it is. False feeds a string prompt as plain text (OpenRLHF's default) and refuses
    message lists."""

    shuffle: bool = True
    """Shuffle prompts once per pass over the file (seeded by the run seed and the pass number)."""

    @field_validator("input_template")
    @classmethod
    def _one_placeholder(cls, v: str | None) -> str | None:
        if v is None:
            return v
        import string

        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
        except ValueError:  # a lone { or }
            fields = None
        ok = fields == [""]
        if not ok:
            raise ValueError(f"expected a format string with exactly one {{}} for the prompt (write {{{{ and }}}} for "
                             f"literal braces), got {v!r}")
        return v


class RewardModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    path: str
    """HF model id or local folder of a reward model that `AutoModelForSequenceClassification.from_pretrained` loads
    with one label (`num_labels: 1`), with its tokenizer; its score of the last non-pad token is the reward."""

    weight: float = Field(1.0, allow_inf_nan=False)
    """This source's weight in the combined reward (reward = Σ weight × source reward)."""

    dtype: Literal["float32", "bfloat16"] | None = None
    """Compute dtype of the reward model; None uses model.dtype."""

    micro_batch_size: int = Field(8, ge=1)
    """Samples per forward pass."""

    apply_chat_template: bool = True
    """Score the conversation [user: prompt, assistant: response] rendered with the reward model's chat template
    (what HF reward models are trained on); false, or a tokenizer without a template, scores prompt + response as
    plain text."""

    num_cpus: float = Field(0.5, gt=0.0)
    """Ray CPUs reserved for the reward-model actor (`{run}:reward`)."""

    num_gpus: float = Field(0.0, ge=0.0)
    """Ray GPUs reserved for the actor (it runs on cuda when it has one); 0 on CPU hosts; fractions share a GPU."""

    num_threads: int = Field(2, ge=1)
    """torch intra-op threads in the actor."""


class RemoteRewardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    url: str
    """HTTP(S) endpoint, POSTed JSON `{"prompts": [...], "responses": [...], "metadata": [...]}` (metadata: each
    prompt row's other columns), answering `{"rewards": [...]}` with one number per sample, in order. No credentials
    in it (user:password@ or a token in the query): the config is stored and logged; see `token_env`."""

    weight: float = Field(1.0, allow_inf_nan=False)
    """This source's weight in the combined reward (reward = Σ weight × source reward)."""

    batch_size: int = Field(64, ge=1)
    """Samples per request at most; a batch is sent as ceil(samples / batch_size) requests."""

    concurrency: int = Field(4, ge=1)
    """Requests in flight at once (results keep the samples' order whatever order they come back in)."""

    timeout_s: float = Field(60.0, gt=0.0)
    """Seconds to wait for the server (connecting, then each read) before the attempt counts as failed."""

    retries: int = Field(3, ge=0)
    """Further attempts of a request after a connection error, a timeout, HTTP 5xx or 429. Other 4xx answers fail
    at once with the server's message (the request itself is wrong)."""

    backoff_s: float = Field(1.0, ge=0.0)
    """Wait before retry k (1-based): backoff_s × 2^(k-1), or the server's Retry-After when it sends one (capped at
    60 s)."""

    token_env: str | None = None
    """Name of the environment variable (in the driver) holding a token, sent as `Authorization: Bearer <token>`.
    The variable's name, never the token: the config is stored in run.json, logged to the trackers and shown as a
    Prefect flow parameter. None sends no Authorization header."""

    @field_validator("url")
    @classmethod
    def _http_without_credentials(cls, v: str) -> str:
        from urllib.parse import parse_qsl, urlsplit

        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL, got {v!r}")
        secret_keys = sorted(k for k, _ in parse_qsl(parts.query)
                             if k.lower() in CREDENTIAL_OPTIONS | {"api_key", "apikey", "access_token", "auth"})
        if parts.username or parts.password or secret_keys:
            where = "user:password@" if parts.username or parts.password else f"query {', '.join(secret_keys)}"
            raise ValueError(f"the URL carries credentials ({where}), and the config is stored in the run's run.json, "
                             "sent to the trackers and shown as a Prefect flow parameter; put the token in an "
                             "environment variable and name it in reward.remote.token_env")
        return v

    @field_validator("token_env")
    @classmethod
    def _variable_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
            # Not a name: most likely the token itself, which must not be stored; the message does not repeat it.
            raise ValueError("expected the NAME of an environment variable (letters, digits, _), not a token: set "
                             "the token in the environment, e.g. REWARD_API_TOKEN, and give that name here")
        return v


class RewardConfig(BaseModel):
    """The reward of a sample: Σ weight × reward of each configured source — a rule function, a reward model, a
    remote endpoint (at least one). A config that names none of them keeps the rule `fn` with weight 1."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    fn: str | None = "ppoflow.tasks.arith:reward"
    """Rule reward `module:function`, called on the whole batch as fn(prompts, responses, metadata) -> list[float]:
    `prompts` as the rollout table stores them (a message list as its JSON text), `metadata` each prompt row's other
    columns. A function that also takes labels — a parameter named `labels` (or **kwargs), or a 4th positional
    parameter — gets them: fn(prompts, responses, metadata, labels), `labels` the value at data.label_key of each
    sample's prompt row, or None when data.label_key is unset; the signature decides (inspect.signature), so
    three-argument functions keep working. The default applies only while `model` and `remote` are unset: with
    either of them and no `fn` given there is no rule reward (write `fn` to combine one with them). null: no rule
    reward."""

    fn_weight: float = Field(1.0, allow_inf_nan=False)
    """Weight of the rule reward in the combined reward."""

    model: RewardModelConfig | None = None
    """A reward model, scored in its own Ray actor (`{run}:reward`) while the trainers score the rollout. None: off."""

    remote: RemoteRewardConfig | None = None
    """A remote reward endpoint over HTTP, called from the driver while the trainers score the rollout. None: off."""

    @field_validator("fn")
    @classmethod
    def _module_function(cls, v: str | None) -> str | None:
        if v is None:
            return v
        module, _, fn = v.partition(":")
        if not module or not fn:
            raise ValueError(f"expected 'package.module:function', got {v!r}")
        return v

    @model_validator(mode="after")
    def _some_source(self) -> "RewardConfig":
        if "fn" not in self.model_fields_set and (self.model is not None or self.remote is not None):
            self.fn = None  # the quickstart's arith rule is a default, not something to add to a reward model
        if self.fn is None and self.model is None and self.remote is None:
            raise ValueError("no reward source: set reward.fn (a rule function), reward.model (a reward "
                             "model) or reward.remote (an HTTP endpoint), or several of them with weights")
        return self


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    prompts: str | list[str] | None = None
    """Held-out prompts (JSONL/Parquet, same columns as data.prompts); None turns evaluation off."""

    every: int = Field(1, ge=1)
    """Evaluate after every k-th iteration (and always after the last one and before the first)."""

    max_prompts: int | None = Field(None, ge=1)
    """Evaluate on the first max_prompts rows only; None uses them all."""

    n_samples: int = Field(1, ge=1)
    """Responses per prompt."""

    temperature: float = Field(0.0, ge=0.0)
    """0 is greedy decoding (deterministic, the usual pass@1); above 0 samples with seeded streams."""

    pass_threshold: float = 1.0
    """A response passes when its reward is at least this; `eval/pass_rate` is the passing fraction."""


class TrackingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    logger: Literal["tensorboard", "wandb", "mlflow", "none"] = "tensorboard"
    """Where each iteration's metrics go. `tensorboard`: event files (`tensorboard --logdir {storage.root}`).
    `mlflow`: an MLflow run in `project` (a local SQLite store unless `mlflow_tracking_uri` names a server).
    `wandb`: a W&B run in `project` (offline unless `wandb_mode: online`). `none`: nothing is written.
    Credentials come from the environment only (WANDB_API_KEY, MLFLOW_TRACKING_TOKEN, ...), never from this config.
    Operational: a resumed run may change anything in this section."""

    project: str = "ppoflow"
    """MLflow experiment / W&B project the run is logged under; the run itself is named after its run id."""

    dir: str | None = None
    """Local folder the file-based trackers write in: TensorBoard events in `{dir}/{run_id}/tensorboard`, W&B runs in
    `{dir}/{run_id}/wandb`, the default MLflow store in `{dir}/mlflow.db` (one store for all runs, so the MLflow UI
    compares them). None: a local storage root (`{storage.root}`, so the events sit inside the run folder, and
    runs of the old layout keep `{storage.root}/runs`); with a non-local root (s3://...) `./tracking` in the
    driver's working directory, since these trackers write to a local disk — copy that folder or use an MLflow
    server / W&B online."""

    mlflow_tracking_uri: str | None = None
    """MLflow tracking URI (`http://host:5000`, `sqlite:///path/mlflow.db`, `databricks`). None:
    `sqlite:///{dir}/mlflow.db`, which works offline (MLflow 3 refuses a plain `./mlruns` folder store unless
    MLFLOW_ALLOW_FILE_STORE=true)."""

    wandb_mode: Literal["offline", "online"] = "offline"
    """`offline` writes the run under `dir` without network (upload later with `wandb sync DIR`); `online` needs
    WANDB_API_KEY in the environment (and WANDB_ENTITY to pick a team)."""

    @field_validator("dir")
    @classmethod
    def _local(cls, v: str | None) -> str | None:
        if v is not None and "://" in v:
            raise ValueError(f"must be a local folder (TensorBoard, SQLite and W&B offline write to a local disk), "
                             f"got {v!r}")
        return v


class GateConfig(BaseModel):
    """The promotion gate of a retraining lineage (flows/retrain.py, stages/gate.py): after a run of the lineage
    trains, its final policy (the candidate) and the lineage's promoted policy (the base model before any promotion)
    answer the same held-out prompts with the same seeds; the candidate is promoted only when its score beats the
    promoted one's by at least `min_delta`. A rejected run is kept and marked so, and the next trigger starts again
    from the promoted policy."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    eval_prompts: str | list[str]
    """Held-out prompts (the layouts of data.prompts, same columns and labels) that both policies answer; none of them
    should be in the lineage's training files."""

    metric: Literal["pass_rate", "reward_mean"] = "pass_rate"
    """`pass_rate`: the fraction of answers whose reward is at least `pass_threshold`; `reward_mean`: their mean
    reward."""

    min_delta: float = Field(0.0, allow_inf_nan=False)
    """Promote when candidate score − promoted score ≥ min_delta. 0 promotes a tie (newer data, no worse); a positive
    value demands a measurable gain; a small negative one tolerates evaluation noise."""

    n_samples: int = Field(1, ge=1)
    """Answers per prompt (above 1 needs temperature > 0)."""

    temperature: float = Field(0.0, ge=0.0)
    """Sampling temperature of the answers; 0 is greedy."""

    max_prompts: int | None = Field(None, ge=1)
    """Use the first max_prompts rows of eval_prompts only; None uses them all."""

    reward_fn: str | None = None
    """Rule reward `module:function` that scores the answers (reward.fn's contract); None: reward.fn. Set it when a
    run's training reward is not the yardstick of the lineage."""

    pass_threshold: float = 1.0
    """An answer passes when its reward is at least this (metric pass_rate)."""

    @model_validator(mode="after")
    def _cross_field_rules(self) -> "GateConfig":
        if self.n_samples > 1 and self.temperature == 0:
            raise ValueError(f"n_samples: {self.n_samples} greedy answers per prompt would be copies of one; set "
                             "temperature > 0 or n_samples: 1")
        return self


class RetrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    gate: GateConfig | None = None
    """Evaluate each retrained candidate against the lineage's promoted policy and promote it only if it wins (see
    GateConfig); None promotes every run that finishes."""


class FlowConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    retries: int = Field(1, ge=0)
    """Prefect retries of each stage task; a retry resumes from what the stage committed."""

    retry_delay_s: float = Field(2.0, ge=0.0)
    """Seconds between retries."""

    iteration_subflows: bool = True
    """Run each iteration as a subflow run (`iteration-N`: its own state, duration and logs in the UI), or inline in
    the training flow run (false: its tasks are still named `generate-N`, `score-N`, ...). A subflow costs a few
    Prefect API calls per iteration: nothing against a GPU iteration of minutes, a visible share of a CPU iteration of
    seconds (bench/RESULTS.md, "Orchestration overhead")."""


OPERATIONAL_FIELDS = ("run_id", "iterations", "ray", "flow", "eval", "tracking", "checkpoint", "retrain")
"""Fields a resumed run may change: they don't change what the run computes."""


class RunConfig(BaseModel):
    """Everything a run needs. Sections mirror the components that own them."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    run_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Run name: the run lives in `{storage.root}/{run_id}`; the same id resumes the run. None generates one."""

    seed: int = 0
    """Seed of data order, sampling and training."""

    iterations: int = Field(3, ge=1)
    """PPO iterations of the run in total (a resumed run continues to this number)."""

    model: ModelConfig
    """The starting policy and, optionally, separate reference and critic initialisations."""

    data: DataConfig
    """Training prompts: where they are, which columns hold the prompt and the label, how they become model input."""

    generation: GenerationConfig = GenerationConfig()
    """Rollout sampling and the generation engines (vLLM or HF) that do it."""

    rollout: RolloutConfig = RolloutConfig()
    """Multi-turn episodes with an environment (tools, ...); off by default: one response per sample."""

    policy: PolicyConfig = PolicyConfig()
    """The policy's DeepSpeed trainer (its ranks, optimizer, batch sizes, an optional LoRA adapter); the reference
    model shares its resources."""

    critic: TrainerConfig = TrainerConfig()
    """The critic's DeepSpeed trainer; used by `algo.estimator: gae` only."""

    algo: AlgoConfig = AlgoConfig()
    """The RL algorithm: advantage estimator, KL penalty, policy-loss variants (algorithms/config.py)."""

    reward: RewardConfig = RewardConfig()
    """How a sample is scored: a rule function, a reward model, a remote endpoint, or a weighted sum of them."""

    storage: StorageConfig = StorageConfig()
    """Where runs are stored (any fsspec URI) and how much of them is kept."""

    checkpoint: CheckpointConfig = CheckpointConfig()
    """How often the trainers' state is written, and whether in the background; a resumed run may change it."""

    ray: RayConfig = RayConfig()
    """The Ray cluster (a local one, or one to join) and where each group of actors goes on it."""

    flow: FlowConfig = FlowConfig()
    """Prefect orchestration: retries of the stage tasks, subflows per iteration."""

    eval: EvalConfig = EvalConfig()
    """Held-out evaluation before training and every few iterations; off without eval.prompts."""

    tracking: TrackingConfig = TrackingConfig()
    """Experiment tracker of each iteration's metrics (TensorBoard, MLflow, W&B or none)."""

    retrain: RetrainConfig = RetrainConfig()
    """Scheduled retraining of a lineage (flows/retrain.py): the promotion gate; a training run itself ignores it."""

    @model_validator(mode="after")
    def _cross_field_rules(self) -> "RunConfig":
        errors = []
        n = self.generation.n_samples_per_prompt
        if ESTIMATORS[self.algo.estimator].needs_groups and n < 2:
            errors.append(
                f"generation.n_samples_per_prompt: algo.estimator={self.algo.estimator!r} normalises rewards "
                f"within each prompt's samples and needs at least 2 samples per prompt (got {n})"
            )
        if self.algo.dynamic_sampling and n < 2:
            errors.append(f"generation.n_samples_per_prompt: algo.dynamic_sampling keeps prompt groups whose samples "
                          f"disagree, so it needs at least 2 samples per prompt (got {n})")
        if self.data.max_prompt_tokens + self.generation.max_new_tokens > self.generation.max_model_len:
            errors.append(
                "generation.max_model_len: must hold data.max_prompt_tokens + generation.max_new_tokens "
                f"({self.data.max_prompt_tokens} + {self.generation.max_new_tokens} > {self.generation.max_model_len})"
            )
        if self.rollout.env is not None and (
                self.data.max_prompt_tokens + self.rollout.max_total_tokens > self.generation.max_model_len):
            errors.append(
                "generation.max_model_len: with rollout.env it must hold data.max_prompt_tokens + "
                f"rollout.max_total_tokens ({self.data.max_prompt_tokens} + {self.rollout.max_total_tokens} > "
                f"{self.generation.max_model_len})")
        if self.algo.overlong_buffer is not None and self.algo.overlong_buffer > self.generation.max_new_tokens:
            errors.append(f"algo.overlong_buffer: must not exceed generation.max_new_tokens "
                          f"({self.algo.overlong_buffer} > {self.generation.max_new_tokens})")
        if (stale := self.algo.max_staleness) > 0:
            # The engines sample iteration n+S while the trainers work on n: both must own their resources.
            if self.generation.placement == "hybrid":
                errors.append(f"algo.max_staleness: {stale} overlaps generation with training, but "
                              "generation.placement: hybrid makes the engines and the trainers take turns on the "
                              "same GPU; set generation.placement: standard (engines and trainers on resources of "
                              "their own) or algo.max_staleness: 0")
            if self.generation.enable_sleep_mode:
                errors.append(f"algo.max_staleness: {stale} keeps the engines sampling while the trainers work, "
                              "but generation.enable_sleep_mode frees the engines' GPU memory for the trainers "
                              "between samplings; set generation.enable_sleep_mode: false or algo.max_staleness: 0")
        if (lora := self.policy.lora) is not None:
            path, ref = self.model.path, self.model.ref_path
            if lora.init_adapter is None and ref not in (None, path):
                errors.append(f"model.ref_path: with policy.lora the reference is the policy's base model with the "
                              f"adapter disabled, so model.ref_path must be unset or model.path ({path}), got {ref}; "
                              "to start from a trained adapter set policy.lora.init_adapter")
            if lora.init_adapter is not None and ref in (None, path):
                errors.append("model.ref_path: policy.lora.init_adapter needs model.ref_path, the base model the "
                              "adapter sits on, and model.path, that base with the adapter merged (what the engines "
                              "start from), e.g. a run's checkpoints/iter-N/merged")
        batch = self.data.prompts_per_iteration * n
        for name in (["policy", "critic"] if self.uses_critic else ["policy"]):
            t: TrainerConfig = getattr(self, name)
            if batch % t.mini_batch_size or t.mini_batch_size % (t.micro_batch_size * t.num_ranks):
                ranks = f" x {name}.num_ranks ({t.num_ranks})" if t.num_ranks > 1 else ""
                errors.append(
                    f"{name}.mini_batch_size: samples per iteration ({batch}) must be a multiple of "
                    f"{name}.mini_batch_size ({t.mini_batch_size}), itself a multiple of "
                    f"{name}.micro_batch_size ({t.micro_batch_size}){ranks}, so that every rank accumulates the "
                    "same whole number of micro-batches per optimizer step"
                )
        if errors:
            raise ValueError("\n".join(errors))
        return self

    @property
    def uses_critic(self) -> bool:
        """Whether the estimator learns a value function (registry metadata: only `gae` among the built-ins)."""
        return ESTIMATORS[self.algo.estimator].needs_critic

    def resume_fingerprint(self) -> dict:
        """The settings a resumed run must share with its start: all but operational ones (iteration count,
        Ray address, retries), so a run can be extended or moved to another cluster without changing its results."""
        data = self.model_dump(mode="json")
        for key in OPERATIONAL_FIELDS:
            data.pop(key)
        return data

    def config_hash(self) -> str:
        text = json.dumps(self.resume_fingerprint(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _section(loc: tuple) -> type[BaseModel] | None:
    """The config model at a validation error's location (None when it is a field, not a section)."""
    model: type[BaseModel] = RunConfig
    for part in loc:
        field = model.model_fields.get(str(part)) if isinstance(model, type) else None
        annotation = field.annotation if field is not None else None
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        model = next((a for a in candidates if issubclass(a, BaseModel)), None)
        if model is None:
            return None
    return model


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see configs/quickstart.yaml for the fields)"
        section = _section(e["loc"]) if e["type"] == "value_error" else None
        if section is None:
            lines.append(f"  {path}: {msg}" if path else f"  {msg}")
            continue
        # A section's cross-field rules (model validators): one message per line, each starting with the name of
        # the field it is about, which becomes the field's full path.
        for line in msg.split("\n"):
            field, sep, rest = line.partition(": ")
            lines.append(f"  {path}.{field}: {rest}" if path and sep and field in section.model_fields
                         else f"  {path}: {line}" if path else f"  {line}")
    return "invalid config:\n" + "\n".join(lines)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict; returns a new dict."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def validate_config(data: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def load_config(path: str | None = None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    """YAML file (or `base` dict) + dotted overrides → a validated RunConfig, or ConfigError naming the fields."""
    data = dict(base or {})
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping of sections at the top level")
        data.update(loaded)
    return validate_config(apply_overrides(data, list(overrides)))


if __name__ == "__main__":
    args = sys.argv[1:]
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    try:
        print(yaml.safe_dump(load_config(args[0], sets).model_dump(mode="json"), sort_keys=False))
    except ConfigError as err:
        sys.exit(str(err))
