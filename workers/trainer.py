"""DeepSpeed trainer ranks (policy, critic) and the frozen reference model, as Ray actor classes.

Each class is a plain class; `workers.cluster` wraps it with `ray.remote` and names it, so the actors live for the
whole run and every PPO iteration reuses them. Data arrives as Arrow tables with the columns of storage.schema
(per-token lists over response tokens); results go back as plain lists.

Devices: an actor that Ray gives a GPU (`num_gpus` > 0, a fraction under hybrid placement) sees it as cuda:0 and
keeps its model there (DeepSpeed places the trainers' models, the reference moves itself); every batch tensor is
built on the CPU and moved to the model's device in one copy, and results come back as Python lists. Checkpoints and
weight exports are CPU tensors / files whatever the device. Without a GPU everything stays on the CPU.

Every trainer knows which policy version its in-memory state is (`state_version`) and whether an update started
since (`dirty`). A stage that needs version v calls `ensure_version(v, checkpoint_uri)`, which reloads the committed
checkpoint when the memory state is anything else — so a retried or resumed update never trains on top of a half
update.

LoRA (`policy.lora`): the policy is the base model wrapped by PEFT, only the adapter trains (the optimizer holds the
trainable parameters only), and the policy is its own reference (`logprobs(adapter=False)`: no ReferenceWorker is
started). Checkpoints exclude the frozen base weights; the engines' weights and the merged export are W + (α/r)·BA,
computed apart from the model (`_engine_tensors`), never merged in place.

Model groups: N actors of one class (ranks 0..N-1, one process each, same constructor arguments but `rank`) meet at
rank 0's `master_addr`/`master_port` and train one data-parallel model. Every method of a trainer is collective: call
it on every rank of the group with the same arguments (the full table), concurrently, and wait for all. Results are
the same on every rank (train metrics, logprobs, values), except the weight exports, which only rank 0 returns.

Run alone (smoke test on a local HF model folder):  python -m workers.trainer MODEL_DIR
"""

import gc
import math
import os
import random
import sys
import time

import numpy as np

from algorithms.config import AlgoConfig
from workers.cluster import RunActor, free_port
from workers.config import TrainerConfig


