"""Where object storage is reached (pydantic models only); credentials never appear here.

Credentials come from the standard chains only (environment variables, ~/.aws/credentials, instance or pod roles
for S3; application-default credentials for GCS), so that no job file or provenance record ever holds one.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator


class StorageConfig(BaseModel):
    """The `storage` section of a job: the S3 endpoint for on-premises object stores (MinIO, Ceph)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    s3_endpoint_url: str | None = Field(
        None,
        description="S3 API endpoint, e.g. http://minio.lab:9000, for s3:// volumes of an on-premises store; "
        "None = the AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL environment variable, else AWS itself.",
    )

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL such as http://minio.lab:9000")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "must not hold credentials: give them as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, in "
                "~/.aws/credentials or through an instance role"
            )
        if parts.query or parts.fragment:
            raise ValueError("must be a bare endpoint without a query or fragment, such as http://minio.lab:9000")
        return value.rstrip("/")
