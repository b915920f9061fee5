"""Object-store prefixes (s3://, gs://, abfs://) as stores, through pyarrow.fs.

Why pyarrow.fs: it is already a dependency, it is what Ray Train and Ray Data use for the same
URIs (one set of credentials and endpoints for merging and tuning), its S3 and GCS clients are
native and release the GIL during reads, so several range requests run in parallel from
threads. Credentials and endpoints come from the environment the ecosystem uses (AWS_*,
GOOGLE_APPLICATION_CREDENTIALS, Azure's), present on every node; the recipe's `storage:` block
says what the environment cannot (an endpoint, a region, anonymous access)."""

from __future__ import annotations

import os
from functools import lru_cache

from raymerge.errors import SourceError
from raymerge.store.base import FileFacts, StoreUnavailableError, Transient, with_retries
from raymerge.store.ranges import PART_BYTES, read_in_parts
from raymerge.store.settings import StorageSettings

SCHEMES = ("s3", "gs", "gcs", "abfs", "az")

# pyarrow raises OSError for everything; these say the input is wrong (not worth a retry)
# refusals: credentials, permissions, a missing bucket
REFUSALS = ("ACCESS_DENIED", "AccessDenied", "NoSuchBucket", "NO_SUCH_BUCKET",
            "InvalidAccessKeyId", "SignatureDoesNotMatch", "INVALID_ACCESS_KEY_ID",
            "SIGNATURE_DOES_NOT_MATCH", "Forbidden", "HTTP status 403", "HTTP status 401",
            "PermissionDenied", "Unauthenticated", "ExpiredToken", "EXPIRED_TOKEN", "InvalidToken")
_NOT_FOUND = ("does not exist", "NoSuchKey", "NO_SUCH_KEY", "RESOURCE_NOT_FOUND",
              "HTTP status 404", "Not Found")
_USER_ERRORS = REFUSALS + _NOT_FOUND
_SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID",
                     "HF_TOKEN", "AZURE_STORAGE_ACCOUNT_KEY")


def scheme_of(location: str) -> str | None:
    scheme, separator, _ = location.partition("://")
    return scheme.lower() if separator and scheme.lower() in SCHEMES else None


def without_secrets(text: str) -> str:
    """An error message with any credential from the environment blanked out."""
    for variable in _SECRET_VARIABLES:
        secret = os.environ.get(variable)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return " ".join(text.split())


def classify(error: OSError, where: str, fix: str) -> Exception:
    """A SourceError (the input is wrong: one line, exit 2) or Transient (retried)."""
    message = without_secrets(str(error))
    if any(marker in message for marker in _USER_ERRORS):
        return SourceError(f"{where}: {message[:300]}; {fix}")
    return Transient(message[:300])


@lru_cache(maxsize=16)
def _filesystem(scheme: str, endpoint: str | None, region: str | None, anonymous: bool,
                authority: str):
    from pyarrow import fs

    if scheme == "s3":
        options = {"anonymous": anonymous, "region": region,
            "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=2),
            "connect_timeout": 5, "request_timeout": 60}
        if endpoint:
            scheme_part, _, host = endpoint.partition("://")
            options["endpoint_override"] = host or scheme_part
            options["scheme"] = scheme_part if host else "https"
        return fs.S3FileSystem(**options)
    if scheme in ("gs", "gcs"):
        return fs.GcsFileSystem(anonymous=anonymous, **({"endpoint_override": endpoint}
                                                        if endpoint else {}))
    filesystem, _ = fs.FileSystem.from_uri(f"{scheme}://{authority}")
    return filesystem


def filesystem_for(location: str, storage: StorageSettings):
    """(pyarrow filesystem, path inside it) for an object-store URI."""
    scheme = scheme_of(location)
    rest = location.split("://", 1)[1].strip("/")
    authority = rest.split("/", 1)[0] if scheme in ("abfs", "az") else ""
    endpoint, region = storage.endpoint, storage.region
    if scheme == "s3":  # the environment's, resolved here: it is part of the cache's key
        endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or \
            os.environ.get("AWS_ENDPOINT_URL")
        region = region or os.environ.get("AWS_DEFAULT_REGION") or \
            os.environ.get("AWS_REGION") or "us-east-1"
    filesystem = _filesystem(scheme, endpoint, region, storage.anonymous, authority)
    return filesystem, rest