def lr_factor(step: int, warmup_steps: int, schedule: str, decay_steps: int | None, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based; the factor the step trains with).

        warmup   s < W:      (s + 1) / W                    linear; the first step already trains, step W-1 is at peak
        constant s >= W:     1
        cosine   s >= W:     r + (1 - r)·½(1 + cos(π·min(s - W, D)/D))      from 1 down to r over D steps, then r

    W = lr_warmup_steps, D = lr_decay_steps (counted after the warmup), r = min_lr_ratio (Loshchilov & Hutter 2017,
    "SGDR", without restarts; the shape of HF's `cosine_with_min_lr`)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(step - warmup_steps, decay_steps) / decay_steps
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _rng_state() -> dict:
    """Every random stream a rank may draw from (dropout: torch; user code: numpy, random)."""
    import torch

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _local_rank(rank: int) -> int:
    """Device index of `rank` in this process. Ray shows a GPU actor only the GPU(s) it was given
    (CUDA_VISIBLE_DEVICES), so a rank with one GPU always finds it at cuda:0, whatever its global rank; on CPU
    DeepSpeed ignores the index and the rank is kept as before."""
    import torch

    return rank % torch.cuda.device_count() if torch.cuda.is_available() else rank


def _collate(prompt_ids: list, response_ids: list, pad_id: int, device=None):
    """Right-padded prompt+response ids (B, L), attention mask (B, L), and prompt/response lengths.

    Built row by row on the CPU, then moved to `device` (the model's) in one copy per tensor."""
    import torch

    seqs = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
    return ids.to(device), attn.to(device), [len(p) for p in prompt_ids], [len(r) for r in response_ids]


def _response_slice(per_position, prompt_lens: list, resp_lens: list):
    """Gather per-position values (B, L-1) at the positions that predict response tokens → (B, A_max), mask.

    Position P-1+t predicts response token t (its logit; its hidden state is the critic's V(s_t))."""
    import torch

    a_max = max(max(resp_lens), 1)
    out = per_position.new_zeros((len(resp_lens), a_max))
    # On the model's device: the losses combine it with model outputs (torch.where, products).
    mask = torch.zeros((len(resp_lens), a_max), dtype=torch.bool, device=per_position.device)
    for i, (p, a) in enumerate(zip(prompt_lens, resp_lens)):
        out[i, :a] = per_position[i, p - 1 : p - 1 + a]
        mask[i, :a] = True
    return out, mask


def _token_logprobs(logits, tokens):
    """log softmax(logits) at `tokens`, as logit - logsumexp: log_softmax then gather would make a (B, L, V) tensor."""
    import torch

    return logits.gather(-1, tokens[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def response_logprobs(model, ids, attn, prompt_lens, resp_lens, with_entropy: bool = False):
    """log π(a_t|s_t) of every response token, (B, A_max) float32, and its mask (+ per-token entropy if asked)."""
    import torch

    # No KV cache: nothing reads it, and with `compile` each layer's index in it would compile a graph of its own.
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
    logp, mask = _response_slice(_token_logprobs(logits, ids[:, 1:]), prompt_lens, resp_lens)
    if not with_entropy:
        return logp, mask
    from algorithms.losses import entropy_from_logits

    entropy, _ = _response_slice(entropy_from_logits(logits), prompt_lens, resp_lens)
    return logp, mask, entropy


def sample_logprobs(model, prompt_ids: list, response_ids: list, pad_id: int, device=None,
                    share_prompts: bool = True, with_entropy: bool = False):
    """`response_logprobs` of the samples (prompt_ids[i] + response_ids[i]), running each distinct prompt once.

    The samples of a group (GRPO's n per prompt) share their prompt. With `share_prompts`, each distinct prompt of
    the batch goes through the model once (left-padded, positions counting real tokens), its KV cache is copied to
    each of its samples, and the responses (right-padded) run on top of it at positions prompt_len + t: response
    token 0 is predicted by the prompt's last logit, token t > 0 by response position t-1. Same values to float
    rounding, gradients included (the copies' gradients sum into the shared prompt); the prompt tokens of a group of
    n are computed once instead of n times. Two forwards per batch whether or not a prompt repeats: the ranks of a
    ZeRO-3 group gather the parameters together at every forward, so all must run as many. It needs a forward that
    takes position_ids, past_key_values and logits_to_keep (HF causal LMs do), and no gradient checkpointing in training
    (its recomputation would append to the cache again): callers pass share_prompts=False then, and the full
    sequences run right-padded (`_collate`)."""
    import torch
    from transformers import DynamicCache

    if not share_prompts:
        return response_logprobs(model, *_collate(prompt_ids, response_ids, pad_id, device), with_entropy=with_entropy)
    distinct: dict[tuple, int] = {}
    of_row = [distinct.setdefault(tuple(p), len(distinct)) for p in prompt_ids]
    width = max(len(p) for p in distinct)
    p_ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in distinct])
    p_attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in distinct])
    a_max = max(max(len(r) for r in response_ids), 1)
    r_ids = torch.full((len(response_ids), a_max), pad_id, dtype=torch.long)
    r_attn = torch.zeros((len(response_ids), a_max), dtype=torch.long)
    for i, r in enumerate(response_ids):
        r_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        r_attn[i, : len(r)] = 1
    index = torch.tensor(of_row)
    r_pos = p_attn.sum(-1)[index][:, None] + torch.arange(a_max)[None, :]
    attn = torch.cat([p_attn[index], r_attn], dim=-1)
    p_ids, p_attn, r_ids, r_pos, attn, index = (t.to(device) for t in (p_ids, p_attn, r_ids, r_pos, attn, index))

    cache = DynamicCache(config=getattr(model, "module", model).config)
    last = model(input_ids=p_ids, attention_mask=p_attn, position_ids=(p_attn.cumsum(-1) - 1).clamp(min=0),
                 past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    cache.batch_select_indices(index)
    logits = model(input_ids=r_ids, attention_mask=attn, position_ids=r_pos, past_key_values=cache,
                   use_cache=True).logits
    logits = torch.cat([last[index], logits[:, :-1]], dim=1).float()
    mask = r_attn.to(logits.device).bool()
    logp = _token_logprobs(logits, r_ids) * mask
    if not with_entropy:
        return logp, mask
    from algorithms.losses import entropy_from_logits

    return logp, mask, entropy_from_logits(logits) * mask


def packed_logprobs(model, prompt_ids: list, response_ids: list, device=None, with_entropy: bool = False,
                    entropy_grad: bool = False, compiled: bool = False):
    """`response_logprobs` of the samples, padding-free (workers/packing.py): the micro-batch packed into one row,
    attention kept within each sequence, the log-probs (and entropy, with a gradient only if `entropy_grad`) taken
    from the hidden states in chunks, never the full (tokens × vocabulary) logits. The same values to float rounding,
    gradients included. `model` is a causal LM (or the DeepSpeed engine around one) with `get_decoder` and
    `get_output_embeddings`, as HF causal LMs have. `compiled`: the chunks' softmax arithmetic through torch.compile
    (`trainer.compile`)."""
    from workers.packing import pack, packed_forward, token_logprobs

    batch = pack(prompt_ids, response_ids, device)
    module = getattr(model, "module", model)
    with packed_forward():
        hidden = module.get_decoder()(input_ids=batch.input_ids, **batch.forward_kwargs()).last_hidden_state[0]
    logp, entropy = token_logprobs(module.get_output_embeddings(), hidden[batch.predict], batch.targets,
                                   with_entropy, entropy_grad, compiled=compiled)
    logp, mask = batch.unflatten(logp)
    return (logp, mask) if not with_entropy else (logp, mask, batch.unflatten(entropy)[0])


def forward_logprobs(model, prompt_ids: list, response_ids: list, pad_id: int, device, how: str,
                     with_entropy: bool = False, entropy_grad: bool = True, compiled: bool = False):
    """log π of every response token (B, A_max) float32, its mask, and the entropy when asked, by `how`:
    `packed` (`packed_logprobs`; `compiled` as there), `shared` (each distinct prompt once, `sample_logprobs`) or
    `padded`."""
    if how == "packed":
        return packed_logprobs(model, prompt_ids, response_ids, device, with_entropy, entropy_grad, compiled)
    return sample_logprobs(model, prompt_ids, response_ids, pad_id, device, how == "shared", with_entropy)


def _lengths(table) -> np.ndarray:
    """Tokens of every sample (prompt + response): what a token budget counts."""
    import pyarrow.compute as pc

    return (pc.list_value_length(table["prompt_ids"]).to_numpy()
            + pc.list_value_length(table["response_ids"]).to_numpy())


def _attention(packing: bool | None) -> tuple[str, bool]:
    """The attention implementation models load with and whether forwards run packed: `packing` None packs where
    the varlen kernel runs (CUDA with torch.nn.attention.varlen), else padded; packed on CPU uses SDPA with the
    block-diagonal mask transformers builds from the restarting position ids (right, but quadratic in the row)."""
    from workers.packing import VARLEN_ATTENTION, register_varlen_attention

    varlen = register_varlen_attention()
    return (VARLEN_ATTENTION if varlen else "sdpa"), (varlen if packing is None else packing)


def _compile_layers(model, field: str) -> None:
    """torch.compile every decoder layer of `model` in place (`trainer.compile`; `field` names it in errors): the
    layers transformers repeats (`GradientCheckpointingLayer`, also inside a PEFT wrapper or the critic's body).
    In place (`Module.compile`), so parameter names, checkpoints and the weight sync see the model unchanged, and
    per layer rather than the whole model: one graph serves every layer, and the model's mask building and Python
    loop stay eager. dynamic=True: a packed row's length, its number of sequences and its longest one change every
    micro-batch, and must not recompile."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"{field}: {type(model).__name__} has no transformers decoder layers "
                         f"(GradientCheckpointingLayer) to compile; set {field}: false")
    for layer in layers:
        layer.compile(dynamic=True)


def _shares_prompts(cfg: TrainerConfig) -> bool:
    """Whether unpacked forwards share prompts (`share_prompts`): not with `compile`, where the KV cache's per-layer
    index would make every compiled layer a graph of its own, up to dynamo's recompile limit, then eager."""
    return cfg.share_prompts and not cfg.compile


def _padded(column: list, a_max: int, device=None):
    """Per-token float lists → (B, a_max) float32 zero-padded on the right, on `device` (built on the CPU)."""
    import torch

    out = torch.zeros((len(column), a_max), dtype=torch.float32)
    for i, row in enumerate(column):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out.to(device)


def _rows(values, mask) -> list[list[float]]:
    """(B, A) values and mask → one list of the real positions per row, copied to the CPU once (not row by row)."""
    values, mask = values.cpu(), mask.cpu()
    return [row[m].tolist() for row, m in zip(values, mask)]


def _use_threads(threads: int | None, configured: int) -> None:
    """Torch threads for one call: the stage's share when several models compute at once on CPU (workers/trainers.py:
    threads_each), else the configured count. With one thread a call runs no OpenMP team, so an actor whose threads
    may spin (workers/cluster.py: SPIN_ENV) takes no core from the models beside it."""
    import torch

    torch.set_num_threads(threads or configured)


def _micro_batches(cfg: TrainerConfig, indices: np.ndarray, lengths: np.ndarray, ranks: int = 1) -> list[np.ndarray]:
    """`indices` as micro-batches, one forward each: of at most `cfg.max_tokens_per_micro_batch` tokens (`lengths`
    counts each sample's), balanced over `ranks` (workers/packing.py token_budget_split), or of
    `cfg.micro_batch_size` samples."""
    from workers.packing import token_budget_split

    if cfg.max_tokens_per_micro_batch is None:
        return [indices[i : i + cfg.micro_batch_size] for i in range(0, len(indices), cfg.micro_batch_size)]
    return token_budget_split(indices, lengths, cfg.max_tokens_per_micro_batch, ranks)


def deepspeed_config(trainer: TrainerConfig, dtype: str, world_size: int, on_gpu: bool,
                     overrides: dict | None = None) -> dict:
    """The DeepSpeed config of one model group from its TrainerConfig, with the user's JSON (`overrides`, read from
    `trainer.deepspeed_config` by the driver) merged over it: its keys win, nested dicts merge key by key."""
    mini, micro = trainer.mini_batch_size, trainer.micro_batch_size
    zero: dict = {"stage": trainer.zero_stage}
    offload = trainer.offload
    if offload != "none":
        # Pinned host buffers speed up the device<->host copies; on a CPU-only host there is nothing to pin.
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if offload == "optimizer_and_params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    config = {
        "train_batch_size": mini,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": mini // (micro * world_size),
        "gradient_clipping": trainer.grad_clip,
        "zero_optimization": zero,
        # bf16 under ZeRO-0 wraps the torch optimizer in DeepSpeed's FP16_UnfusedOptimizer (fp32 master weights);
        # under ZeRO >= 1 in the ZeRO optimizer's bf16 path. deepspeed.initialize moves the model to the device
        # named by LOCAL_RANK before it wraps the optimizer: the optimizer built here holds the same Parameter
        # objects (Module.to moves their data in place) and creates its states lazily, on that device.
        "bf16": {"enabled": dtype == "bfloat16"},
        # A torch optimizer (not DeepSpeed's fused/CPU Adam): no op build, same math on CPU and GPU. With offload
        # it steps on the host copies (DeepSpeedCPUAdam would be faster but needs a compiled op).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        # Every checkpoint is saved under one tag ("state"): DeepSpeed's check that all ranks use the same tag is an
        # all_reduce per save that can find nothing.
        "checkpoint": {"tag_validation": "Ignore"},
    }
    return _merged(config, overrides or {})


