"""How every part of mitoseg reaches storage: fsspec filesystems, the S3 endpoint, credentials, redaction.

One place that turns a storage URL (`file:///…`, `s3://…`, `gs://…`, `memory://…`) into an fsspec filesystem
and a path on it, so that volumes and the run state beside them (done-records, leases) use the same storage.

The S3 endpoint (on-premises S3 such as MinIO or Ceph) is the standard `AWS_ENDPOINT_URL_S3` or
`AWS_ENDPOINT_URL` environment variable, which boto3 (cloud-files, cloud-volume), aiobotocore (s3fs) and every
AWS tool read; a job's `storage.s3_endpoint_url` sets it for this process (`configure`) and the Dask workers get
the client's value through `workers.storage_plugin`. Credentials are never handled here: each process finds its
own through the standard chains (environment, ~/.aws, instance roles; for GCS application-default credentials).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from pipeline.errors import StorageError

ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
"""Where botocore looks for the S3 endpoint, the service-specific name first."""

# botocore >= 1.36 sends CRC checksums on every request by default, which many S3-compatible stores refuse;
# cloud-files turns them off for an explicit endpoint, and so do we for every client of an on-premises store.
CHECKSUM_VARIABLES = ("AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION")

# user info: a user, and a password that may hold '/' (AWS secrets do) but is not a port followed by a path
_USERINFO = re.compile(
    r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^\s/?#@:'\"]*(?::(?!/)(?!\d+(?:[/?#\s'\"]|$))[^\s@'\"]*)?@"
)
_SECRET_PARAMETER = re.compile(
    r"(?P<name>[?&;](?:x-(?:amz|goog)-(?:signature|credential|security-token)|signature|awsaccesskeyid|sig|"
    r"[\w-]*token|[\w-]*secret|password|api[_-]?key|key)=)[^&;#\s'\"]*",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """`text` with the credentials of any URL in it removed: user info, and signed or secret query values.

    `s3://KEY:SECRET@bucket/x` becomes `s3://bucket/x`, `https://h/f?X-Amz-Signature=abc` becomes
    `https://h/f?X-Amz-Signature=REDACTED`; used for provenance records, log lines and printed commands.
    """
    return _SECRET_PARAMETER.sub(r"\g<name>REDACTED", _USERINFO.sub(r"\g<scheme>", text))


class RedactingFilter(logging.Filter):
    """Removes URL credentials from a log record's message (`redact`) before any handler sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:  # the traceback, formatted as handlers would, then cleaned
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


def redact_logs(logger: logging.Logger | None = None) -> None:
    """Install a RedactingFilter on every handler of `logger` (the root logger by default), once."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def s3_endpoint() -> str | None:
    """The S3 endpoint of this process, from the environment as botocore reads it; None means AWS itself."""
    for name in ENDPOINT_VARIABLES:
        if os.environ.get(name):
            return os.environ[name]
    return None


def configure(s3_endpoint_url: str | None = None) -> None:
    """Prepare this process's environment for object storage; `s3_endpoint_url` overrides the environment's.

    Sets the endpoint variable (read by every S3 client this process and the local workers it starts create),
    turns off request checksums for a custom endpoint unless the environment chose, and gives environment
    credentials an empty session token when they have none: cloud-files (6.x) fails without one.
    """
    if s3_endpoint_url:
        os.environ[ENDPOINT_VARIABLES[0]] = s3_endpoint_url
    if s3_endpoint() is not None:
        for name in CHECKSUM_VARIABLES:
            os.environ.setdefault(name, "when_required")
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault("AWS_SESSION_TOKEN", "")


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for `url`: the S3 endpoint for s3://; credentials are left to the standard chains."""
    endpoint = s3_endpoint()
    if url.startswith("s3://") and endpoint is not None:
        return {"endpoint_url": endpoint}
    return {}


class MissingFilesystemError(StorageError):
    """The fsspec implementation for a URL's protocol is not installed (e.g. gcsfs for gs://)."""


def browser_location(location: str) -> str:
    """`location` as a browser (Neuroglancer) reaches it: s3:// on a custom endpoint becomes `ENDPOINT/bucket/key`.

    Neuroglancer reads `s3://bucket` from AWS only and cannot be told an endpoint; path-style https works on
    every S3-compatible store. Other locations are returned as they are.
    """
    endpoint = s3_endpoint()
    if endpoint is None or not location.startswith("s3://"):
        return location
    return f"{endpoint.rstrip('/')}/{location[len('s3://') :]}"


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of `url` and the path on it."""
    import fsspec.core

    try:
        fs, path = fsspec.core.url_to_fs(url, **storage_options(url))
    except ImportError as err:
        raise MissingFilesystemError(
            f"cannot reach {redact(url)}: {err}; install mitoseg[cloud] for s3:// and gs://"
        ) from err
    return fs, path
