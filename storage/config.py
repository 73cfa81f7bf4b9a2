"""Storage settings of a run."""

from pydantic import BaseModel, ConfigDict, Field


class StorageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: str = "runs"
    """fsspec URI of the storage root (a local folder, `memory://...`, `s3://bucket/prefix`); runs live in
    `{root}/runs/{run_id}`."""

    storage_options: dict = Field(default_factory=dict)
    """Keyword arguments for the fsspec filesystem (endpoint, anonymous, ...). Never put secrets here: credentials
    come from the environment."""

    rows_per_part: int = Field(65536, gt=0)
    """Rows per Parquet part file of a stage output."""

    keep_checkpoints: int | None = Field(None, ge=1)
    """Keep the checkpoints (DeepSpeed state + HF export) of the newest K committed iterations; older ones are
    deleted once a new one is committed. None keeps all. A pinned checkpoint (a lineage's final policy) is never
    deleted. Resuming needs only the newest, so 1 is safe; evaluating an old iteration later needs its checkpoint."""