def _host_copy(obj):
    """A copy of a checkpoint's state in host memory, whatever device its tensors live on: tensors copied, containers
    rebuilt, anything else deep-copied, so that the next update cannot change what is being written."""
    import copy

    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, _host_copy(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(_host_copy(v) for v in obj)
    return copy.deepcopy(obj)


def _host_copy_engine(config_params):
    """DeepSpeed's torch checkpoint engine, except that `save` keeps a host copy of each file's state for the trainer
    to write (`take()`) instead of writing it: DeepSpeed's save_checkpoint then returns as soon as the state is
    copied, and the trainer writes the files now or in its writer thread. Loading is DeepSpeed's own (torch.load).
    (A class built in the actor: DeepSpeed is imported there, not where this module is.)"""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class HostCopyCheckpointEngine(TorchCheckpointEngine):
        def __init__(self, config_params=None):
            super().__init__(config_params)
            self.copies: list[tuple[str, object]] = []

        def save(self, state_dict, path: str) -> None:
            self.copies.append((path, _host_copy(state_dict)))

        def take(self) -> list[tuple[str, object]]:
            copies, self.copies = self.copies, []
            return copies

    return HostCopyCheckpointEngine(config_params)


def _merged(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class _DeepSpeedWorker(RunActor):
    """One rank of a DeepSpeed model group: init, micro-batching, checkpoints and state versioning."""

    role = "model"

    def __init__(self, model_path: str, trainer: TrainerConfig, dtype: str, seed: int, rank: int = 0,
                 world_size: int = 1, master_addr: str = "127.0.0.1", master_port: int | None = None,
                 deepspeed_overrides: dict | None = None):
        """`trainer`: this model's config section (policy or critic); `deepspeed_overrides`: the user's DeepSpeed
        JSON (`trainer.deepspeed_config`), read by the driver, since the ranks may run where the file is not."""
        mini, micro = trainer.mini_batch_size, trainer.micro_batch_size
        # Checked before the rendezvous: every rank of a misconfigured group fails here instead of waiting for the
        # others. (Each rank runs mini/(micro·N) micro-batches per optimizer step.)
        if mini % (micro * world_size):
            raise ValueError(
                f"{self.role}.mini_batch_size ({mini}) must be a multiple of {self.role}.micro_batch_size ({micro}) "
                f"times the group's world size ({world_size}), so that every rank accumulates the same whole number "
                f"of micro-batches per optimizer step; change one of the batch sizes or the number of ranks")
        import torch

        torch.set_num_threads(trainer.num_threads)
        self.model_path, self.cfg, self.dtype, self.seed = model_path, trainer, dtype, seed
        self.deepspeed_overrides = deepspeed_overrides
        self.attention, self.packing = _attention(trainer.packing)
        self.rank, self.world_size = rank, world_size
        # DeepSpeed's autotuner imports MLflow whenever it is installed (~2.5 s of every trainer's start on 2 cores);
        # no trainer actor logs to it (tracking runs in the driver), so inside an actor it is hidden from that import.
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
            sys.modules.setdefault("mlflow", None)
        import deepspeed

        # One process group per model group (one actor per rank). A lone actor picks its own free MASTER_PORT after
        # the slow import, so nothing else on the host takes it before the store binds it; a group's ranks are given
        # rank 0's (`group_address`). Groups on one host, even on one shared GPU, only need distinct MASTER_PORTs
        # (NCCL's bootstrap finds its own ports). LOCAL_RANK: the device index deepspeed.initialize moves the model to.
        os.environ.update(
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port or free_port()), RANK=str(rank),
            LOCAL_RANK=str(_local_rank(rank)), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        )
        deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
        self.engine = None
        self._build()

    def _build(self) -> None:
        """(Re)create model (`_make_model` of the subclass) and optimizer from the base weights: version 0."""
        import deepspeed
        import torch

        if self.engine is not None:
            self.engine.destroy()
            self.engine = None
            # The old model and optimizer states must leave the (shared) GPU before the new ones arrive.
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        torch.manual_seed(self.seed)
        model = self._make_model()
        if self.cfg.gradient_checkpointing:
            # Non-reentrant, the form PyTorch recommends: the reentrant one computes no parameter gradients in a
            # block none of whose inputs requires grad.
            self._checkpointed_module(model).gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.cfg.compile:
            _compile_layers(model, f"{self.role}.compile")
        # Trainable parameters only: a LoRA policy's frozen base weights get no optimizer state (nor ZeRO partitions).
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=self.cfg.lr,
                                      weight_decay=self.cfg.weight_decay)
        # DeepSpeed steps the scheduler once per optimizer step (at the accumulation boundary) and saves and loads
        # its state with the checkpoint. The factor is 1 for a constant schedule without warmup: the plain lr.
        cfg = self.cfg
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
            step, cfg.lr_warmup_steps, cfg.lr_schedule, cfg.lr_decay_steps, cfg.min_lr_ratio))
        ds_config = deepspeed_config(self.cfg, self.dtype, self.world_size, torch.cuda.is_available(),
                                     self.deepspeed_overrides)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=ds_config)
        if self.world_size == 1 and self.cfg.zero_stage == 0:
            # A group of one has no gradients to average, yet at every optimizer step ZeRO-0 would flatten all of
            # them, all_reduce the buffer with itself and copy it back: the same values (tests/workers/
            # test_trainer_group.py). ZeRO >= 1 does its own gradient bookkeeping in that call, so it keeps it.
            self.engine.enable_backward_allreduce = False
        # DeepSpeed writes every checkpoint file through its checkpoint engine: ours keeps host copies of the state
        # instead, for save_checkpoint to write now or in the background.
        self.engine.checkpoint_engine = _host_copy_engine(self.engine._config)
        self.state_version, self.dirty = 0, False

    # ---- state versioning and checkpoints -----------------------------------------------------------------
    def state(self) -> dict:
        return {"role": self.role, "version": self.state_version, "dirty": self.dirty}

    @property
    def _frozen_base(self) -> bool:
        """Whether the model's base weights are frozen (a LoRA policy): checkpoints then hold the trained weights
        only, and loading one keeps the base weights `_build` loaded."""
        return False

    def ensure_version(self, version: int, checkpoint_uri: str | None, storage_options: dict | None = None) -> bool:
        """Bring the in-memory state to policy `version` from its checkpoint (`checkpoint_uri`; None for version 0,
        the base weights); returns True when it had to reload. workers/trainers.py picks the checkpoint and replays
        the updates after it."""
        if self.state_version == version and not self.dirty:
            return False
        self.wait_for_writes()  # never read a checkpoint this rank is still writing
        if version == 0:
            self._build()
            return True
        from storage.checkpoint import local_dir_for_read

        with local_dir_for_read(f"{checkpoint_uri}/{self.role}", storage_options) as path:
            # An adapter-only checkpoint (LoRA) holds the trained weights; the frozen ones come from _build's base.
            _, client_state = self.engine.load_checkpoint(path, tag="state", load_module_strict=not self._frozen_base)
        rng_states = (client_state or {}).get("rng_states")  # absent in checkpoints written before they were saved
        if rng_states is not None:
            _set_rng_state(rng_states[self.rank])
        self.state_version, self.dirty = version, False
        return True

    def save_checkpoint(self, checkpoint_uri: str, storage_options: dict | None = None,
                        background: bool = False) -> float:
        """This rank's share of the DeepSpeed checkpoint (`{checkpoint_uri}/{role}/state/`), then its part marker
        `_PART-{role}-rank{r}.json`. Every rank calls it. DeepSpeed's save returns once the state is copied to host
        memory; the files are written here, or with `background` by this actor's writer thread while it goes on
        serving calls (the marker comes last either way). Returns the seconds the call blocked."""
        import torch

        from storage.checkpoint import staging_dir, write_part
        from storage.faults import fault_point

        t0 = time.perf_counter()
        # Every rank's random streams, in one list: under ZeRO 0-2 only rank 0 writes the file that carries
        # client_state (all ranks read it back), under ZeRO-3 every rank writes its own.
        rng_states = self._gather(_rng_state())
        path, publish = staging_dir(f"{checkpoint_uri}/{self.role}", storage_options)
        self.engine.save_checkpoint(path, tag="state", client_state={"rng_states": rng_states}, save_latest=False,
                                    exclude_frozen_parameters=self._frozen_base)
        ckpt_engine, version = self.engine.checkpoint_engine, self.state_version
        copies, zipfile = ckpt_engine.take(), ckpt_engine.zipfile_serialization  # DeepSpeed's own file format

        def write() -> None:
            files = {}
            for file, state in copies:
                fault_point("checkpoint.writing", version)  # a crash here leaves a part without its marker
                torch.save(state, file, _use_new_zipfile_serialization=zipfile)
                files[f"{self.role}/{os.path.relpath(file, path)}"] = os.path.getsize(file)
            publish()
            write_part(checkpoint_uri, f"{self.role}-rank{self.rank}", files, storage_options,
                       seconds=round(time.perf_counter() - t0, 4))

        self._write(write, background)
        return time.perf_counter() - t0

    def _write(self, job, background: bool) -> None:
        """Run a checkpoint write now, or queue it on this actor's writer thread (one at a time, in order)."""
        if not background:
            job()
            return
        from concurrent.futures import ThreadPoolExecutor

        if getattr(self, "_writer", None) is None:
            self._writer, self._writes = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer"), []
        self._writes.append(self._writer.submit(job))

    def wait_for_writes(self) -> None:
        """Return once every background checkpoint write of this rank is done; raises the first write's error (its
        part marker was never written, so the checkpoint is not trusted)."""
        writes, self._writes = getattr(self, "_writes", []), []
        for future in writes:
            future.result()

    @property
    def device(self):
        """Where the model lives (cuda:0 when the actor was given a GPU): batches are moved here."""
        return self.engine.device

    def _gather(self, obj) -> list:
        """[obj of rank 0, ..., obj of rank N-1] on every rank (any picklable object)."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def _sharded(self, table, forward) -> list:
        """`forward(indices)` (one result per row of a micro-batch) over every row of `table`, split over the group;
        the full list, in row order, on every rank.

        Rank r takes rows [r·k, (r+1)·k), k = ceil(n/N), cut into micro-batches (a token budget groups rows by
        length, not in row order: each result goes back to its row). Under ZeRO-3 each forward gathers the
        parameters with the other ranks, so every rank must run as many forwards: a rank with fewer micro-batches
        repeats one whose results are dropped."""
        n, lengths = table.num_rows, _lengths(table)
        k = -(-n // self.world_size)
        shares = [np.arange(r * k, min((r + 1) * k, n)) for r in range(self.world_size)]
        splits = [[mb for mb in _micro_batches(self.cfg, s, lengths) if len(mb)] for s in shares]
        mine = splits[self.rank]
        filler = mine[0] if mine else np.zeros(1, dtype=np.int64)
        local = {int(i): row for mb in mine for i, row in zip(mb, forward(mb))}
        for _ in range(max(len(s) for s in splits) - len(mine)):
            forward(filler)
        rows = {i: row for share in self._gather(local) for i, row in share.items()}
        return [rows[i] for i in range(n)]

    def _full_state_dict(self) -> dict | None:
        """Full (gathered) weights with HF names, as independent CPU tensors, on rank 0; None on the other ranks.

        Collective under ZeRO-3 (every rank must call it); the other stages read rank 0's full copy."""
        if self.cfg.zero_stage == 3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()
        elif self.rank == 0:
            sd = self.engine.module.state_dict()
        else:
            sd = None
        if sd is None:
            return None
        # Copies: tied embeddings share storage, which safetensors refuses to serialise. One copy whatever the device
        # (a GPU tensor's .to("cpu") already is one; .clone() after it would copy the weights twice).
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}

    def _micro_step(self, last: bool) -> None:
        """Before a micro-batch's forward: whether it ends the optimizer step. The trainers say so themselves, as
        micro-batches cut by tokens vary in number from step to step (DeepSpeed's own count assumes a fixed one)."""
        self.engine.set_gradient_accumulation_boundary(last)

    def _step(self) -> float | None:
        """engine.step() for one micro-batch; at an optimizer-step boundary returns the gradient norm (pre-clip).

        DeepSpeed computes the global norm only under ZeRO ≥ 1; under ZeRO-0 it is measured here, before step()
        zeroes the gradients."""
        import torch

        norm = None
        if self.engine.is_gradient_accumulation_boundary():
            if self.cfg.zero_stage == 0:
                # Each norm in float32: bf16 gradients' own norms would be rounded to ~3 digits.
                grads = [torch.linalg.vector_norm(p.grad, dtype=torch.float32)
                         for p in self.engine.module.parameters() if p.grad is not None]
                norm = float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0
            self.engine.step()
            return norm if norm is not None else float(self.engine.get_global_grad_norm() or 0.0)
        self.engine.step()
        return None

    def _optimizer_steps(self, table, seed: int):
        """Per epoch, a seeded permutation cut into mini-batches (one optimizer step each) of micro-batches (by
        sample count, or by tokens with `max_tokens_per_micro_batch`).

        Yields (all micro-batches of the step, this rank's): micro-batch j goes to rank j mod N. Every rank draws the
        same permutation, so the step's global counts (the loss denominators) are known on each."""
        n, lengths = table.num_rows, _lengths(table)
        mini = self.cfg.mini_batch_size
        if self.world_size > 1 and n % mini:
            raise ValueError(
                f"{n} experience rows are not a multiple of {self.role}.mini_batch_size ({mini}): with "
                f"{self.world_size} ranks every optimizer step must be whole so that all ranks run the same number "
                f"of micro-batches; make the samples per iteration a multiple of {self.role}.mini_batch_size")
        rng = np.random.default_rng(seed)
        for _ in range(self._epochs):
            perm = rng.permutation(n)
            for start in range(0, n, mini):
                step = _micro_batches(self.cfg, perm[start : start + mini], lengths, self.world_size)
                yield step, step[self.rank :: self.world_size]

    def _lr(self) -> float:
        """The learning rate the current optimizer step trains with (the scheduler moves it at step boundaries)."""
        return float(self.engine.get_lr()[0])

    def _global_metrics(self, metrics: list[dict], summed: tuple[str, ...]) -> list[dict]:
        """Add the `summed` entries of every step's metrics over the ranks (one all_reduce for the whole call), so
        that every rank returns the metrics of the whole optimizer steps. The others (grad norm, lr) are global
        already."""
        if self.world_size == 1 or not metrics:
            return metrics
        import torch
        import torch.distributed as dist

        local = torch.tensor([[m[k] for k in summed] for m in metrics], dtype=torch.float64, device=self.device)
        dist.all_reduce(local, op=dist.ReduceOp.SUM)
        return [{**m, **dict(zip(summed, row))} for m, row in zip(metrics, local.cpu().tolist())]


