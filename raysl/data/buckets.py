"""One look at a bucket before a command starts work: the bucket is there, the credentials are
accepted, the endpoint answers. A wrong bucket name, a stale key or an endpoint that is down
is then one line naming the path, before Ray starts, instead of a worker's traceback after
pyarrow has retried for a while.

Local paths are not checked here (each command checks its own folders). Only the bucket is
looked at, never a key under it, so a path that does not exist yet (an --out, a run to
start) passes. The credentials are never part of a message."""

from __future__ import annotations

import os

from raysl.errors import UserError

# pyarrow's S3 client otherwise retries a refused connection for seconds and a silent one
# for minutes; one short try is enough to tell a user their endpoint is wrong
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 20.0
_DENIED = ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden", "403")
_UNREACHABLE = ("NETWORK_CONNECTION", "Could not connect", "curlCode", "timed out", "Timeout", "resolve host")


def _probe_filesystem(uri: str):
    """A filesystem for the URI that fails at once: S3 with one try and short timeouts,
    any other scheme as pyarrow opens it."""
    import pyarrow.fs as pafs

    from raysl.data.schema import filesystem_and_path

    if not uri.startswith("s3://"):
        return filesystem_and_path(uri)[0]
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:  # AWS itself: pyarrow finds the bucket's region, as for every other call
        return filesystem_and_path(uri)[0]
    return pafs.S3FileSystem(
        endpoint_override=endpoint,
        connect_timeout=CONNECT_TIMEOUT_S,
        request_timeout=REQUEST_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
    )


def bucket_of(uri: str) -> str:
    return uri.split("://", 1)[1].split("/", 1)[0]


def check_bucket(uri: str, what: str) -> None:
    """A UserError naming `what` (e.g. "data.shards" or "--out") and the URI when its bucket
    is missing, refuses the credentials or cannot be reached; nothing for a local path."""
    if "://" not in uri or uri.startswith("file://"):
        return
    import pyarrow.fs as pafs

    bucket = bucket_of(uri)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the default endpoint"
    try:
        info = _probe_filesystem(uri).get_file_info(bucket)
    except UserError as exc:  # pyarrow cannot open the URI at all
        raise UserError(f"{what} {exc}") from None
    except OSError as exc:
        text = str(exc)
        if any(s in text for s in _DENIED):
            raise UserError(
                f"{what} {uri}: the storage at {endpoint} refused these credentials for bucket {bucket!r}; "
                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) to a key that may read and write it"
            ) from None
        if any(s in text for s in _UNREACHABLE):
            raise UserError(
                f"{what} {uri}: cannot reach the storage at {endpoint}; "
                "check AWS_ENDPOINT_URL (unset for AWS itself) and the network"
            ) from None
        raise UserError(f"{what} {uri}: cannot read bucket {bucket!r} at {endpoint} ({text.splitlines()[0]})") from None
    if info.type == pafs.FileType.NotFound:
        raise UserError(
            f"{what} {uri}: there is no bucket {bucket!r} at {endpoint}; create it or fix the path "
            "(AWS_ENDPOINT_URL names the storage service)"
        )


def check_buckets(paths: dict[str, str | list[str]]) -> None:
    """`check_bucket` once per bucket of every path, in order: {what: path or paths}."""
    seen = set()
    for what, value in paths.items():
        for uri in [value] if isinstance(value, str) else value:
            if not uri or "://" not in uri:
                continue
            key = uri.split("://", 1)[0] + "://" + bucket_of(uri)
            if key not in seen:
                seen.add(key)
                check_bucket(uri, what)
