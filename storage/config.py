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