class PolicyWorker(_DeepSpeedWorker):
    role = "policy"

    def __init__(self, *args, algo: AlgoConfig, norm_len: int, **kwargs):
        """`norm_len`: Dr. GRPO's constant length L of `loss_agg: seq-mean-token-sum-norm` (the response length
        limit, generation.max_new_tokens)."""
        self.algo, self.norm_len = algo, norm_len
        self._epochs = algo.ppo_epochs
        super().__init__(*args, **kwargs)

    def _make_model(self):
        """The causal LM at `model_path`; with `policy.lora` the base model there wrapped by PEFT with a fresh
        adapter (A random from the seed `_build` set, B = 0: the policy starts equal to the base) or the saved
        `init_adapter`, trainable, every base weight frozen."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=_torch_dtype(self.dtype),
                                                     attn_implementation=self.attention)
        lora = self._lora
        if lora is None:
            return model
        import peft

        if lora.init_adapter is not None:
            model = peft.PeftModel.from_pretrained(model, lora.init_adapter, is_trainable=True)
            saved = model.peft_config["default"]
            if saved.r != lora.rank or saved.lora_alpha != lora.alpha:
                raise ValueError(f"policy.lora.init_adapter: {lora.init_adapter} has rank {saved.r} and alpha "
                                 f"{saved.lora_alpha}, policy.lora asks for rank {lora.rank} and alpha {lora.alpha}")
            return model
        return peft.get_peft_model(model, peft.LoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
            task_type="CAUSAL_LM"))

    @property
    def _lora(self):
        """The policy's LoraConfig, or None: full fine-tuning (also for a plain TrainerConfig, as tests and benches
        pass it)."""
        return getattr(self.cfg, "lora", None)

    @property
    def _frozen_base(self) -> bool:
        return self._lora is not None

    def _how(self, training: bool) -> str:
        """How forwards run: packed, shared prompts (not under gradient checkpointing in training: its
        recomputation would append to the KV cache again; not with `compile`: `_shares_prompts`), or padded."""
        if self.packing:
            return "packed"
        shared = _shares_prompts(self.cfg) and not (training and self.cfg.gradient_checkpointing)
        return "shared" if shared else "padded"

    @staticmethod
    def _checkpointed_module(model):
        return model

    def logprobs(self, table, threads: int | None = None, adapter: bool = True) -> list[list[float]]:
        """log π(a_t|s_t) of the current weights for every response token of `table`'s samples (every rank: the
        whole table in, the whole list out). `threads`: torch threads for this call (None: policy.num_threads).
        `adapter=False` (a LoRA policy only): the same forwards with the adapter disabled (each adapted layer runs its
        base layer alone), i.e. the frozen base model, the reference π_ref: what a separate copy of the base computes,
        to float rounding (seen: 2e-6 in the shared-prompt path, where a frozen weight may take another CPU matmul
        kernel; equal in the padded path)."""
        import contextlib

        import torch

        _use_threads(threads, self.cfg.num_threads)
        if not adapter and self._lora is None:
            raise ValueError("logprobs(adapter=False) needs a LoRA policy (policy.lora): a fully fine-tuned policy "
                             "has no base model to fall back to; the reference actor computes π_ref")
        base = contextlib.nullcontext() if adapter else self.engine.module.disable_adapter()

        def forward(idx) -> list:
            rows = table.take(idx)
            return _rows(*forward_logprobs(self.engine, rows["prompt_ids"].to_pylist(),
                                           rows["response_ids"].to_pylist(), self.tokenizer.pad_token_id,
                                           self.device, self._how(training=False)))

        self.engine.eval()
        with torch.no_grad(), base:
            return self._sharded(table, forward)

    def train(self, table, new_version: int, seed: int, kl_coef: float, threads: int | None = None) -> list[dict]:
        """PPO policy update on an experience table; returns one metrics dict per optimizer step.

        `kl_coef` is the β the advantages stage used (it changes under the adaptive controller); `threads`: torch
        threads for this call (None: policy.num_threads)."""
        from algorithms.kl import kl_estimate
        from algorithms.losses import aggregate, importance_weights, policy_loss
        from storage.faults import fault_point
        from storage.schema import policy_mask

        fault_point("policy.train", new_version)  # inside the actor (rank 0 and every other rank)

        _use_threads(threads, self.cfg.num_threads)

        self.engine.train()
        self.dirty = True
        algo, metrics = self.algo, []
        cols = {c: table[c].to_pylist() for c in ("prompt_ids", "response_ids", "old_logprobs", "advantages",
                                                  "ref_logprobs", "engine_logprobs")}
        response_ids, policy = cols["response_ids"], policy_mask(table)
        how, entropy_grad = self._how(training=True), algo.entropy_coef > 0  # the entropy is a metric otherwise
        for micro_batches, mine in self._optimizer_steps(table, seed):
            # Every micro-batch divides by the whole optimizer step's token (or sequence) count, so the gradient
            # does not depend on how the step is split into micro-batches or ranks. Policy tokens only: a
            # multi-turn episode's environment tokens (holes) are in no loss.
            denominators = {"loss_denominator": float(sum(sum(policy[i]) for mb in micro_batches for i in mb)),
                            "num_seqs_denominator": float(sum(len(mb) for mb in micro_batches)),
                            "norm_len": float(self.norm_len)}
            acc = {"ppo/policy_loss": 0.0, "ppo/clipfrac": 0.0, "ppo/approx_kl": 0.0, "ppo/kl_loss": 0.0,
                   "ppo/entropy": 0.0, "ppo/is_weight_mean": 0.0}
            lr = self._lr()
            for j, mb in enumerate(mine):
                self._micro_step(last=j == len(mine) - 1)
                logp, mask, entropy = forward_logprobs(
                    self.engine, [cols["prompt_ids"][i] for i in mb], [response_ids[i] for i in mb],
                    self.tokenizer.pad_token_id, self.device, how, with_entropy=True, entropy_grad=entropy_grad,
                    compiled=self.cfg.compile)
                a_max = logp.shape[1]
                mask = mask & _padded([policy[i] for i in mb], a_max, logp.device).bool()
                column = lambda name: _padded([cols[name][i] for i in mb], a_max, logp.device)  # noqa: E731
                old_lp = column("old_logprobs")
                is_weights = None
                if algo.is_correction != "none":
                    is_weights = importance_weights(old_lp, column("engine_logprobs"), mask, algo.is_correction,
                                                    algo.is_cap, algo.is_low)
                loss, stats = policy_loss(logp, old_lp, column("advantages"), mask, algo.clip_eps,
                                          clip_eps_high=algo.clip_eps_high, dual_clip=algo.dual_clip,
                                          variant=algo.policy_loss, is_weights=is_weights,
                                          agg=algo.loss_agg, **denominators)
                acc["ppo/policy_loss"] += loss.item()
                if not algo.kl_in_reward and kl_coef > 0:
                    kl = kl_estimate(logp, column("ref_logprobs"), algo.kl_estimator)
                    kl_loss = aggregate(kl, mask, algo.loss_agg, **denominators)
                    loss = loss + kl_coef * kl_loss
                    acc["ppo/kl_loss"] += kl_loss.item()
                entropy_term = aggregate(entropy, mask, algo.loss_agg, **denominators)
                if algo.entropy_coef > 0:
                    loss = loss - algo.entropy_coef * entropy_term
                # DeepSpeed averages the ranks' gradients; each rank's share of the step's sum, times N, makes that
                # average the sum: the gradient of the whole step, as on one rank.
                self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
                grad_norm = self._step()
                weight = mask.sum().item() / denominators["loss_denominator"]
                acc["ppo/entropy"] += entropy_term.item()
                acc["ppo/clipfrac"] += stats["clipfrac"] * weight
                acc["ppo/approx_kl"] += stats["approx_kl"] * weight
                if is_weights is not None:
                    acc["ppo/is_weight_mean"] += float(is_weights[mask].mean()) * weight
            acc["ppo/grad_norm"] = grad_norm
            acc["ppo/lr"] = lr
            metrics.append(acc)
        metrics = self._global_metrics(metrics, ("ppo/policy_loss", "ppo/clipfrac", "ppo/approx_kl", "ppo/kl_loss",
                                                 "ppo/entropy", "ppo/is_weight_mean"))
        self.state_version, self.dirty = new_version, False
        return metrics

    def export_weights(self) -> bytes | None:
        """Full policy weights as safetensors bytes (HF parameter names), for an in-place engine reload; rank 0 only
        (the other ranks of a group return None, after taking part in the ZeRO-3 gather)."""
        from safetensors.torch import save

        sd = self._full_state_dict()
        return save(sd) if sd is not None else None

    # ---- weight sync (workers/weight_sync.py; driven by stages/sync.py) ----------------------------------------
    def weight_sync_plan(self) -> list[dict]:
        """The sync plan: name, shape and dtype of every tensor the engines load, in order (any rank)."""
        from workers.weight_sync import plan_of

        return plan_of({name: (tuple(getattr(p, "ds_shape", p.shape)), p.dtype)
                        for name, p in self._sync_tensors().items()})

    def weight_sums(self, names: list[str]) -> dict[str, float]:
        """Float64 sums of the named tensors of the current weights, what an engine reports for the same names
        after a sync. Every rank must call it (under ZeRO-3 the tensors are gathered)."""
        import deepspeed

        from workers.weight_sync import tensor_sum

        named = self._sync_tensors()
        params = [named[n] for n in names]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {n: tensor_sum(p.detach()) for n, p in zip(names, params, strict=True)}

    def open_weight_sync(self, members: list, reuse_id: str | None) -> dict:
        """Rank 0: the weight-sync group to send through, `{"id", "members", "host", "port"}`. The group it holds
        when its id is `reuse_id` (the id every receiver reports) and its receivers are `members`; otherwise a new
        one: the old group is closed and this rank hosts the new group's store on a free port."""
        import uuid

        import ray

        from workers.weight_sync import host_store

        info = getattr(self, "_sync_info", None)
        if info is not None and info["id"] == reuse_id and info["members"] == members:
            return dict(info)
        self._close_weight_sync()
        host = ray.util.get_node_ip_address()
        self._sync_store = host_store(host)
        self._sync_info = {"id": uuid.uuid4().hex[:12], "members": members, "host": host,
                           "port": self._sync_store.port}
        return dict(self._sync_info)

    def broadcast_weights(self, spec: dict) -> dict | None:
        """Send the current weights to the group `spec` describes (`open_weight_sync`'s answer plus "world_size",
        "plan", "bucket_mb", "sample"), bucket by bucket. Every rank must call it: under ZeRO-3 each bucket's
        parameters are gathered from all ranks, and only rank 0, the group's root, sends. Rank 0 returns `{"bytes",
        "checksum", "sample_sums", "seconds"}` of what it sent; the others None. A failed send closes the group, so
        the next sync builds a new one rather than reuse a broken one."""
        import deepspeed

        from workers.weight_sync import SyncGroup, buckets

        t0 = time.perf_counter()
        named = self._sync_tensors()

        def tensors_of(entries: list[dict]) -> list:
            params = [named[e["name"]] for e in entries]
            # A no-op outside ZeRO-3. Copies, because the gathered parameters are released when the block ends.
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return [p.detach().clone() for p in params]

        if self.rank != 0:
            if self.cfg.zero_stage == 3:
                for entries in buckets(spec["plan"], spec["bucket_mb"]):
                    tensors_of(entries)
            return None
        try:
            if getattr(self, "_sync", None) is None or self._sync.group_id != spec["id"]:
                self._sync = SyncGroup(spec["id"], spec["host"], spec["port"], 0, spec["world_size"], self.device,
                                       store=self._sync_store)
            sent = self._sync.send(spec["plan"], spec["bucket_mb"], spec["sample"], tensors_of)
        except Exception:
            self._close_weight_sync()
            raise
        return {**sent, "seconds": time.perf_counter() - t0}

    def share_weights(self, plan: list[dict], bucket_mb: float, sample: list[str]) -> dict:
        """CUDA IPC route, for the engine that shares this rank's GPU (hybrid placement): copy the weights into one
        GPU buffer per bucket of `plan`, keep the buffers until `release_shared_weights`, and return their IPC
        handles with the sums of what they hold (`{"handles", "bytes", "checksum", "sample_sums"}`). Every rank
        calls it and serves its own engine (under ZeRO-3 each bucket is gathered by all ranks)."""
        import deepspeed
        import torch
        from torch.multiprocessing.reductions import reduce_tensor

        from workers.weight_sync import buckets, pack, tensor_sum, unpack

        named = self._sync_tensors()
        wanted, sums, sampled, sent = set(sample), [], {}, 0
        self._shared = []
        for entries in buckets(plan, bucket_mb):
            params = [named[e["name"]] for e in entries]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                flat = pack([p.detach() for p in params])  # a copy: it outlives the gathered parameters
            for name, tensor in unpack(flat, entries):
                sums.append(tensor_sum(tensor))
                if name in wanted:
                    sampled[name] = sums[-1]
            self._shared.append(flat)
            sent += flat.numel() * flat.element_size()
        torch.cuda.synchronize()  # the engine reads the buffers from its process: the copies must have landed
        return {"handles": [reduce_tensor(flat) for flat in self._shared], "bytes": sent,
                "checksum": math.fsum(sums), "sample_sums": sampled}

    def release_shared_weights(self) -> None:
        """Free the buffers `share_weights` kept (after every engine has loaded them)."""
        import torch

        self._shared = None
        torch.cuda.empty_cache()

    def _close_weight_sync(self) -> None:
        if getattr(self, "_sync", None) is not None:
            self._sync.close()
        self._sync = self._sync_store = self._sync_info = None

    def _engine_tensors(self) -> dict:
        """Every tensor the engines serve, by HF name (a tied lm_head under both names): the model's parameters and
        persistent buffers; for a LoRA policy the base weights with the adapter folded in, W + (alpha/r)·B A (PEFT's
        own merge formula, `get_delta_weight`), as new tensors, and the base model's own tensors elsewhere. The
        adapter is never merged in place: unmerging would not restore W bit for bit."""
        module = self.engine.module
        if self._lora is None:
            return module.state_dict(keep_vars=True)
        import torch
        from peft.tuners.lora import LoraLayer

        base = module.get_base_model()
        with torch.no_grad():
            merged = {f"{name}.weight": layer.base_layer.weight + layer.get_delta_weight("default")
                      for name, layer in base.named_modules() if isinstance(layer, LoraLayer)}
        return {name: merged.get(name, tensor)
                for name, tensor in ((n.replace(".base_layer.", "."), t)
                                     for n, t in base.state_dict(keep_vars=True).items() if ".lora_" not in n)}

    def _full_state_dict(self) -> dict | None:
        if self._lora is None:
            return super()._full_state_dict()
        if self.rank != 0:  # ZeRO 0-2 (ZeRO-3 is refused with LoRA): rank 0 holds every weight
            return None
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self._engine_tensors().items()}

    def _sync_tensors(self) -> dict:
        """The parameters and persistent buffers the engines load, by HF name, each tensor once: a tied lm_head is
        left out: the engines tie it to the embedding themselves."""
        seen, out = set(), {}
        for name, tensor in self._engine_tensors().items():
            if id(tensor) not in seen:
                seen.add(id(tensor))
                out[name] = tensor
        return out

    def export_hf(self, checkpoint_uri: str, storage_options: dict | None = None, background: bool = False,
                  merged: bool = False) -> float:
        """HF folder of the current policy, `{checkpoint_uri}/hf`, then its part marker `_PART-hf.json`: config,
        tokenizer and safetensors that `from_pretrained` loads; for a LoRA policy the adapter only (PEFT
        `save_pretrained`: adapter_config.json naming the base model, adapter_model.safetensors), which
        `PeftModel.from_pretrained(base, folder)` loads, and with `merged` also `{checkpoint_uri}/merged`
        (`_PART-merged.json`), the full weights with the adapter folded in. Rank 0 writes (now, or with `background`
        in its writer thread, from host copies); every rank of a group must call (the ZeRO-3 gather is collective).
        Returns the seconds the call blocked."""
        t0 = time.perf_counter()
        lora = self._lora is not None
        # host copies
        adapter = ({k: v.detach().to("cpu", copy=True) for k, v in self.engine.module.state_dict().items()
                    if ".lora_" in k} if lora and self.rank == 0 else None)
        sd = self._full_state_dict() if not lora or merged else None
        if self.rank != 0:
            return time.perf_counter() - t0

        def save(part: str, save_model) -> None:
            from storage.checkpoint import staging_dir, write_part

            path, publish = staging_dir(f"{checkpoint_uri}/{part}", storage_options)
            save_model(path)
            self.tokenizer.save_pretrained(path)
            files = {f"{part}/{name}": os.path.getsize(os.path.join(path, name)) for name in sorted(os.listdir(path))}
            publish()
            write_part(checkpoint_uri, part, files, storage_options, seconds=round(time.perf_counter() - t0, 4))

        def write() -> None:
            module = self.engine.module
            if not lora:
                save("hf", lambda path: module.save_pretrained(path, state_dict=sd, safe_serialization=True))
                return
            save("hf", lambda path: module.save_pretrained(path, state_dict=adapter, safe_serialization=True))
            if merged:
                save("merged", lambda path: module.get_base_model().save_pretrained(path, state_dict=sd,
                                                                                    safe_serialization=True))

        self._write(write, background)
        return time.perf_counter() - t0


