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
    """Keep the checkpoints (DeepSpeed state + HF export) of the newest K committed iterations; older ones are
    deleted once a new one is committed. None keeps all. A pinned checkpoint (a lineage's final policy) is never
    deleted. Resuming needs only the newest, so 1 is safe; evaluating an old iteration later needs its checkpoint."""

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


def _credential_paths(options: dict, prefix: str = "") -> list[str]:
    """Dotted paths of the credential keys in `options`, nested dicts (client_kwargs, config_kwargs) included."""
    found = []
    for k, v in options.items():
        if str(k).lower() in CREDENTIAL_OPTIONS:
            found.append(f"{prefix}{k}")
        elif isinstance(v, dict):
            found += _credential_paths(v, f"{prefix}{k}.")
    return found
