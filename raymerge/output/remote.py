"""An output at an object-store prefix (s3://, gs://, abfs://): staged beside it, published
manifest last.

Object stores have no rename, so an output is built under a staging prefix beside the target,
`.NAME.raymerge-staging/`, which also holds the merge's progress (which shards are uploaded and
which units they complete). A driver on a new cluster with an empty disk resumes from it. To
publish, the new files are copied inside the store (server-side) over the target, the manifest
last: an output without `raymerge_manifest.json` is incomplete to every reader. A previous output
stays whole until the new one is complete in staging; between removing its manifest and copying
the new one (seconds: copies inside the store) the target reads as incomplete, never as a mix.

Errors: wrong credentials or a missing bucket are the recipe's (OutputError, one line); a store
that does not answer after the retries is not (StoreUnavailableError: exit 3, staging kept)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from raymerge.errors import OutputError
from raymerge.output.progress_log import PROGRESS_NAME
from raymerge.output.staging import MANIFEST_NAME
from raymerge.store.base import StoreUnavailableError, Transient, with_retries
from raymerge.store.objects import REFUSALS, filesystem_for, without_secrets
from raymerge.store.settings import StorageSettings

PROGRESS_OBJECT = "raymerge_progress.json"  # in staging: one object, replaced whole
_FORMAT = "raymerge-remote-progress/1"
_UPLOAD_CHUNK = 16 << 20
_SERVER_COPY_LIMIT = 5 << 30  # S3's CopyObject takes at most 5 GiB; larger objects stream


class RemoteOutput:
    """The output's target prefix and its staging prefix, with the few operations a merge
    needs; picklable (the writer actor gets one)."""

    def __init__(self, uri: str, storage: StorageSettings) -> None:
        self.uri = uri.rstrip("/")
        self.storage = storage
        parent, _, name = self.uri.rpartition("/")
        if not name or "://" not in parent:
            raise OutputError(f"output {uri}: give a prefix inside a bucket, "
                              "e.g. s3://bucket/models/merged")
        self.staging_uri = f"{parent}/.{name}.raymerge-staging"

    # --- paths and calls -------------------------------------------------------------------
    def _path(self, uri: str):
        return filesystem_for(uri, self.storage)

    def _call(self, what, where: str):
        """what(filesystem) retried on transient errors; a refusal is the recipe's error."""
        filesystem, _ = self._path(self.uri)

        def attempt():
            try:
                return what(filesystem)
            except OSError as error:
                message = without_secrets(str(error))[:300]
                if any(marker in message for marker in REFUSALS):
                    raise OutputError(f"output {self.uri}: {message} ({where}); check the "
                                      "URI, the credentials and that the bucket exists") from None
                raise Transient(message) from None
        return with_retries(attempt, f"output {self.uri} ({where})", self.storage.retries)

    def _listing(self, uri: str) -> dict[str, int]:
        """File name (relative to uri) -> size, for every object under uri."""
        from pyarrow import fs

        _, root = self._path(uri)
        selector = fs.FileSelector(root, recursive=True, allow_not_found=True)
        infos = self._call(lambda filesystem: filesystem.get_file_info(selector), "listing")
        return {info.path[len(root):].lstrip("/"): info.size for info in infos
                if info.type == fs.FileType.File}

    def _read_json(self, uri: str) -> dict | None:
        from pyarrow import fs

        _, path = self._path(uri)

        def read(filesystem):
            if filesystem.get_file_info(path).type != fs.FileType.File:
                return None
            with filesystem.open_input_stream(path) as stream:
                return stream.read()
        data = self._call(read, f"reading {uri.rsplit('/', 1)[-1]}")
        try:
            return json.loads(data) if data is not None else None
        except ValueError:
            return None

    def _write_bytes(self, uri: str, data: bytes) -> None:
        _, path = self._path(uri)

        def write(filesystem):
            with filesystem.open_output_stream(path) as stream:
                stream.write(data)
        self._call(write, f"writing {uri.rsplit('/', 1)[-1]}")

    def upload(self, local: Path, name: str) -> None:
        """A local file to staging/name: one streamed (multipart) upload, retried whole."""
        _, path = self._path(f"{self.staging_uri}/{name}")

        def write(filesystem):
            with open(local, "rb") as source, filesystem.open_output_stream(path) as stream:
                while chunk := source.read(_UPLOAD_CHUNK):
                    stream.write(chunk)
        self._call(write, f"uploading {name}")

    # --- before the merge ------------------------------------------------------------------
    def check(self, inputs: list[str]) -> None:
        """Refuse a target overlapping an input, or holding something that is not a raymerge
        output (no manifest, no staging of one), before any work."""
        for location in inputs:
            location = location.rstrip("/")
            if self.uri == location or self.uri.startswith(location + "/") or \
                    location.startswith(self.uri + "/"):
                raise OutputError(f"output {self.uri} overlaps input {location}; choose another "
                                  "output.path")
        try:
            self._check_bucket()
            present = self._listing(self.uri)
            if present and MANIFEST_NAME not in present and \
                    PROGRESS_OBJECT not in self._listing(self.staging_uri):
                raise OutputError(f"output {self.uri} holds files and is not a raymerge output; "
                                  "choose an empty or new prefix")
        except StoreUnavailableError as error:
            raise OutputError(f"output {self.uri}: the store did not answer ({error.reason}); "
                              "check storage.endpoint (or AWS_ENDPOINT_URL) and the network"
                              ) from None

    def _check_bucket(self) -> None:
        """A missing bucket is a typo, not something to create (some servers would)."""
        from pyarrow import fs

        _, path = self._path(self.uri)
        bucket = path.split("/", 1)[0]
        found = self._call(lambda filesystem: filesystem.get_file_info(bucket), "its bucket")
        if found.type == fs.FileType.NotFound:
            raise OutputError(f"output {self.uri}: bucket {bucket} does not exist; create it or "
                              "fix output.path")

    # --- the progress of a merge, in staging -----------------------------------------------
    def progress(self, key: str) -> dict | None:
        """{"shards": [uploaded shard names], "units": {unit: record}} of an interrupted merge
        with this resume key; None when there is none (staging of another merge is cleared)."""
        found = self._read_json(self._progress_uri)
        if not found or found.get("format") != _FORMAT or found.get("key") != key:
            if self._listing(self.staging_uri):
                self.discard()
            return None
        return {"shards": list(found["shards"]),
                "units": {int(unit): record for unit, record in found["units"].items()}}

    def save_progress(self, key: str, shards: list[str], units: dict[int, dict]) -> None:
        """Replace the progress object (one PUT: atomic) after shards and factors are stored."""
        self._write_bytes(self._progress_uri, json.dumps({
            "format": _FORMAT, "key": key, "shards": sorted(shards),
            "units": {str(unit): record for unit, record in sorted(units.items())}}).encode())

    @property
    def _progress_uri(self) -> str:
        return f"{self.staging_uri}/{PROGRESS_OBJECT}"

    # --- after the merge -------------------------------------------------------------------
    def publish(self, directory: Path, shards: list[str]) -> None:
        """The local files (metadata, index, card; the shards and factors were uploaded as they
        were finished, and removed here) to staging, then staging over the target, manifest
        last; the previous output's other files go."""
        local = {path.relative_to(directory).as_posix(): path
                 for path in sorted(directory.rglob("*")) if path.is_file()}
        local.pop(PROGRESS_NAME, None)
        for name, path in local.items():
            self.upload(path, name)
        staged = self._listing(self.staging_uri)
        staged.pop(PROGRESS_OBJECT, None)
        missing = (set(local) | set(shards)) - set(staged)
        if missing:
            raise OutputError(f"output {self.uri}: {sorted(missing)[0]} is missing from "
                              f"{self.staging_uri}; rerun the same command")
        previous = self._listing(self.uri)
        if MANIFEST_NAME in previous:
            self._delete(f"{self.uri}/{MANIFEST_NAME}")  # incomplete from here on
        for name in sorted(set(previous) - set(staged)):
            self._delete(f"{self.uri}/{name}")
        for name, size in sorted(staged.items()):
            if name != MANIFEST_NAME:
                self._copy(name, size)
        self._copy(MANIFEST_NAME, staged[MANIFEST_NAME])  # the mark of a complete output
        self.discard()

    def _copy(self, name: str, size: int) -> None:
        _, source = self._path(f"{self.staging_uri}/{name}")
        _, target = self._path(f"{self.uri}/{name}")
        if size <= _SERVER_COPY_LIMIT:
            self._call(lambda filesystem: filesystem.copy_file(source, target),
                       f"publishing {name}")
            return

        def stream(filesystem):  # through this node: S3 copies at most 5 GiB in one request
            with filesystem.open_input_stream(source) as reader, \
                    filesystem.open_output_stream(target) as writer:
                while chunk := reader.read(_UPLOAD_CHUNK):
                    writer.write(chunk)
        self._call(stream, f"publishing {name}")

    def _delete(self, uri: str) -> None:
        _, path = self._path(uri)
        self._call(lambda filesystem: filesystem.delete_file(path), "replacing the output")

    def discard(self) -> None:
        """Remove the staging prefix (a finished or failed merge's)."""
        from pyarrow import fs

        _, path = self._path(self.staging_uri)

        def delete(filesystem):  # the prefix's directory marker too, where the store keeps one
            if filesystem.get_file_info(path).type != fs.FileType.NotFound:
                filesystem.delete_dir(path)
        self._call(delete, "removing its staging")

    def published_id(self) -> str | None:
        """The submission id of the complete output at the target, or None."""
        manifest = self._read_json(f"{self.uri}/{MANIFEST_NAME}")
        return manifest.get("submission_id") if isinstance(manifest, dict) else None


def local_directory(uri: str) -> Path:
    """Where the writer's node stages an output bound for a store: RAYMERGE_STAGING (a
    node-local disk with room for the shards being filled), else the system's temporary
    directory; one directory per output URI."""
    root = Path(os.environ.get("RAYMERGE_STAGING") or tempfile.gettempdir()) / "raymerge-outputs"
    return root / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16] / \
        uri.rstrip("/").rsplit("/", 1)[-1]