def _value_model(model_path: str, dtype, attention: str = "sdpa"):
    """Critic network: the base transformer body and a scalar value head on every position's hidden state."""
    import torch
    from transformers import AutoModel

    class ValueModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = AutoModel.from_pretrained(model_path, dtype=dtype, attn_implementation=attention)
            hidden = self.body.config.hidden_size
            self.value_head = torch.nn.Linear(hidden, 1, dtype=dtype)
            torch.nn.init.normal_(self.value_head.weight, std=1.0 / (hidden + 1) ** 0.5)
            torch.nn.init.zeros_(self.value_head.bias)

        def forward(self, input_ids, attention_mask=None, **forward_kwargs):
            """V of every position, (B, L) float32; `forward_kwargs` carry a packed row's position ids and
            cumulative lengths (workers/packing.py)."""
            h = self.body(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs).last_hidden_state
            return self.value_head(h).squeeze(-1).float()

    return ValueModel()


class CriticWorker(_DeepSpeedWorker):
    role = "critic"

    def __init__(self, *args, algo: AlgoConfig, pad_token_id: int, **kwargs):
        self.algo, self.pad_token_id = algo, pad_token_id
        self._epochs = algo.ppo_epochs
        super().__init__(*args, **kwargs)

    def _make_model(self):
        return _value_model(self.model_path, _torch_dtype(self.dtype), self.attention)

    @staticmethod
    def _checkpointed_module(model):
        return model.body  # the transformer; the value head is one linear layer

    def _response_values(self, prompt_ids: list, response_ids: list):
        """V(s_t) before every response token, (B, A_max), and its mask: packed (padding-free) or padded."""
        if self.packing:
            from workers.packing import pack, packed_forward

            batch = pack(prompt_ids, response_ids, self.device)
            with packed_forward():
                values = self.engine(batch.input_ids, **batch.forward_kwargs())[0]
            return batch.unflatten(values[batch.predict])
        ids, attn, p_lens, a_lens = _collate(prompt_ids, response_ids, self.pad_token_id, self.device)
        return _response_slice(self.engine(ids, attn, use_cache=False)[:, :-1], p_lens, a_lens)  # as response_logprobs

    def values(self, table, threads: int | None = None) -> list[list[float]]:
        """V(s_t) before every response token (every rank: the whole table in, the whole list out). `threads`: torch
        threads for this call (None: critic.num_threads)."""
        import torch

        _use_threads(threads, self.cfg.num_threads)

        def forward(idx) -> list:
            rows = table.take(idx)
            return _rows(*self._response_values(rows["prompt_ids"].to_pylist(), rows["response_ids"].to_pylist()))

        self.engine.eval()
        with torch.no_grad():
            return self._sharded(table, forward)

    def train(self, table, new_version: int, seed: int, kl_coef: float = 0.0, threads: int | None = None) -> list[dict]:
        """Clipped value regression onto the experience's returns; one metrics dict per optimizer step. `threads`:
        torch threads for this call (None: critic.num_threads)."""
        from algorithms.losses import value_loss
        from storage.schema import policy_mask

        _use_threads(threads, self.cfg.num_threads)

        self.engine.train()
        self.dirty = True
        metrics = []
        prompt_ids, response_ids = table["prompt_ids"].to_pylist(), table["response_ids"].to_pylist()
        old_v, returns, policy = table["values"].to_pylist(), table["returns"].to_pylist(), policy_mask(table)
        for micro_batches, mine in self._optimizer_steps(table, seed):
            step_tokens = float(sum(sum(policy[i]) for mb in micro_batches for i in mb))  # holes have no target
            acc = {"critic/value_loss": 0.0, "critic/clipfrac": 0.0}
            lr = self._lr()
            for j, mb in enumerate(mine):
                self._micro_step(last=j == len(mine) - 1)
                v, mask = self._response_values([prompt_ids[i] for i in mb], [response_ids[i] for i in mb])
                a_max = v.shape[1]
                mask = mask & _padded([policy[i] for i in mb], a_max, v.device).bool()
                loss, stats = value_loss(v, _padded([old_v[i] for i in mb], a_max, v.device),
                                         _padded([returns[i] for i in mb], a_max, v.device), mask,
                                         self.algo.value_clip_eps, loss_denominator=step_tokens)
                self.engine.backward(loss * self.world_size, scale_wrt_gas=False)  # as in PolicyWorker.train
                grad_norm = self._step()
                acc["critic/value_loss"] += loss.item()
                acc["critic/clipfrac"] += stats["clipfrac"] * mask.sum().item() / step_tokens
            acc["critic/grad_norm"] = grad_norm
            acc["critic/lr"] = lr
            metrics.append(acc)
        metrics = self._global_metrics(metrics, ("critic/value_loss", "critic/clipfrac"))
        self.state_version, self.dirty = new_version, False
        return metrics


