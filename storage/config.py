"""Storage settings of a run."""

from pydantic import BaseModel, ConfigDict, Field, field_validator

CREDENTIAL_OPTIONS = frozenset({
    "key", "secret", "token", "password", "session_token", "access_key", "secret_key",  # s3fs, generic
    "aws_access_key_id", "aws_secret_access_key", "aws_session_token",  # botocore (client_kwargs)
    "account_key", "sas_token", "connection_string", "client_secret", "credential",  # adlfs
})
"""storage_options keys that carry credentials: refused, because the config is stored in run.json, logged to the
trackers and shown as a Prefect flow parameter."""


class StorageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    root: str = "runs"
    """fsspec URI of the storage root (a local folder, `memory://...`, `s3://bucket/prefix`); runs live in
    `{root}/{run_id}` (runs started before that layout stay in `{root}/runs/{run_id}` and are found there)."""

    storage_options: dict = Field(default_factory=dict)
    """Keyword arguments for the fsspec filesystem (`endpoint_url`, `anon`, `profile`, `client_kwargs`, ...).
    Credentials are refused here (keys such as `key`, `secret`, `token`; see CREDENTIAL_OPTIONS): they come from
    the environment of the driver and the Ray workers (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...)."""

    rows_per_part: int = Field(65536, gt=0)
    """Rows per Parquet part file of a stage output."""

    keep_checkpoints: int | None = Field(None, ge=1)
    """Keep the newest K complete checkpoints (DeepSpeed state + HF export); older ones are deleted once a newer one
    is complete. None keeps all. Checkpoints still being written never count, the newest complete one (what a
    resume replays from) is never deleted, nor is a pinned one (a lineage's final policy). Resuming needs only the
    newest, so 1 is safe; evaluating an old iteration later needs its checkpoint."""

    @field_validator("storage_options")
    @classmethod
    def _no_credentials(cls, v: dict) -> dict:
        found = sorted(_credential_paths(v))
        if found:
            raise ValueError(
                f"{', '.join(found)} would put credentials in the config, which is stored in the run's run.json, "
                "sent to the trackers and shown as a Prefect flow parameter. Remove them and set them in the "
                "environment of the driver and the Ray workers instead: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                "(/ AWS_SESSION_TOKEN) or AWS_PROFILE for s3://, the filesystem's own variables for others")
        return v


class CheckpointConfig(BaseModel):
    """How often the trainers' state is written. Between checkpoints nothing is lost: every iteration's experience
    table is committed, so a resumed run loads the newest complete checkpoint and replays the committed updates after
    it from storage (same seeds, same micro-batch order: the same weights), without generating, scoring or calling a
    reward again. K trades the I/O of every iteration against the replay a crash costs: at most K − 1 updates."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    every: int = Field(1, ge=1)
    """Write a checkpoint (DeepSpeed state of policy and critic) after every K-th iteration's update, and after the
    last iteration. 1 writes one every iteration. Operational: a resumed run may change it."""

    hf_every: int | None = Field(None, ge=1)
    """Write the HF export of the policy (`checkpoints/iter-N/hf`, what `from_pretrained` and the `storage` weight
    sync load) after every K-th iteration, and after the last; None: with every checkpoint. It needs no DeepSpeed
    state, so it may be more frequent than `every` (a serving stack picking up policies) or rarer."""

    background: bool = True
    """Write checkpoints in a background thread of each trainer: the update stage waits only for a copy of the state
    in host memory, and the next iterations run while the files are written. A checkpoint is trusted once every
    part of it is written (its own commit marker); a crash before that only means replaying from the previous one.
    The last iteration's checkpoint is always waited for."""


def _credential_paths(options: dict, prefix: str = "") -> list[str]:
    """Dotted paths of the credential keys in `options`, nested dicts (client_kwargs, config_kwargs) included."""
    found = []
    for k, v in options.items():
        if str(k).lower() in CREDENTIAL_OPTIONS:
            found.append(f"{prefix}{k}")
        elif isinstance(v, dict):
            found += _credential_paths(v, f"{prefix}{k}.")
    return found
