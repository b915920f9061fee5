"""A local server that speaks the Hugging Face Hub's protocol, for what huggingface_hub (2.4)
asks of it: `hf_hub_download`, `get_hf_file_metadata`, `HfApi.model_info(files_metadata=True)`,
`HfApi.get_paths_info`, `HfApi.list_repo_tree`, `HfFileSystem` (ls, info, open and ranged
reads), and plain ranged GETs on resolve URLs.

    GET/HEAD /{repo}/resolve/{revision}/{path}       small file: 200 (206 with Range), ETag = git
                                                     blob sha1; LFS file: 302 to the "CDN" with
                                                     X-Linked-Size, X-Linked-Etag, ETag = sha256
    GET/HEAD /lfs/{sha256} on the CDN port           the LFS bytes, with Range
    GET  /api/models/{repo}[/revision/{revision}]    sha, siblings (?blobs=true: size, blobId,
                                                     lfs {sha256, size, pointerSize})
    POST /api/models/{repo}/paths-info/{revision}    form field `paths` (repeated)
    GET  /api/models/{repo}/tree/{revision}[/{dir}]  ?recursive=true; one page, no cursor

Every resolve and API answer carries X-Repo-Commit. A repo has one fake commit (40 hex, from its
files) and answers to it and to `main`; any other revision is 404 RevisionNotFound. Errors as
the Hub: 404 + X-Error-Code RepoNotFound / RevisionNotFound / EntryNotFound; a private repo
without a token is 401 RepoNotFound; a token the server does not know is 401 "Invalid
credentials in Authorization header" (huggingface_hub raises a plain HfHubHTTPError for it).

`requests` logs each request served (method, path, Range, status, body bytes, CDN or not);
`fail_next(n)` answers the next n requests with a 503.

huggingface_hub 2.4 also GETs `/api/agent-harnesses` (its agent detection, at most once a day;
here a 404, which it ignores): expect it in the log.

LFS files are `*.safetensors` of at least `lfs_min_bytes` (1 MiB unless told). Their redirect
goes to a second port on 127.0.0.1: a different origin, as cdn-lfs/cas-bridge are for
huggingface.co. That matters: huggingface_hub 2.4 follows a HEAD redirect to the same origin
and then reads the metadata (X-Repo-Commit, ...) from the final answer; to another origin it
stops and reads it from the 302, which is what the real Hub gives it. No Xet headers are sent,
so downloads are plain HTTP even where hf_xet is installed.

Pointing huggingface_hub at it, inside one test: huggingface_hub reads HF_ENDPOINT and
HF_HUB_OFFLINE when it is imported (constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE,
constants.HF_HUB_OFFLINE; is_offline_mode() returns the constant), so setting the environment
in a running process changes nothing. `use_hub(monkeypatch, server)` patches those constants and
sets the environment variables (for child processes, such as Ray workers started afterwards).

Not implemented: `expand=true` details (last commit, security scan), tree pagination, refs other
than main (branches, tags, refs/pr/N), gated repos, Xet, uploads, datasets and spaces.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

CHUNK = 1 << 20
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")
MODEL_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<revision>[^/]+))?$")
TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<revision>[^/]+)(?:/(?P<path>.*))?$")
PATHS_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/paths-info/(?P<revision>[^/]+)$")
CDN = re.compile(r"^/lfs/(?P<sha256>[0-9a-f]{64})$")
RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass
class RepoFile:
    path: str
    local: Path
    size: int
    sha256: str
    blob_id: str  # git's blob sha1 of the content (what the Hub reports for non-LFS files)
    lfs: bool

    def folders(self) -> list[str]:
        parts = self.path.split("/")[:-1]
        return ["/".join(parts[:depth]) for depth in range(1, len(parts) + 1)]

    def sibling(self, blobs: bool) -> dict:
        entry: dict = {"rfilename": self.path}
        if blobs:
            entry |= {"size": self.size, "blobId": self.blob_id}
            if self.lfs:
                entry["lfs"] = {"sha256": self.sha256, "size": self.size, "pointerSize": 134}
        return entry

    def path_info(self) -> dict:
        entry = {"type": "file", "path": self.path, "size": self.size, "oid": self.blob_id}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": 134}
        return entry


@dataclass
class Repo:
    repo_id: str
    commit: str
    files: dict[str, RepoFile]
    private: bool = False


    def folders(self) -> set[str]:
        return {folder for file in self.files.values() for folder in file.folders()}

    def entries(self, paths: list[str]) -> list[dict]:
        """paths-info and tree entries: files and folders (a folder's oid is made up)."""
        folders = self.folders()
        found = []
        for path in paths:
            if path in self.files:
                found.append(self.files[path].path_info())
            elif path in folders:
                oid = hashlib.sha1(f"{self.commit}/{path}".encode()).hexdigest()
                found.append({"type": "directory", "path": path, "oid": oid})
        return found

    def tree(self, folder: str, recursive: bool) -> list[dict]:
        prefix = f"{folder}/" if folder else ""
        below = [path for path in sorted(self.folders() | set(self.files))
                 if path.startswith(prefix) and (recursive or "/" not in path[len(prefix):])]
        return self.entries(below)


@dataclass
class Request:
    """One request as served: what the tests assert on."""

    method: str
    path: str
    range: str | None
    status: int
    bytes_sent: int  # the body's length as sent (less if the client hung up early)
    cdn: bool


@dataclass
class HubState:
    repos: dict[str, Repo] = field(default_factory=dict)
    tokens: set[str] = field(default_factory=set)
    requests: list[Request] = field(default_factory=list)
    failures: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    cdn_url: str = ""


def describe_file(local: Path, path: str, lfs_min_bytes: int) -> RepoFile:
    sha256, sha1 = hashlib.sha256(), hashlib.sha1()
    size = local.stat().st_size
    sha1.update(b"blob %d\0" % size)
    with open(local, "rb") as stream:
        while chunk := stream.read(CHUNK):
            sha256.update(chunk)
            sha1.update(chunk)
    lfs = path.endswith(".safetensors") and size >= lfs_min_bytes
    return RepoFile(path, local, size, sha256.hexdigest(), sha1.hexdigest(), lfs)


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's client expects
    state: HubState
    cdn: bool

    def log_message(self, format, *args) -> None:  # noqa: A002 - silence stderr; see requests
        pass

    def do_HEAD(self) -> None:
        if not self.injected_failure():
            self.route(body=False)

    def do_GET(self) -> None:
        if not self.injected_failure():
            self.route(body=True)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode())
        if self.injected_failure():
            return
        match = PATHS_INFO.match(urlsplit(self.path).path)
        if self.cdn or not match:
            return self.error(404, None, "Not Found")
        repo = self.repo(match["repo"], unquote(match["revision"]))
        if repo is not None:
            self.send_json(repo.entries(form.get("paths", [])), repo)

    def route(self, body: bool) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        if self.cdn:
            match = CDN.match(path)
            file = self.lfs_file(match["sha256"]) if match else None
            if file is None:
                return self.error(404, None, "Not Found")
            return self.send_file(file, {"ETag": f'"{file.sha256}"'}, body)
        if match := RESOLVE.match(path):
            return self.resolve(match["repo"], unquote(match["revision"]), match["path"], body)
        if match := TREE.match(path):
            repo = self.repo(match["repo"], match["revision"])
            if repo is None:
                return
            folder = (match["path"] or "").strip("/")
            if folder and folder not in repo.folders():
                return self.error(404, "EntryNotFound", "Entry not found", repo)
            recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() == "true"
            return self.send_json(repo.tree(folder, recursive), repo, body)
        if match := MODEL_API.match(path):
            repo = self.repo(match["repo"], unquote(match["revision"] or "main"))
            if repo is not None:
                blobs = parse_qs(url.query).get("blobs", ["false"])[0].lower() == "true"
                self.send_json({"id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.commit,
                                "private": repo.private, "gated": False, "disabled": False,
                                "siblings": [file.sibling(blobs) for file in
                                             sorted(repo.files.values(), key=lambda f: f.path)]},
                               repo, body)
            return
        self.error(404, None, "Not Found")

    def resolve(self, repo_id: str, revision: str, path: str, body: bool) -> None:
        repo = self.repo(repo_id, revision)
        if repo is None:
            return
        file = repo.files.get(path)
        if file is None:
            return self.error(404, "EntryNotFound", "Entry not found", repo)
        headers = {"X-Repo-Commit": repo.commit}
        if not file.lfs:
            return self.send_file(file, headers | {"ETag": f'"{file.blob_id}"'}, body)
        headers |= {"ETag": f'"{file.sha256}"', "X-Linked-Etag": f'"{file.sha256}"',
                    "X-Linked-Size": str(file.size),
                    "Location": f"{self.state.cdn_url}/lfs/{file.sha256}"}
        self.send_bytes(302, headers, b"", body)

    def injected_failure(self) -> bool:
        with self.state.lock:
            status = self.state.failures.pop(0) if self.state.failures else None
        if status is not None:
            self.error(status, None, "injected by the test server")
        return status is not None

    def repo(self, repo_id: str, revision: str) -> Repo | None:
        """The repo at `revision`, or None after answering the error the Hub would give."""
        repo = self.state.repos.get(repo_id)
        authorization = self.headers.get("Authorization", "")
        token = authorization.removeprefix("Bearer ").strip() if authorization else ""
        if token and token not in self.state.tokens:
            self.error(401, None, "Invalid credentials in Authorization header")
            return None
        if repo is None or (repo.private and not token):
            status = 401 if repo is not None else 404
            self.error(status, "RepoNotFound", "Repository not found")
            return None
        if revision not in ("main", repo.commit):
            self.error(404, "RevisionNotFound", "Invalid rev id: " + revision, repo)
            return None
        return repo

    def lfs_file(self, sha256: str) -> RepoFile | None:
        for repo in self.state.repos.values():
            for file in repo.files.values():
                if file.lfs and file.sha256 == sha256:
                    return file
        return None

    def error(self, status: int, code: str | None, message: str, repo: Repo | None = None) -> None:
        headers = {"X-Error-Message": message, "Content-Type": "application/json"}
        if code:
            headers["X-Error-Code"] = code
        if repo is not None and code == "EntryNotFound":
            headers["X-Repo-Commit"] = repo.commit  # the Hub sends it: hf caches the absence
        self.send_bytes(status, headers, json.dumps({"error": message}).encode(),
                        self.command != "HEAD")

    def send_json(self, payload, repo: Repo, body: bool = True) -> None:
        self.send_bytes(200, {"Content-Type": "application/json", "X-Repo-Commit": repo.commit},
                        json.dumps(payload).encode(), body)

    def send_bytes(self, status: int, headers: dict, data: bytes, body: bool) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.record(status, len(data) if body else 0)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def send_file(self, file: RepoFile, headers: dict, body: bool) -> None:
        start, end = 0, file.size  # end exclusive
        status = 200
        requested = self.headers.get("Range")
        if requested:
            span = RANGE.match(requested.strip())
            if span and span[1]:
                start = int(span[1])
                end = min(int(span[2]) + 1, file.size) if span[2] else file.size
            elif span and span[2]:
                start = max(file.size - int(span[2]), 0)
            if not span or start >= file.size or start >= end:
                return self.send_bytes(416, {"Content-Range": f"bytes */{file.size}"}, b"", body)
            status = 206
            headers = headers | {"Content-Range": f"bytes {start}-{end - 1}/{file.size}"}
        self.send_response(status)
        for name, value in (headers | {"Accept-Ranges": "bytes"}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(end - start))
        self.record(status, end - start if body else 0)
        self.end_headers()
        if body:
            with open(file.local, "rb") as stream:
                stream.seek(start)
                sent = 0
                while sent < end - start:
                    chunk = stream.read(min(CHUNK, end - start - sent))
                    self.wfile.write(chunk)
                    sent += len(chunk)

    def record(self, status: int, bytes_sent: int) -> None:
        """Logged before the body goes out: once a client has its last byte, the test that
        reads the log must find the request there."""
        with self.state.lock:
            self.state.requests.append(Request(self.command, self.path, self.headers.get("Range"),
                                               status, bytes_sent, self.cdn))


