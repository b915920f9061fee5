"""Hugging Face Hub repos as stores: `org/name[@revision]` or `hf://org/name[@revision]`.

The revision is resolved once, on the driver, to its commit; every file is then named by an
https URL of that commit (`{endpoint}/{repo}/resolve/{commit}/{file}`), immutable, so any node
reads the same bytes by HTTP range requests (redirects to the CDN followed) with the token of
its own environment (HF_TOKEN). Identities are the Hub's: the commit, and each LFS file's
sha256 as the Hub publishes it. Nothing is downloaded whole but the small files."""

from __future__ import annotations

import http.client
import re
import urllib.error
import urllib.request
from pathlib import Path

from raymerge.errors import SourceError
from raymerge.store.base import FileFacts, Transient, with_retries
from raymerge.store.local import LocalStore
from raymerge.store.objects import without_secrets
from raymerge.store.ranges import PART_BYTES, read_in_parts
from raymerge.store.settings import StorageSettings

HUB_ID = re.compile(r"^(hf://)?(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(@(?P<revision>[\w./-]+))?$")


# what an offline merge takes from a cached snapshot: weights, configs (sentence-transformers'
# 1_Pooling/config.json too), tokenizers, chat templates, and a remote-code model's code
CACHED_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt",
                   "*.jinja", "*.py"]


def is_hub_id(location: str) -> bool:
    return bool(HUB_ID.match(location)) and not location.startswith((".", "/", "~"))


def _token() -> str | None:
    """HF_TOKEN, or the token `hf auth login` saved, on the node that reads."""
    from huggingface_hub import get_token

    return get_token()


def _transient_status(status: int) -> bool:
    return status in (408, 425, 429) or status >= 500


class HttpFile:
    """A file at an https URL, by range: parts fetched in parallel, retried when transient."""

    def __init__(self, url: str, storage: StorageSettings) -> None:
        self.url = url
        self.storage = storage
        self.fetched_bytes = 0

    def _read_part(self, view: memoryview, offset: int) -> None:
        def attempt():
            request = urllib.request.Request(
                self.url, headers={"Range": f"bytes={offset}-{offset + len(view) - 1}"})
            token = _token()
            if token:  # never sent on to the CDN a redirect points at
                request.add_unredirected_header("Authorization", f"Bearer {token}")
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    status, data = response.status, response.read()
            except urllib.error.HTTPError as error:
                if _transient_status(error.code):
                    raise Transient(f"HTTP {error.code}") from None
                raise SourceError(f"{self.url}: HTTP {error.code} reading bytes {offset}..; "
                                  "check the repository, the revision and HF_TOKEN") from None
            except (OSError, http.client.HTTPException) as error:  # refused, reset, timeout
                raise Transient(without_secrets(f"{type(error).__name__}: {error}")) from None
            if status == 200:  # a server that ignores Range
                data = data[offset:offset + len(view)]
            if len(data) != len(view):
                raise OSError(f"{self.url}: unexpected end of file at byte {offset + len(data)}")
            view[:] = data
        with_retries(attempt, self.url, self.storage.retries)

    def read_into(self, view: memoryview, offset: int) -> None:
        read_in_parts(view, offset, self._read_part, PART_BYTES,
                      self.storage.ranges_in_flight)
        self.fetched_bytes += len(view)

    def close(self) -> None:
        pass


class HubStore:
    remote = True

    def __init__(self, label: str, storage: StorageSettings) -> None:
        from huggingface_hub import constants

        match = HUB_ID.match(label)
        self.label = label
        self.storage = storage
        self.repo = match["repo"]
        self.requested = match["revision"]
        self.endpoint = constants.ENDPOINT.rstrip("/")
        info = self._model_info()
        self.revision = info.sha  # the commit: pins every file
        self._files = {
            sibling.rfilename: FileFacts(
                sibling.size or 0,
                f"sha256:{sibling.lfs.sha256}" if sibling.lfs else f"git:{sibling.blob_id}")
            for sibling in info.siblings or []}

    def _model_info(self):
        from huggingface_hub import HfApi
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        where = f"source {self.label}"

        def attempt():
            try:
                return HfApi(endpoint=self.endpoint).model_info(
                    self.repo, revision=self.requested, files_metadata=True)
            except RevisionNotFoundError:
                raise SourceError(f"{where}: revision {self.requested!r} does not exist on the "
                                  "Hub; check it") from None
            except GatedRepoError:
                raise SourceError(f"{where}: a gated repository; accept its terms on the Hub "
                                  "and set HF_TOKEN") from None
            except RepositoryNotFoundError:
                raise SourceError(f"{where}: no such Hub repository (or it is private: set "
                                  "HF_TOKEN, or run `hf auth login`)") from None
            except LocalEntryNotFoundError:
                raise SourceError(f"{where}: the Hub cannot be reached (HF_HUB_OFFLINE is set, "
                                  "or no network); give a local directory or go online") from None
            except HfHubHTTPError as error:
                status = error.response.status_code if error.response is not None else 0
                if status and not _transient_status(status):
                    raise SourceError(f"{where}: the Hub answered HTTP {status} "
                                      f"({without_secrets(str(error))[:200]}); check HF_TOKEN "
                                      "and the repository id") from None
                raise Transient(without_secrets(str(error))[:200]) from None
            except OSError as error:  # connection refused, DNS: a wrong HF_ENDPOINT or offline
                raise SourceError(f"{where}: cannot reach the Hub at {self.endpoint} "
                                  f"({without_secrets(str(error))[:200]}); check HF_ENDPOINT "
                                  "and the network") from None
        return with_retries(attempt, where, self.storage.retries)

    def files(self) -> dict[str, FileFacts]:
        return dict(self._files)

    def read(self, name: str) -> bytes:
        size = self._files[name].size
        if size == 0:
            return b""
        buffer = bytearray(size)
        self.open(name).read_into(memoryview(buffer), 0)
        return bytes(buffer)

    def uri(self, name: str) -> str:
        return f"{self.endpoint}/{self.repo}/resolve/{self.revision}/{name}"

    def open(self, name: str) -> HttpFile:
        return HttpFile(self.uri(name), self.storage)


def cached_snapshot(label: str) -> LocalStore:
    """With HF_HUB_OFFLINE set: the repo's snapshot in the local Hugging Face cache (weights,
    configs and tokenizer files), its revision pinned by the snapshot folder's commit name. The
    cache must then be on every node's path, as any local directory."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    match = HUB_ID.match(label)
    try:
        directory = Path(snapshot_download(match["repo"], revision=match["revision"],
                                           allow_patterns=CACHED_PATTERNS))
    except (LocalEntryNotFoundError, OSError):
        raise SourceError(
            f"source {label}: not in the local Hugging Face cache and the Hub cannot be reached "
            "(offline?); download it first, unset HF_HUB_OFFLINE, or give a local directory"
        ) from None
    store = LocalStore(label, directory)
    store.revision = directory.name  # the snapshot folder is named by the commit
    return store
