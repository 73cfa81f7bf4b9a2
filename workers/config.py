"""Settings of the long-lived workers: models, the generation engine, the DeepSpeed trainers and Ray."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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

    num_gpus: float = Field(0.0, ge=0.0)
    """Ray GPUs reserved for each engine actor; 0 on CPU hosts. A fraction (e.g. 0.25) shares one GPU with the
    trainers' actors (hybrid placement)."""


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


class RayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str | None = None
    """Existing Ray cluster to join ("auto", "ray://host:10001"); None starts a local one."""

    num_cpus: int | None = None
    """CPUs of the local cluster; None uses every core."""

    namespace: str = "ppoflow"
    """Ray namespace of the named worker actors."""