class ReferenceWorker(RunActor):
    """The frozen reference policy π_ref: a plain HF model in eval mode, no optimizer, no DeepSpeed; on cuda:0 when
    the actor was given a GPU (it shares the policy's `num_gpus`), else on the CPU."""

    def __init__(self, model_path: str, dtype: str, trainer: TrainerConfig):
        """`trainer`: the policy's config section, whose micro-batching, packing and threads the reference uses."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(trainer.num_threads)
        self.cfg = trainer
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.pad_id = AutoTokenizer.from_pretrained(model_path).pad_token_id
        attention, self.packing = _attention(trainer.packing)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=_torch_dtype(dtype),
                                                          attn_implementation=attention).to(self.device).eval()
        if trainer.compile:
            _compile_layers(self.model, "policy.compile")

    def logprobs(self, table, threads: int | None = None) -> list[list[float]]:
        """log π_ref(a_t|s_t) for every response token; `threads`: torch threads for this call (None: the
        constructor's)."""
        import torch

        _use_threads(threads, self.cfg.num_threads)
        how = "packed" if self.packing else "shared" if _shares_prompts(self.cfg) else "padded"
        out = [None] * table.num_rows
        with torch.no_grad():
            for idx in _micro_batches(self.cfg, np.arange(table.num_rows), _lengths(table)):
                rows = table.take(idx)  # a token budget groups rows by length: each result goes back to its row
                for i, row in zip(idx, _rows(*forward_logprobs(self.model, rows["prompt_ids"].to_pylist(),
                                                               rows["response_ids"].to_pylist(), self.pad_id,
                                                               self.device, how))):
                    out[i] = row
        return out


if __name__ == "__main__":
    import pyarrow as pa

    ref = ReferenceWorker(sys.argv[1], "float32", TrainerConfig(micro_batch_size=4, num_threads=2))
    demo = pa.table({"prompt_ids": [[1, 2, 3]], "response_ids": [[4, 5]]})
    print("reference logprobs:", ref.logprobs(demo))
