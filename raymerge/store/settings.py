"""The recipe's `storage:` block: what the environment cannot say about where models live.
Credentials are never here: they come from the environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS,
HF_TOKEN), present on every node, and never reach an output or a log line."""

from __future__ import annotations

from pydantic import Field

from raymerge.settings import StrictModel


class StorageSettings(StrictModel):
    endpoint: str | None = None  # an S3-compatible endpoint (else AWS_ENDPOINT_URL)
    region: str | None = None  # else AWS_DEFAULT_REGION / AWS_REGION, else us-east-1
    anonymous: bool = False  # public buckets: no signing
    retries: int = Field(5, ge=1, le=20)  # attempts at a request that fails transiently
    ranges_in_flight: int = Field(8, ge=1, le=64)  # parallel range requests per read