class HubServer:
    """The Hub and its "CDN" on two free 127.0.0.1 ports, in threads of this process."""

    def __init__(self, lfs_min_bytes: int = 2**20) -> None:
        self.lfs_min_bytes = lfs_min_bytes
        self.state = HubState()
        self.hub = self.serve(cdn=False)
        self.cdn = self.serve(cdn=True)
        self.state.cdn_url = f"http://127.0.0.1:{self.cdn.server_address[1]}"

    def serve(self, cdn: bool) -> ThreadingHTTPServer:
        handler = type("Handler", (HubHandler,), {"state": self.state, "cdn": cdn})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.hub.server_address[1]}"

    def add_repo(self, repo_id: str, directory: Path, private: bool = False,
                 lfs_min_bytes: int | None = None) -> str:
        """Serve every file under `directory` as repo `repo_id`; returns its commit.
        `lfs_min_bytes=0` makes every safetensors file LFS (tiny test checkpoints)."""
        threshold = self.lfs_min_bytes if lfs_min_bytes is None else lfs_min_bytes
        files = {}
        for local in sorted(Path(directory).rglob("*")):
            if local.is_file():
                path = local.relative_to(directory).as_posix()
                files[path] = describe_file(local, path, threshold)
        listing = "".join(f"{file.path} {file.blob_id}\n" for file in files.values())
        commit = hashlib.sha1(f"{repo_id}\n{listing}".encode()).hexdigest()
        self.state.repos[repo_id] = Repo(repo_id, commit, files, private)
        return commit

    def add_token(self, token: str) -> None:
        self.state.tokens.add(token)

    @property
    def requests(self) -> list[Request]:
        with self.state.lock:
            return list(self.state.requests)

    def fail_next(self, count: int, status: int = 503) -> None:
        """Answer the next `count` requests (Hub or CDN) with `status`: a transient error."""
        with self.state.lock:
            self.state.failures.extend([status] * count)

    def clear_requests(self) -> None:
        with self.state.lock:
            self.state.requests.clear()

    def stop(self) -> None:
        for server in (self.hub, self.cdn):
            server.shutdown()
            server.server_close()


def use_hub(monkeypatch, server: HubServer, cache_dir: Path | None = None) -> None:
    """Point huggingface_hub, in this process and in children started later, at `server`,
    online (and at `cache_dir` for its cache, if given). The constants are read at import,
    hence the patches; `monkeypatch` undoes all of it after the test."""
    import huggingface_hub.constants as constants

    if cache_dir is not None:
        monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # huggingface_hub.model_info and the other module-level calls are methods of one HfApi made
    # at import, whose endpoint was read then
    from huggingface_hub import hf_api

    monkeypatch.setattr(hf_api.api, "endpoint", server.endpoint)