def read_object(uri: str, storage: StorageSettings) -> bytes:
    """A whole (small) object: FileNotFoundError when absent, OSError with the store's reason
    (secrets blanked) when it refuses; transient errors retried."""
    filesystem, path = filesystem_for(uri, storage)

    def attempt():
        try:
            with filesystem.open_input_stream(path) as stream:
                return stream.read()
        except FileNotFoundError:
            raise
        except OSError as error:
            message = without_secrets(str(error))
            if any(marker in message for marker in _NOT_FOUND):
                raise FileNotFoundError(uri) from None
            if any(marker in message for marker in REFUSALS):
                raise OSError(f"{uri}: {message[:300]}") from None
            raise Transient(message[:300]) from None
    try:
        return with_retries(attempt, uri, storage.retries)
    except StoreUnavailableError as error:
        raise OSError(f"{uri}: the store did not answer ({error.reason})") from None


class ObjectFile:
    """One object's bytes by range: a read is split into parts fetched in parallel (one
    stream stalls near 100 MB/s; parallel ranges reach the network's speed), each retried
    with backoff on a transient error."""

    def __init__(self, uri: str, storage: StorageSettings) -> None:
        self.uri = uri
        self.storage = storage
        self.filesystem, self.path = filesystem_for(uri, storage)
        self.handle = None
        self.fetched_bytes = 0

    def _open(self):
        if self.handle is None:
            self.handle = self.filesystem.open_input_file(self.path)
        return self.handle

    def _read_part(self, view: memoryview, offset: int) -> None:
        def attempt():
            try:
                data = self._open().read_at(len(view), offset)
            except OSError as error:
                self.handle = None  # a reset connection: reopen on the next attempt
                raise classify(error, self.uri, "check the URI and the credentials") from None
            if len(data) != len(view):
                raise OSError(f"{self.uri}: unexpected end of object at byte {offset + len(data)}")
            view[:] = data
        with_retries(attempt, self.uri, self.storage.retries)

    def read_into(self, view: memoryview, offset: int) -> None:
        read_in_parts(view, offset, self._read_part, PART_BYTES,
                      self.storage.ranges_in_flight)
        self.fetched_bytes += len(view)

    def close(self) -> None:
        self.handle = None


class ObjectStore:
    remote = True

    def __init__(self, label: str, storage: StorageSettings) -> None:
        self.label = label
        self.storage = storage
        self.root = label.rstrip("/")
        self.filesystem, self.path = filesystem_for(label, storage)

    def _call(self, what, fix: str):
        """what() on the driver, retried; a store that never answers is the recipe's problem
        here (a wrong endpoint, or no network): nothing has started, so nothing to keep."""
        def attempt():
            try:
                return what()
            except OSError as error:
                raise classify(error, f"source {self.label}", fix) from None
        try:
            return with_retries(attempt, f"source {self.label}", self.storage.retries)
        except StoreUnavailableError as error:
            raise SourceError(
                f"source {self.label}: the store did not answer after {self.storage.retries} "
                f"attempts ({error.reason}); check storage.endpoint (or AWS_ENDPOINT_URL), "
                "the region and the network") from None

    def files(self) -> dict[str, FileFacts]:
        from pyarrow import fs

        selector = fs.FileSelector(self.path, recursive=True, allow_not_found=True)
        infos = self._call(lambda: self.filesystem.get_file_info(selector),
                           "check the URI, the endpoint and the credentials")
        found = {}
        for info in infos:
            if info.type == fs.FileType.File:
                name = info.path[len(self.path):].lstrip("/")
                found[name] = FileFacts(info.size, self._identity(info.path, info))
        return found

    def _identity(self, path: str, info) -> str:
        """The object's version id or ETag (from a HEAD), else its modification time."""
        try:
            metadata = self._call(lambda: self.filesystem.open_input_file(path).metadata(),
                                  "check the credentials")
        except SourceError:
            metadata = {}
        for key, prefix in ((b"VersionId", "version"), (b"ETag", "etag"),
                            ("VersionId", "version"), ("ETag", "etag")):
            value = metadata.get(key) if metadata else None
            if value:
                value = value.decode() if isinstance(value, bytes) else value
                return f"{prefix}:{value.strip(chr(34))}"
        mtime = info.mtime_ns if info.mtime_ns is not None else 0
        return f"mtime:{mtime}"

    def read(self, name: str) -> bytes:
        def read_all():
            with self.filesystem.open_input_stream(f"{self.path}/{name}") as stream:
                return stream.read()
        return self._call(read_all, f"check that {name} exists under {self.label}")

    def uri(self, name: str) -> str:
        return f"{self.root}/{name}"

    def open(self, name: str) -> ObjectFile:
        return ObjectFile(self.uri(name), self.storage)
